//! Attention through a fused kernel where the caller needs no probabilities: flash-attention 2
//! (`candle-flash-attn`, the `flash-attn` cargo feature) on CUDA in f16/bf16.
//!
//! The eager path materialises (rows, keys) scores and probabilities per head; a fused kernel
//! keeps them in on-chip memory, accumulating scores, the softmax and `probs @ v` in f32. FitPrune
//! needs the probabilities only at the layers a recipe prunes (and while calibrating), so every
//! other layer, every decode step and the vision tower can take this path.
//!
//! A fused kernel does not take our additive position mask: it takes a causal flag and a sliding
//! window *by index*. [`fused_mask`] says when a position mask is exactly such a shape; the unit
//! tests hold it against [`super::visibility::position_mask`] element by element, including after
//! pruning has left holes in the positions. Where it is not, the caller runs the eager path.
//! On the CPU nothing here applies: the per-head kernel in `attn_cpu` already keeps each block's
//! scores in a reused scratch buffer.

use candle_core::{DType, Tensor};

use super::Result;

/// The visibility rule of one attend call in the form a fused kernel takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FusedMask {
    /// Every row sees every key.
    Full,
    /// Causal aligned at the bottom right: row `i` of `rows` sees keys `0..=i + keys - rows`, and
    /// with a `window` W only the last W of those (flash-attention's `window_size_left` W − 1).
    Causal { window: Option<usize> },
}

/// The [`FusedMask`] equal to `position_mask(rows, keys, window)`, or `None` when that mask has no
/// such shape (pruned holes under a sliding window that bites, keys out of order, rows that are
/// not the keys' tail).
pub(super) fn fused_mask(rows: &[u32], keys: &[u32], window: Option<u32>) -> Option<FusedMask> {
    let (&min_row, &max_row) = (rows.iter().min()?, rows.iter().max()?);
    let in_window = |r: u32, k: u32| window.is_none_or(|w| r - k < w);
    if keys.iter().all(|&k| k <= min_row && in_window(max_row, k)) {
        return Some(FusedMask::Full);
    }
    // Causal by index equals causal by position exactly when the keys ascend strictly and the
    // rows are the keys' last `rows.len()` entries (a prefill over its own rows, after any
    // pruning, or new rows appended to a cache).
    let ascending = keys.windows(2).all(|p| p[0] < p[1]);
    if !ascending || rows.len() > keys.len() || rows != &keys[keys.len() - rows.len()..] {
        return None;
    }
    let Some(w) = window else {
        return Some(FusedMask::Causal { window: None });
    };
    // The widest distance a row sees is from the last row (the last key) to the first key.
    if max_row - keys[0] < w {
        return Some(FusedMask::Causal { window: None });
    }
    // A window by index is a window by position only where consecutive keys are consecutive
    // positions (no pruned holes).
    let contiguous = keys.windows(2).all(|p| p[1] == p[0] + 1);
    contiguous.then_some(FusedMask::Causal { window: Some(w as usize) })
}

/// The additive (rows, keys) mask a fused kernel applies for `mask`, row-major, 0 or -inf: what
/// the tests compare with the position mask.
#[cfg(test)]
pub(super) fn index_mask(mask: FusedMask, rows: usize, keys: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * keys];
    if let FusedMask::Causal { window } = mask {
        for i in 0..rows {
            let last = i + keys - rows;
            for j in 0..keys {
                let hidden = j > last || window.is_some_and(|w| last - j >= w);
                if hidden {
                    out[i * keys + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    out
}

/// Whether a fused kernel is built in and may run on tensors like `q` (CUDA, f16/bf16, a head
/// size the kernels have): callers skip the mask analysis otherwise.
pub(super) fn applies(q: &Tensor) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    let kernel = cfg!(feature = "flash-attn")
        && enabled()
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16);
    (kernel || emulated(q)) && d.is_multiple_of(8) && d <= 256
}

/// Tests run the fused path's call sites on the CPU through `fused_attn_emulate`.
#[cfg(test)]
fn emulated(q: &Tensor) -> bool {
    emulate::active() && q.device().is_cpu()
}

/// Outside tests nothing is emulated.
#[cfg(not(test))]
fn emulated(_: &Tensor) -> bool {
    false
}

/// `FITPRUNE_ATTENTION=eager` turns the fused kernels off (read once), so the same binary can
/// measure or check one path against the other.
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("FITPRUNE_ATTENTION").map_or(true, |v| v != "eager"))
}

/// `softmax(q kᵀ * scale + mask) v` for q (batch, heads, rows, d) and k/v (batch, kv_heads,
/// keys, d), whose last dimension is contiguous (cache views are fine): the output (batch, rows,
/// heads * d), or `None` where no fused kernel applies.
pub(super) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: FusedMask, scale: f64) -> Result<Option<Tensor>> {
    if !applies(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Ok(None);
    }
    let (b, heads, rows, d) = q.dims4()?;
    let (left, right) = window_sizes(mask);
    let (qt, kt, vt) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
    #[cfg(test)]
    if emulated(q) {
        let out = emulate::attend(&qt, &kt, &vt, scale as f32, left, right)?;
        return Ok(Some(out.reshape((b, rows, heads * d))?));
    }
    let out = flash::attend(&qt, &kt, &vt, scale as f32, left, right)?;
    Ok(out.map(|o| o.reshape((b, rows, heads * d))).transpose()?)
}

/// Packed sequences' self-attention in one fused call (varlen): q (1, heads, total, d) and k/v
/// (1, kv_heads, total, d) hold the sequences' rows back to back, sequence i's from
/// `starts[i]` to `starts[i + 1]` ([`cumulative_lengths`], on q's device), each attending over
/// its own rows under the same `mask`; `max_len` is the longest. The output is (1, total,
/// heads * d), or `None` where no fused kernel applies.
pub(super) fn attend_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &Tensor,
    max_len: usize,
    mask: FusedMask,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !applies(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Ok(None);
    }
    let (_, heads, total, d) = q.dims4()?;
    let (left, right) = window_sizes(mask);
    let as_rows = |t: &Tensor| -> Result<Tensor> { Ok(t.squeeze(0)?.transpose(0, 1)?) };
    let (qr, kr, vr) = (as_rows(q)?, as_rows(k)?, as_rows(v)?);
    #[cfg(test)]
    if emulated(q) {
        let out = emulate::attend_varlen(&qr, &kr, &vr, starts, scale as f32, left, right)?;
        return Ok(Some(out.reshape((1, total, heads * d))?));
    }
    let out = flash::attend_varlen(&qr, &kr, &vr, starts, max_len, scale as f32, left, right)?;
    Ok(out.map(|o| o.reshape((1, total, heads * d))).transpose()?)
}

/// flash-attention's (window_size_left, window_size_right) for a mask.
fn window_sizes(mask: FusedMask) -> (Option<usize>, Option<usize>) {
    match mask {
        FusedMask::Full => (None, None),
        FusedMask::Causal { window } => (window.map(|w| w.saturating_sub(1)), Some(0)),
    }
}

/// `0, l0, l0 + l1, ...`: the cumulative sequence starts a varlen kernel indexes rows with.
pub(super) fn cumulative_lengths(lens: &[usize]) -> Vec<u32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0u32, |acc, &l| {
            *acc += l as u32;
            Some(*acc)
        }))
        .collect()
}

#[cfg(feature = "flash-attn")]
mod flash {
    use candle_core::Tensor;

    use super::Result;

    /// q (b, rows, heads, d), k/v (b, keys, kv_heads, d) → (b, rows, heads, d).
    pub(super) fn attend(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        left: Option<usize>,
        right: Option<usize>,
    ) -> Result<Option<Tensor>> {
        Ok(Some(candle_flash_attn::flash_attn_windowed(q, k, v, scale, left, right)?))
    }

    /// q (total, heads, d), k/v (total, kv_heads, d), `seqlens` the cumulative starts.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_varlen(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqlens: &Tensor,
        max_len: usize,
        scale: f32,
        left: Option<usize>,
        right: Option<usize>,
    ) -> Result<Option<Tensor>> {
        Ok(Some(candle_flash_attn::flash_attn_varlen_windowed(
            q, k, v, seqlens, seqlens, max_len, max_len, scale, left, right,
        )?))
    }
}

#[cfg(not(feature = "flash-attn"))]
mod flash {
    use candle_core::Tensor;

    use super::Result;

    /// Built without a fused kernel: the caller runs the eager path.
    pub(super) fn attend(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f32,
        _: Option<usize>,
        _: Option<usize>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Built without a fused kernel: the caller runs the eager path.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_varlen(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: f32,
        _: Option<usize>,
        _: Option<usize>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(test)]
#[path = "fused_attn_emulate.rs"]
pub(super) mod emulate;

#[cfg(test)]
#[path = "fused_attn_tests.rs"]
mod tests;
