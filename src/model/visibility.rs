//! Which keys each query row may see, by position: the additive mask the eager attention paths
//! apply, and the per-call description (`Visibility`) a fused kernel can take instead.

use candle_core::{DType, Device, Tensor};

use super::Result;

/// Additive mask (rows, keys): 0 where the key's position is not after the row's and, with a
/// `window` W, `row - key < W` (transformers' sliding mask, `kv_idx > q_idx - W`); -inf elsewhere.
/// `None` when every key is visible to every row (decode steps inside the window).
///
/// Built on `device` from the two position lists (rows + keys values uploaded, not rows x keys),
/// by comparisons there.
pub(super) fn position_mask(
    rows: &[u32],
    keys: &[u32],
    window: Option<u32>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let min_row = rows.iter().copied().min().unwrap_or(0);
    let max_row = rows.iter().copied().max().unwrap_or(0);
    let in_window = |r: u32, k: u32| window.is_none_or(|w| r - k < w);
    if keys.iter().all(|&k| k <= min_row && in_window(max_row, k)) {
        return Ok(None);
    }
    let shape = (rows.len(), keys.len());
    // Positions are below 2^24 (any context), so f32 holds them exactly.
    let as_f32 = |p: &[u32]| p.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let r = Tensor::from_vec(as_f32(rows), (rows.len(), 1), device)?.broadcast_as(shape)?;
    let k = Tensor::from_vec(as_f32(keys), (1, keys.len()), device)?.broadcast_as(shape)?;
    let mut visible = k.le(&r)?;
    if let Some(w) = window {
        // row - key < W  <=>  key + W > row.
        visible = (visible * k.affine(1.0, f64::from(w))?.gt(&r)?)?;
    }
    let zero = Tensor::zeros((1, 1), DType::F32, device)?.broadcast_as(shape)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (1, 1), device)?.broadcast_as(shape)?;
    Ok(Some(visible.where_cond(&zero, &blocked)?))
}

/// Which keys the query rows of one attend call may see, by position ([`position_mask`]'s
/// rule). The additive mask is built in `built` when the eager path first needs it, so callers
/// that attend with the same positions at every layer share one.
pub(super) struct Visibility<'a> {
    pub(super) rows: &'a [u32],
    pub(super) keys: &'a [u32],
    pub(super) window: Option<u32>,
    pub(super) built: &'a std::cell::OnceCell<Option<Tensor>>,
}

impl Visibility<'_> {
    /// The additive (rows, keys) mask, `None` where every key is visible.
    pub(super) fn mask(&self, device: &Device) -> Result<Option<&Tensor>> {
        let built = match self.built.get() {
            Some(m) => m,
            None => {
                let m = position_mask(self.rows, self.keys, self.window, device)?;
                self.built.get_or_init(|| m)
            }
        };
        Ok(built.as_ref())
    }
}
