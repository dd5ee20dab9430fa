//! Batched prefill through the prunable decoder: several prompts of different lengths share
//! every layer's matrix multiplications, while each sequence keeps its own positions, KV cache
//! and hook, so each prunes its own rows by its own recipe.
//!
//! Sequences are packed back to back along the row axis, without padding (as vLLM packs
//! variable-length prefills): the projections, `o_proj` and the MLP run once over all rows, and
//! attention runs per sequence over its own rows with its own causal mask, so a sequence's
//! attention is exactly what it computes alone and no (batch × rows × rows) tensor exists. After
//! a layer prunes, one gather keeps every sequence's surviving rows, still packed.

use candle_core::{Device, Module, Tensor};

use super::llama::{check_keep, position_mask, DecoderHook, DecoderOutput, KvCache, Llama};
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

/// Where each sequence's rows sit in the packed batch.
struct Packing {
    /// Original positions of each sequence's current rows.
    positions: Vec<Vec<u32>>,
    /// First packed row of each sequence.
    offsets: Vec<usize>,
    /// Each sequence's causal mask over its own rows (`None`: not built yet, or none needed).
    masks: Vec<Option<Option<Tensor>>>,
}

impl Packing {
    fn new(positions: Vec<Vec<u32>>) -> Self {
        let offsets = positions
            .iter()
            .scan(0, |next, p| {
                let at = *next;
                *next += p.len();
                Some(at)
            })
            .collect();
        let masks = positions.iter().map(|_| None).collect();
        Self { positions, offsets, masks }
    }

    fn all_positions(&self) -> Vec<u32> {
        self.positions.concat()
    }

    /// Sequence i's mask, built on first use and kept until its rows change.
    fn mask(&mut self, i: usize, window: Option<u32>, device: &Device) -> Result<Option<Tensor>> {
        if self.masks[i].is_none() {
            let p = &self.positions[i];
            self.masks[i] = Some(position_mask(p, p, window, device)?);
        }
        Ok(self.masks[i].clone().flatten())
    }
}

impl Llama {
    /// Prefills every sequence in `seqs` in one pass per layer. Each sequence's result (its
    /// final-normed hidden rows, their positions, its cache and what its hook saw) matches a
    /// [`Llama::forward`] of that sequence alone.
    pub fn forward_batch(&self, seqs: &mut [BatchSequence<'_>]) -> Result<Vec<DecoderOutput>> {
        let Some(first) = seqs.first() else {
            return Ok(Vec::new());
        };
        let (device, hidden) = (first.embeds.device().clone(), first.embeds.dim(2)?);
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
        let mut packing = Packing::new(seqs.iter().map(|s| s.positions.clone()).collect());
        let mut x = Tensor::cat(&seqs.iter().map(|s| &s.embeds).collect::<Vec<_>>(), 1)?;
        let (mut cos, mut sin) = self.rotary.tables(&packing.all_positions(), &device)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&x)?;
            let (q, k, v) = layer.self_attn.project(&normed, &cos, &sin)?;
            let mut outs = Vec::with_capacity(seqs.len());
            let mut keep: Vec<Option<Vec<u32>>> = vec![None; seqs.len()];
            for (i, s) in seqs.iter_mut().enumerate() {
                let (at, rows) = (packing.offsets[i], packing.positions[i].len());
                let own = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, at, rows)?.contiguous()?) };
                let (k, v) = s.cache.layers[l].append(own(&k)?, own(&v)?, &packing.positions[i])?;
                let want = s.hook.wants_attention(l);
                let mask = packing.mask(i, self.window, &device)?;
                let (out, probs) = layer.self_attn.attend_keys(&own(&q)?, k, v, mask.as_ref(), want)?;
                if let Some(probs) = probs {
                    if let Some(k) = s.hook.on_attention(l, &probs, &packing.positions[i])? {
                        check_keep(&k, rows)?;
                        keep[i] = (k.len() < rows).then_some(k);
                    }
                }
                outs.push(out);
            }
            let attn = Tensor::cat(&outs, 1)?;
            let (residual, attn) = if keep.iter().any(Option::is_some) {
                let mut index = Vec::new();
                let mut positions = Vec::with_capacity(seqs.len());
                for (i, k) in keep.into_iter().enumerate() {
                    let (at, p) = (packing.offsets[i] as u32, &packing.positions[i]);
                    let k = k.unwrap_or_else(|| (0..p.len() as u32).collect());
                    index.extend(k.iter().map(|&r| at + r));
                    positions.push(k.iter().map(|&r| p[r as usize]).collect());
                }
                packing = Packing::new(positions);
                (cos, sin) = self.rotary.tables(&packing.all_positions(), &device)?;
                let index = Tensor::new(index.as_slice(), &device)?;
                (x.index_select(&index, 1)?, attn.index_select(&index, 1)?)
            } else {
                (x, attn)
            };
            x = layer.finish(&residual, &attn, None)?;
        }
        let hidden = self.norm.forward(&x)?;
        let Packing { positions, offsets, .. } = packing;
        positions
            .into_iter()
            .zip(offsets)
            .map(|(positions, at)| Ok(DecoderOutput { hidden: hidden.narrow(1, at, positions.len())?, positions }))
            .collect()
    }
}
