//! Attention on the CPU one (sequence, head, block of query rows) at a time.
//!
//! candle runs `q @ kᵀ` as one gemm call per head, each split over the threads with a
//! fork-join, writes every head's (rows, keys) scores to one fresh tensor, then the softmax,
//! then `probs @ v` (again per head) into (batch, heads, rows, head_dim), which a transpose
//! copies into (batch, rows, heads * head_dim) for `o_proj`. Here each thread takes whole
//! tasks: it multiplies a block of query rows by the head's keys into a scratch buffer it
//! reuses (so scores stay in its cache and no page is first-touched per layer), applies
//! scale, mask and softmax there ([`softmax_row`]), and multiplies by the
//! values straight into the output's (rows, heads * head_dim) layout. GQA reads the shared
//! key/value head in place instead of `repeat_kv` copies.
//!
//! A block's keys stop shortly after the last one its mask leaves visible to any of its rows
//! ([`visible_keys`]): past it every score is `-inf` and every probability exactly 0, so a causal
//! prefill skips most of the upper triangle (38% of a 590-token prompt's attention products, at
//! 5 blocks) without changing a bit.
//!
//! The products are the same gemm calls on the same operands (single-threaded instead of
//! split, and without the all-zero tail), so every output element is accumulated in the same
//! order; the unit tests compare bit for bit with the composite path. Anything but
//! contiguous-enough f32 on the CPU returns `None` and the caller runs the composite.

use std::cell::RefCell;

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{cpu_gemm, Result};

/// Most query rows per task: 128 rows of a 2,354-key prompt are 1.2 MB of scores, which stay in
/// a core's L2, and a 590-token prompt splits into 16 heads × 5 blocks, enough tasks to keep
/// every thread busy to the end.
const BLOCK_ROWS: usize = 128;

thread_local! {
    /// Each worker's score buffer, kept between calls so its pages are touched once.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw f32 view of a tensor whose last dimension is contiguous.
struct View<'a> {
    data: &'a [f32],
    layout: Layout,
}

/// The pointer a task writes its disjoint output region through.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (rows, head) regions of one buffer that outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper rather than its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `softmax(q kᵀ * scale + mask) v` for q (batch, heads, rows, d), k/v (batch, kv_heads, keys, d)
/// and an additive `mask` (rows, keys): the output (batch, rows, heads * d) and, if
/// `want_probs`, the probabilities (batch, heads, rows, keys). `None` where the fast path does
/// not apply (another device or dtype, or layouts it does not read).
pub(super) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    want_probs: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let all_f32 = [Some(q), Some(k), Some(v), mask].into_iter().flatten().all(|t| t.dtype() == DType::F32);
    if !q.device().is_cpu() || !all_f32 || q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Ok(None);
    }
    let (b, heads, rows, d) = q.dims4()?;
    let (kb, kv_heads, keys, kd) = k.dims4()?;
    if kb != b
        || kd != d
        || v.dims() != k.dims()
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || rows == 0
        || keys == 0
    {
        return Ok(None);
    }
    if mask.is_some_and(|m| m.dims() != [rows, keys] || !m.is_contiguous()) || !q.is_contiguous() {
        return Ok(None);
    }
    // Keys and values may be views into a larger cache buffer: only the head-dim axis must be dense.
    if k.stride()[3] != 1 || v.stride()[3] != 1 {
        return Ok(None);
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let ms = mask.map(|m| m.storage_and_layout());
    let (Some(qv), Some(kv), Some(vv)) = (view(&qs, ql), view(&ks, kl), view(&vs, vl)) else {
        return Ok(None);
    };
    let mv = match &ms {
        Some((s, l)) => match view(s, l) {
            Some(m) => Some(m),
            None => return Ok(None),
        },
        None => None,
    };
    let mask_data = mv.as_ref().map(|m| &m.data[m.layout.start_offset()..][..rows * keys]);
    let n_rep = heads / kv_heads;
    let scale = scale as f32;
    let width = heads * d;
    let mut out = vec![0f32; b * rows * width];
    let mut probs = if want_probs { vec![0f32; b * heads * rows * keys] } else { Vec::new() };
    let out_ptr = OutPtr(out.as_mut_ptr());
    let probs_ptr = OutPtr(probs.as_mut_ptr());
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let block_start = |blk: usize| blk * (rows / blocks) + blk.min(rows % blocks);
    let visible: Vec<usize> = (0..blocks)
        .map(|blk| match mask_data {
            Some(m) => visible_keys(&m[block_start(blk) * keys..block_start(blk + 1) * keys], keys),
            None => keys,
        })
        .collect();
    let (q_off, k_off, v_off) = (qv.layout.start_offset(), kv.layout.start_offset(), vv.layout.start_offset());
    let (ks_, vs_) = (kv.layout.stride(), vv.layout.stride());
    (0..b * heads * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, h) = (bh / heads, bh % heads);
        let kvh = h / n_rep;
        // Near-equal blocks, so none is a single row unless the pass is one row (a decode
        // step), where candle's own path multiplies a single row too.
        let (r0, n) = (block_start(blk), block_start(blk + 1) - block_start(blk));
        let seen = visible[blk];
        let q_ptr = qv.data[q_off + ((bi * heads + h) * rows + r0) * d..].as_ptr();
        let k_ptr = kv.data[k_off + bi * ks_[0] + kvh * ks_[1]..].as_ptr();
        let v_ptr = vv.data[v_off + bi * vs_[0] + kvh * vs_[1]..].as_ptr();
        // `scores` holds the block's rows `ld` apart; only their first `seen` columns are written.
        let run = |scores: &mut [f32], ld: usize| {
            // SAFETY: every operand is addressed inside its tensor's storage by the dims and
            // strides checked above; `scores` holds (n - 1) * ld + seen elements.
            unsafe {
                cpu_gemm::overwrite(
                    (n, seen, d),
                    scores.as_mut_ptr(),
                    ld,
                    q_ptr,
                    d,
                    k_ptr,
                    (1, ks_[2]),
                    Parallelism::None,
                );
            }
            for i in 0..n {
                let row = &mut scores[i * ld..][..seen];
                softmax_row(row, scale, mask_data.map(|m| &m[(r0 + i) * keys..][..seen]));
            }
            // SAFETY: rows r0..r0 + n, columns h * d..(h + 1) * d of (b, rows, width) belong to
            // this task alone; `v` as above.
            unsafe {
                cpu_gemm::overwrite(
                    (n, d, seen),
                    out_ptr.get().add((bi * rows + r0) * width + h * d),
                    width,
                    scores.as_ptr(),
                    ld,
                    v_ptr,
                    (vs_[2], 1),
                    Parallelism::None,
                );
            }
        };
        if want_probs {
            // SAFETY: this task's rows of head (bi, h) in (b, heads, rows, keys) are its own;
            // the columns past `seen` keep the zeros they were allocated with.
            let scores =
                unsafe { std::slice::from_raw_parts_mut(probs_ptr.get().add((bh * rows + r0) * keys), n * keys) };
            run(scores, keys);
        } else {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < n * seen {
                    s.resize(n * seen, 0.0);
                }
                run(&mut s[..n * seen], seen);
            });
        }
    });
    drop((qs, ks, vs, ms));
    let device = q.device();
    let out = Tensor::from_vec(out, (b, rows, width), device)?;
    let probs = want_probs.then(|| Tensor::from_vec(probs, (b, heads, rows, keys), device)).transpose()?;
    Ok(Some((out, probs)))
}

/// Elements per pass of candle's f32 `vec_reduce_sum` (4 AVX registers of 8; NEON's 16 divides it).
/// Elements before the last whole pass land in lane `i % 32` whatever the row's length, so a
/// row cut to a multiple of 32 within that range sums exactly as the whole row with its zeros.
const SUM_STEP: usize = 32;

/// How many leading keys a block of mask rows needs: past the last entry of any row that is not
/// `-inf` every probability is exactly 0, but the softmax sum only adds in the same order when
/// the cut is a multiple of [`SUM_STEP`] inside the row's whole passes; otherwise, and for a
/// block that sees nothing, the whole row.
fn visible_keys(block: &[f32], keys: usize) -> usize {
    let last = block.chunks_exact(keys).filter_map(|row| row.iter().rposition(|&m| m != f32::NEG_INFINITY)).max();
    match last.map(|i| (i + 1).next_multiple_of(SUM_STEP)) {
        Some(cut) if cut <= keys - keys % SUM_STEP => cut,
        _ => keys,
    }
}

/// One row of scores to probabilities, in place: `v * scale + 0`, `+ mask`, then candle-nn's
/// `softmax_last_dim` row (`vec_reduce_max`, `exp(v - max)`, `vec_reduce_sum`, `/ sum`).
pub(super) fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    if row.is_empty() {
        return;
    }
    match mask {
        Some(mask) => {
            for (v, &m) in row.iter_mut().zip(mask) {
                *v = (*v * scale + 0.0) + m;
            }
        }
        None => row.iter_mut().for_each(|v| *v = *v * scale + 0.0),
    }
    let keys = row.len();
    let mut max = f32::NEG_INFINITY;
    // SAFETY: `row` holds `keys` > 0 initialised elements and `max` is a valid f32.
    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, keys) };
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let mut sum = 0.0f32;
    // SAFETY: as above.
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, keys) };
    for v in row.iter_mut() {
        *v /= sum;
    }
}

fn view<'a>(storage: &'a Storage, layout: &Layout) -> Option<View<'a>> {
    match storage {
        Storage::Cpu(CpuStorage::F32(data)) => Some(View { data, layout: layout.clone() }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The composite `Attention::attend_keys` runs without this module, verbatim.
    fn composite(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> (Tensor, Tensor) {
        let (b, heads, s, d) = q.dims4().unwrap();
        let n_rep = heads / k.dim(1).unwrap();
        let k = candle_transformers::utils::repeat_kv(k.clone(), n_rep).unwrap();
        let v = candle_transformers::utils::repeat_kv(v.clone(), n_rep).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let scores = match mask {
            Some(m) => scores.broadcast_add(m).unwrap(),
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, s, heads * d)).unwrap();
        (out, probs)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    fn causal(rows: usize, keys: usize) -> Tensor {
        let past = keys - rows;
        let m: Vec<f32> = (0..rows)
            .flat_map(|r| (0..keys).map(move |k| if k <= past + r { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Tensor::from_vec(m, (rows, keys), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_composite_bit_for_bit() {
        let dev = Device::Cpu;
        // (heads, kv_heads, rows, cached keys before the rows, head_dim): MHA, GQA, MQA, one
        // decode row, and row counts that split into several blocks (300 = 3 blocks of 100).
        for (heads, kvh, rows, past, d) in
            [(4, 4, 37, 0, 16), (4, 2, 300, 0, 8), (6, 1, 129, 5, 8), (4, 2, 1, 40, 16), (2, 2, 257, 3, 32)]
        {
            let keys = past + rows;
            let q = Tensor::randn(0f32, 1.0, (1, heads, rows, d), &dev).unwrap();
            // Keys/values as the cache hands them out: a narrow view of a larger buffer.
            let cap = keys + 7;
            let kbuf = Tensor::randn(0f32, 1.0, (1, kvh, cap, d), &dev).unwrap();
            let vbuf = Tensor::randn(0f32, 1.0, (1, kvh, cap, d), &dev).unwrap();
            let (k, v) = (kbuf.narrow(2, 0, keys).unwrap(), vbuf.narrow(2, 0, keys).unwrap());
            let mask = causal(rows, keys);
            let scale = 1.0 / (d as f64).sqrt();
            for m in [Some(&mask), None] {
                let (want_out, want_probs) = composite(&q, &k, &v, m, scale);
                let (out, probs) = attend(&q, &k, &v, m, scale, true).unwrap().unwrap();
                let ctx = format!("heads {heads}/{kvh}, rows {rows}, keys {keys}, mask {}", m.is_some());
                assert_eq!(bits(&out), bits(&want_out), "{ctx}");
                assert_eq!(bits(&probs.unwrap()), bits(&want_probs), "{ctx}");
                let (out, probs) = attend(&q, &k, &v, m, scale, false).unwrap().unwrap();
                assert_eq!(bits(&out), bits(&want_out), "{ctx}");
                assert!(probs.is_none());
            }
        }
    }

    #[test]
    fn skipping_keys_no_row_sees_changes_no_bit() {
        let dev = Device::Cpu;
        let (heads, rows, d) = (3, 260, 16);
        let keys = rows + 9;
        // Holes anywhere, and rows whose sight ends early: the first block's rows see at most
        // 40 keys, the second's at most 200, the last block sees them all.
        let m: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let end = match r {
                    0..87 => 40 - r % 7,
                    87..174 => 200,
                    _ => keys,
                };
                (0..keys).map(move |k| if k < end && (k * 7 + r) % 5 != 0 { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(m, (rows, keys), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (1, heads, rows, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, heads, keys, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, heads, keys, d), &dev).unwrap();
        let (want_out, want_probs) = composite(&q, &k, &v, Some(&mask), 0.25);
        let (out, probs) = attend(&q, &k, &v, Some(&mask), 0.25, true).unwrap().unwrap();
        assert_eq!(bits(&probs.unwrap()), bits(&want_probs));
        assert_eq!(bits(&out), bits(&want_out));
        let (out, _) = attend(&q, &k, &v, Some(&mask), 0.25, false).unwrap().unwrap();
        assert_eq!(bits(&out), bits(&want_out));
    }

    #[test]
    fn visible_keys_end_after_the_last_visible_one() {
        let ninf = f32::NEG_INFINITY;
        let rows = |ends: &[usize], keys: usize| -> Vec<f32> {
            ends.iter().flat_map(|&e| (0..keys).map(move |k| if k < e { 0.0 } else { ninf })).collect()
        };
        // Rows seeing 10 and 40 of 100 keys: the cut is 64, whole passes end at 96.
        assert_eq!(visible_keys(&rows(&[10, 40], 100), 100), 64);
        assert_eq!(visible_keys(&rows(&[10, 96], 100), 100), 96);
        // Past the last whole pass the row is kept whole.
        assert_eq!(visible_keys(&rows(&[97], 100), 100), 100);
        assert_eq!(visible_keys(&rows(&[5], 20), 20), 20);
        // A very negative entry is not `-inf`, and a block that sees nothing is kept whole.
        assert_eq!(visible_keys(&[0.0, 0.0, -1e30], 3), 3);
        assert_eq!(visible_keys(&[ninf; 6], 3), 3);
    }

    #[test]
    fn declines_what_it_does_not_read() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev).unwrap();
        // A transposed q, f64 operands, a mask of another shape.
        let qt = q.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        assert!(attend(&qt, &k, &k, None, 0.5, false).unwrap().is_none());
        let q64 = q.to_dtype(DType::F64).unwrap();
        let k64 = k.to_dtype(DType::F64).unwrap();
        assert!(attend(&q64, &k64, &k64, None, 0.5, false).unwrap().is_none());
        let mask = Tensor::zeros((1, 3, 3), DType::F32, &dev).unwrap();
        assert!(attend(&q, &k, &k, Some(&mask), 0.5, false).unwrap().is_none());
    }
}
