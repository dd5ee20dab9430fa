//! flash-attention's contract (layouts, GQA, bottom-right causal windows, varlen starts) in plain
//! candle ops on the CPU, for tests only: switched on per test thread, it lets the model run the
//! fused path's call sites, transposes and packing on the CPU and be compared with the eager path.
//! It is written from the kernel's documented semantics, not from our position masks.

use std::cell::Cell;

use candle_core::{DType, Tensor};

use super::Result;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static CALLS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Whether this thread emulates the fused kernels.
pub(super) fn active() -> bool {
    ACTIVE.with(Cell::get)
}

/// Runs `f` with the emulation on, returning its result and how many (single, varlen) fused
/// calls it made.
pub(crate) fn with_emulation<T>(f: impl FnOnce() -> T) -> (T, (usize, usize)) {
    ACTIVE.with(|a| a.set(true));
    CALLS.with(|c| c.set((0, 0)));
    let out = f();
    ACTIVE.with(|a| a.set(false));
    (out, CALLS.with(Cell::get))
}

/// flash_attn_windowed: q (b, sq, h, d), k/v (b, sk, kvh, d), any strides → (b, sq, h, d).
/// Key j is visible to query i when `c - left <= j <= c + right`, c = i + sk - sq (a `None`
/// side is unbounded).
pub(super) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    left: Option<usize>,
    right: Option<usize>,
) -> Result<Tensor> {
    CALLS.with(|c| c.set((c.get().0 + 1, c.get().1)));
    one(q, k, v, scale, left, right)
}

/// flash_attn_varlen_windowed with the same starts for q and k: q (total, h, d), k/v (total,
/// kvh, d) → (total, h, d), each sequence attending over its own rows.
pub(super) fn attend_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &Tensor,
    scale: f32,
    left: Option<usize>,
    right: Option<usize>,
) -> Result<Tensor> {
    CALLS.with(|c| c.set((c.get().0, c.get().1 + 1)));
    let starts = starts.to_vec1::<u32>()?;
    let mut outs = Vec::new();
    for w in starts.windows(2) {
        let (at, n) = (w[0] as usize, (w[1] - w[0]) as usize);
        let own = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, at, n)?.unsqueeze(0)?) };
        outs.push(one(&own(q)?, &own(k)?, &own(v)?, scale, left, right)?.squeeze(0)?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

fn one(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, left: Option<usize>, right: Option<usize>) -> Result<Tensor> {
    let (_, sq, h, _) = q.dims4()?;
    let (_, sk, kvh, _) = k.dims4()?;
    let heads_first = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
    let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
    let k = candle_transformers::utils::repeat_kv(k, h / kvh)?;
    let v = candle_transformers::utils::repeat_kv(v, h / kvh)?;
    let mut mask = vec![0f32; sq * sk];
    for i in 0..sq {
        let c = (i + sk) as i64 - sq as i64;
        for j in 0..sk as i64 {
            let after = right.is_some_and(|r| j > c + r as i64);
            let before = left.is_some_and(|l| j < c - l as i64);
            if after || before {
                mask[i * sk + j as usize] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (sq, sk), q.device())?;
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * f64::from(scale))?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.to_dtype(v.dtype())?.matmul(&v)?.transpose(1, 2)?.contiguous()?)
}
