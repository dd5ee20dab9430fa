//! Batched prefill through the prunable decoder: several prompts of different lengths go through
//! each layer as one tensor, while every sequence keeps its own positions, KV cache and hook, so
//! each prunes its own rows by its own recipe.
//!
//! Sequences are right-padded to the longest. A per-sequence mask hides padding from real rows
//! (padding rows see only themselves, so their softmax stays finite); a masked key gets exactly
//! zero probability, so a real row's result is the single-sequence one up to float summation
//! order. After a layer prunes, one gather over the flattened (batch * rows) packs each
//! sequence's kept rows to the front and pads to the new longest, and the RoPE tables and mask
//! are rebuilt for the new layout.

use candle_core::{DType, Device, Module, Tensor};

use super::llama::{DecoderHook, DecoderOutput, KvCache, Llama, Rotary};
use super::{ModelError, Result};

/// One sequence of a batched prefill.
pub struct BatchSequence<'a> {
    /// Input embeddings (1, rows, hidden).
    pub embeds: Tensor,
    /// Position of each row.
    pub positions: Vec<u32>,
    /// An empty cache to fill (batched passes are prefills).
    pub cache: &'a mut KvCache,
    /// Observes this sequence's attention and may remove its rows.
    pub hook: &'a mut dyn DecoderHook,
}

/// Where every sequence's rows sit in the padded batch, with the tables that depend on it.
struct Layout {
    /// Original positions of each sequence's current rows (its first `len` padded rows).
    positions: Vec<Vec<u32>>,
    /// Padded row count: the longest sequence.
    width: usize,
    cos: Tensor,
    sin: Tensor,
    /// Additive mask (batch, 1, width, width).
    mask: Tensor,
}

impl Layout {
    fn new(rotary: &Rotary, positions: Vec<Vec<u32>>, dtype: DType, device: &Device) -> Result<Self> {
        let (b, width) = (positions.len(), positions.iter().map(Vec::len).max().unwrap_or(0));
        let padded: Vec<u32> =
            positions.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat_n(0, width - p.len()))).collect();
        let (cos, sin) = rotary.tables(&padded, dtype, device)?;
        let half = cos.dim(1)?;
        let (cos, sin) = (cos.reshape((b, width, half))?, sin.reshape((b, width, half))?);
        let mut mask = vec![f32::NEG_INFINITY; b * width * width];
        for (i, p) in positions.iter().enumerate() {
            let block = &mut mask[i * width * width..(i + 1) * width * width];
            for r in 0..width {
                for k in 0..width {
                    let visible = if r < p.len() { k < p.len() && p[k] <= p[r] } else { k == r };
                    if visible {
                        block[r * width + k] = 0.0;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, width, width), device)?;
        Ok(Self { positions, width, cos, sin, mask })
    }

    /// Gathers rows of a (batch, width, dim) tensor so that sequence i holds `keep[i]` (indices
    /// into its current rows) at the front, padded with copies of its first kept row.
    fn gather(&self, t: &Tensor, keep: &[Vec<u32>], width: usize) -> Result<Tensor> {
        let (b, _, dim) = t.dims3()?;
        let index: Vec<u32> = keep
            .iter()
            .enumerate()
            .flat_map(|(i, k)| {
                let base = (i * self.width) as u32;
                let filler = base + k[0];
                k.iter().map(move |&r| base + r).chain(std::iter::repeat_n(filler, width - k.len()))
            })
            .collect();
        let index = Tensor::new(index.as_slice(), t.device())?;
        Ok(t.reshape((b * self.width, dim))?.index_select(&index, 0)?.reshape((b, width, dim))?)
    }
}

/// Checks a hook's answer: ascending, in range, not empty.
pub(super) fn check_keep(keep: &[u32], rows: usize) -> Result<()> {
    let ascending = keep.windows(2).all(|w| w[0] < w[1]);
    if keep.is_empty() || !ascending || keep.last().is_some_and(|&k| k as usize >= rows) {
        return Err(ModelError::InvalidInput(format!(
            "a decoder hook must keep an ascending, non-empty subset of the {rows} rows"
        )));
    }
    Ok(())
}

impl Llama {
    /// Prefills every sequence in `seqs` in one pass per layer. Each sequence's result (its
    /// final-normed hidden rows, their positions, its cache and what its hook saw) matches a
    /// [`Llama::forward`] of that sequence alone.
    pub fn forward_batch(&self, seqs: &mut [BatchSequence<'_>]) -> Result<Vec<DecoderOutput>> {
        let Some(first) = seqs.first() else {
            return Ok(Vec::new());
        };
        let (device, dtype, hidden) = (first.embeds.device().clone(), first.embeds.dtype(), first.embeds.dim(2)?);
        for (i, s) in seqs.iter().enumerate() {
            let (one, rows, h) = s.embeds.dims3()?;
            if one != 1 || h != hidden || rows == 0 || rows != s.positions.len() {
                return Err(ModelError::InvalidInput(format!(
                    "batch sequence {i}: embeddings {:?} for {} positions",
                    s.embeds.dims(),
                    s.positions.len()
                )));
            }
            if s.cache.layers.len() != self.layers.len() || s.cache.layers.iter().any(|c| !c.is_empty()) {
                return Err(ModelError::InvalidInput(format!(
                    "batch sequence {i}: a batched prefill needs an empty cache"
                )));
            }
        }
        let mut layout = Layout::new(&self.rotary, seqs.iter().map(|s| s.positions.clone()).collect(), dtype, &device)?;
        let padded = seqs
            .iter()
            .map(|s| {
                let rows = s.positions.len();
                Ok(s.embeds.pad_with_zeros(1, 0, layout.width - rows)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = Tensor::cat(&padded, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&x)?;
            let (q, k, v) = layer.self_attn.project(&normed, &layout.cos, &layout.sin)?;
            for (i, s) in seqs.iter_mut().enumerate() {
                let rows = &layout.positions[i];
                let own =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, i, 1)?.narrow(2, 0, rows.len())?.contiguous()?) };
                s.cache.layers[l].append(own(&k)?, own(&v)?, rows)?;
            }
            let want: Vec<bool> = seqs.iter().map(|s| s.hook.wants_attention(l)).collect();
            let (attn, probs) = layer.self_attn.attend_keys(&q, k, v, Some(&layout.mask), want.contains(&true))?;
            let mut keep: Vec<Option<Vec<u32>>> = vec![None; seqs.len()];
            if let Some(probs) = probs {
                for (i, s) in seqs.iter_mut().enumerate().filter(|(i, _)| want[*i]) {
                    let rows = layout.positions[i].len();
                    let own = probs.narrow(0, i, 1)?.narrow(2, 0, rows)?.narrow(3, 0, rows)?.contiguous()?;
                    if let Some(k) = s.hook.on_attention(l, &own, &layout.positions[i])? {
                        check_keep(&k, rows)?;
                        keep[i] = (k.len() < rows).then_some(k);
                    }
                }
            }
            let (residual, attn) = if keep.iter().any(Option::is_some) {
                let keep: Vec<Vec<u32>> = keep
                    .into_iter()
                    .zip(&layout.positions)
                    .map(|(k, p)| k.unwrap_or_else(|| (0..p.len() as u32).collect()))
                    .collect();
                let positions: Vec<Vec<u32>> = keep
                    .iter()
                    .zip(&layout.positions)
                    .map(|(k, p)| k.iter().map(|&r| p[r as usize]).collect())
                    .collect();
                let next = Layout::new(&self.rotary, positions, dtype, &device)?;
                let gathered = (layout.gather(&x, &keep, next.width)?, layout.gather(&attn, &keep, next.width)?);
                layout = next;
                gathered
            } else {
                (x, attn)
            };
            x = layer.finish(&residual, &attn, None)?;
        }
        let hidden = self.norm.forward(&x)?;
        layout
            .positions
            .into_iter()
            .enumerate()
            .map(|(i, positions)| {
                Ok(DecoderOutput { hidden: hidden.narrow(0, i, 1)?.narrow(1, 0, positions.len())?, positions })
            })
            .collect()
    }
}
