//! Separable resampling of (B, C, H, W) tensors as PyTorch's `F.interpolate` computes it, for
//! LLaVA-HR: bilinear with `align_corners=True` (the fast branch's input, slow-map upsampling)
//! and bicubic with `antialias=True` (the position-embedding grid).
//!
//! Each axis becomes an (out, in) weight matrix, so a resize is two matmuls; the weights are
//! PyTorch's, the summation order is not, which moves results by float rounding only.

use candle_core::{DType, Device, Tensor};

use super::Result;

/// Bilinear, `align_corners=True`: output i samples input i * (in - 1) / (out - 1).
pub fn bilinear_align_corners_weights(input: usize, output: usize) -> Vec<f32> {
    let mut w = vec![0f32; output * input];
    let scale = if output > 1 { (input as f32 - 1.0) / (output as f32 - 1.0) } else { 0.0 };
    for i in 0..output {
        let src = scale * i as f32;
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let l1 = src - i0 as f32;
        w[i * input + i0] += 1.0 - l1;
        w[i * input + i1] += l1;
    }
    w
}

/// Bicubic with antialias (PyTorch's `_upsample_bicubic2d_aa`, the PIL-style kernel with
/// a = -0.5, widened by the scale when downsampling, weights normalised per output).
pub fn bicubic_antialias_weights(input: usize, output: usize) -> Vec<f32> {
    let cubic = |x: f64| {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let (support, invscale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    let mut w = vec![0f32; output * input];
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(input as i64).max(0) as usize;
        let taps: Vec<f64> = (lo..hi).map(|j| cubic((j as f64 - center + 0.5) * invscale)).collect();
        let total: f64 = taps.iter().sum();
        for (k, t) in taps.iter().enumerate() {
            w[i * input + lo + k] = if total != 0.0 { (t / total) as f32 } else { *t as f32 };
        }
    }
    w
}

/// Resizes the last two dims of `x` (B, C, H, W) with per-axis weight matrices (out, in).
pub fn resize(x: &Tensor, rows: &[f32], cols: &[f32], out: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dev: &Device = x.device();
    let dtype = x.dtype();
    let wy = Tensor::from_slice(rows, (out.0, h), dev)?.to_dtype(dtype)?;
    let wx = Tensor::from_slice(cols, (out.1, w), dev)?.to_dtype(dtype)?;
    // (B, C, H, W) x (W, Wo) -> (B, C, H, Wo); then (Ho, H) x (B, C, H, Wo) -> (B, C, Ho, Wo).
    let x = x.contiguous()?.broadcast_matmul(&wx.t()?)?;
    Ok(wy.broadcast_left(x.dims()[..2].to_vec())?.contiguous()?.matmul(&x.contiguous()?)?)
}

/// `F.interpolate(x, size=out, mode="bilinear", align_corners=True)`.
pub fn bilinear_align_corners(x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == out {
        return Ok(x.clone());
    }
    resize(x, &bilinear_align_corners_weights(h, out.0), &bilinear_align_corners_weights(w, out.1), out)
}

/// `F.interpolate(x, size=out, mode="bicubic", antialias=True)`, computed in f32.
pub fn bicubic_antialias(x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let y = resize(
        &x.to_dtype(DType::F32)?,
        &bicubic_antialias_weights(h, out.0),
        &bicubic_antialias_weights(w, out.1),
        out,
    )?;
    Ok(y.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_align_corners_keeps_the_corners_and_interpolates_between() {
        // 3 -> 5: samples at 0, 0.5, 1, 1.5, 2.
        let w = bilinear_align_corners_weights(3, 5);
        let x = [10f32, 20.0, 40.0];
        let y: Vec<f32> = (0..5).map(|i| (0..3).map(|j| w[i * 3 + j] * x[j]).sum()).collect();
        assert_eq!(y, vec![10.0, 15.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn bicubic_weights_sum_to_one_and_identity_at_equal_size() {
        for (i, o) in [(4, 8), (24, 32), (8, 3), (5, 5)] {
            let w = bicubic_antialias_weights(i, o);
            for r in 0..o {
                let s: f32 = w[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{i}->{o} row {r}: {s}");
            }
        }
        let w = bicubic_antialias_weights(5, 5);
        for r in 0..5 {
            for c in 0..5 {
                assert!((w[r * 5 + c] - f32::from(u8::from(r == c))).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn bicubic_matches_torch_upsampling_and_downsampling() {
        // torch 2.15: F.interpolate(x, size=(1, n), mode="bicubic", antialias=True) on one row.
        let apply = |x: &[f32], n: usize| -> Vec<f32> {
            let w = bicubic_antialias_weights(x.len(), n);
            (0..n).map(|i| (0..x.len()).map(|j| w[i * x.len() + j] * x[j]).sum()).collect()
        };
        let up = apply(&[0.0, 1.0, 4.0, 9.0], 6);
        let want_up = [-0.06578932, 0.294_117_7, 1.3611108, 3.3611114, 6.8235297, 9.328948];
        let squares: Vec<f32> = (0..8).map(|i| (i * i) as f32).collect();
        let down = apply(&squares, 3);
        let want_down = [1.0357937, 12.718559, 37.485275];
        for (got, want) in [(up, &want_up[..]), (down, &want_down[..])] {
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "{got:?} vs {want:?}");
            }
        }
    }
}
