//! The decoder's and the CLIP tower's linear layers, weights stored transposed, (in, out) row-major.
//!
//! candle's `Linear` keeps the checkpoint's (out, in) layout and multiplies by its transposed
//! view, so the CPU gemm packs a strided right-hand side on every call, and candle zeroes each
//! output buffer before gemm overwrites it. Storing `Wᵀ` once at load and, for f32 on the CPU,
//! calling gemm straight into an unzeroed buffer takes the bench preset's o_proj + MLP from 0.40 s
//! to 0.32 s per prefill and single-stream decode from 23 to 25 tokens/s (BENCHMARKS.md).
//!
//! gemm sums in another order for the other operand layout, so outputs differ from candle's
//! `Linear` in the last bits (within 1e-5, unit test below); what must not change, a sequence's
//! result whatever it is batched with, holds bit for bit. A bias is added afterwards, as `Linear`
//! does. Elsewhere (CUDA, bf16/f16, layouts this does not read) the product goes through candle's
//! matmul on the stored `Wᵀ`.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use candle_nn::Linear;
use gemm::Parallelism;

use super::{cpu_gemm, Result};

/// A linear layer `x Wᵀ + b` holding `Wᵀ` contiguous.
#[derive(Debug, Clone)]
pub(super) struct Dense {
    /// (in, out), contiguous.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    /// One layer from candle's (out, in) weight and bias.
    pub(super) fn new(linear: &Linear) -> Result<Self> {
        Self::stacked(std::slice::from_ref(linear))
    }

    /// Several layers over the same input as one, their outputs side by side in `parts` order.
    pub(super) fn stacked(parts: &[Linear]) -> Result<Self> {
        let weights: Vec<Tensor> = parts.iter().map(|l| l.weight().t()).collect::<candle_core::Result<_>>()?;
        let weight_t = Tensor::cat(&weights, 1)?.contiguous()?;
        let bias = match parts.iter().map(Linear::bias).collect::<Option<Vec<_>>>() {
            Some(biases) => Some(Tensor::cat(&biases, 0)?),
            None => None,
        };
        Ok(Self { weight_t, bias })
    }

    /// `x Wᵀ + b` over the last dimension of `x`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.cpu_f32(x)? {
            Some(y) => y,
            None => x.broadcast_matmul(&self.weight_t)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The product by a direct gemm call, for contiguous f32 on the CPU; `None` otherwise.
    fn cpu_f32(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (k, n) = self.weight_t.dims2()?;
        let dims = x.dims();
        if !x.device().is_cpu() || x.dtype() != DType::F32 || !x.is_contiguous() || dims.last() != Some(&k) || k == 0 {
            return Ok(None);
        }
        // One gemm per leading index over its (rows, k) matrix, as candle's batched matmul
        // calls it: gemm's kernels differ by row count (one row is a matrix-vector product),
        // so a batch of single-row decode steps must stay single-row products to keep every
        // sequence's logits independent of what it is batched with.
        let m = match dims {
            [.., m, _] => *m,
            _ => return Ok(None),
        };
        let batches = x.elem_count() / (m * k).max(1);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = self.weight_t.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xd)), Storage::Cpu(CpuStorage::F32(wd))) = (&*xs, &*ws) else {
            return Ok(None);
        };
        let lhs = &xd[xl.start_offset()..][..batches * m * k];
        let rhs = &wd[wl.start_offset()..][..k * n];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        let mut out: Vec<f32> = Vec::with_capacity(batches * m * n);
        for i in 0..batches {
            // SAFETY: lhs holds `batches` row-major (m, k) matrices and rhs one (k, n); `out` has
            // room for `batches` (m, n) ones, and with `read_dst` false gemm writes every element
            // of its block (k > 0) without reading it, so the length is set once all are written.
            unsafe {
                cpu_gemm::overwrite(
                    (m, n, k),
                    out.as_mut_ptr().add(i * m * n),
                    n,
                    lhs.as_ptr().add(i * m * k),
                    k,
                    rhs.as_ptr(),
                    (n, 1),
                    parallelism,
                );
            }
        }
        // SAFETY: every block was written above.
        unsafe { out.set_len(batches * m * n) };
        drop((xs, ws));
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok(Some(Tensor::from_vec(out, shape, x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};
    use candle_nn::Linear;

    use super::Dense;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// Largest |a - b| / (1 + |b|).
    fn worst(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
    }

    #[test]
    fn agrees_with_candles_linear() {
        let dev = Device::Cpu;
        // Enough inner dimension for several of gemm's k blocks, and single decode rows.
        for (batch, rows, inner, out, bias) in [(1, 37, 64, 48, false), (2, 9, 1100, 70, true), (3, 1, 300, 33, false)]
        {
            let w = Tensor::randn(0f32, 0.5, (out, inner), &dev).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 0.5, out, &dev).unwrap());
            let linear = Linear::new(w, b);
            let x = Tensor::randn(0f32, 1.0, (batch, rows, inner), &dev).unwrap();
            let want = linear.forward(&x).unwrap();
            let dense = Dense::new(&linear).unwrap();
            let got = dense.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            // gemm sums in another order for another operand layout (one row is a
            // matrix-vector product, dot-wise for candle's (out, in), axpy-wise for (in, out)).
            let e = worst(&got, &want);
            assert!(e < 1e-5, "({batch}, {rows}, {inner}) -> {out}, bias {bias}: {e}");
            // A non-contiguous input takes candle's matmul on the same stored weight: equal.
            let xt = x.transpose(0, 1).unwrap().contiguous().unwrap().transpose(0, 1).unwrap();
            assert_eq!(bits(&dense.forward(&xt).unwrap()), bits(&got));
        }
    }

    #[test]
    fn each_sequence_of_a_batch_gets_what_it_gets_alone() {
        let dev = Device::Cpu;
        let linear = Linear::new(Tensor::randn(0f32, 0.5, (96, 200), &dev).unwrap(), None);
        let dense = Dense::new(&linear).unwrap();
        for rows in [1, 23] {
            let x = Tensor::randn(0f32, 1.0, (4, rows, 200), &dev).unwrap();
            let batched = dense.forward(&x).unwrap();
            for i in 0..4 {
                let alone = dense.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(bits(&batched.narrow(0, i, 1).unwrap()), bits(&alone), "rows {rows}, sequence {i}");
            }
        }
    }

    #[test]
    fn stacked_layers_put_their_outputs_side_by_side() {
        let dev = Device::Cpu;
        let parts: Vec<Linear> = [64, 32, 32]
            .iter()
            .map(|&o| {
                Linear::new(
                    Tensor::randn(0f32, 0.5, (o, 64), &dev).unwrap(),
                    Some(Tensor::randn(0f32, 0.5, o, &dev).unwrap()),
                )
            })
            .collect();
        let x = Tensor::randn(0f32, 1.0, (2, 37, 64), &dev).unwrap();
        let y = Dense::stacked(&parts).unwrap().forward(&x).unwrap();
        let mut from = 0;
        for p in &parts {
            let o = p.weight().dim(0).unwrap();
            let alone = Dense::new(p).unwrap().forward(&x).unwrap();
            assert_eq!(bits(&y.narrow(2, from, o).unwrap()), bits(&alone));
            from += o;
        }
    }
}
