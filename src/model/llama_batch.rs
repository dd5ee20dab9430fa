//! Batched prefill through the prunable decoder: several prompts of different lengths share
//! every layer's matrix multiplications, while each sequence keeps its own positions, KV cache
//! and hook, so each prunes its own rows by its own recipe.
//!
//! Sequences are packed back to back along the row axis, without padding (as vLLM packs
//! variable-length prefills): the projections, `o_proj` and the MLP run once over all rows, and
//! attention runs per sequence over its own rows with its own causal mask, so a sequence's
//! attention is exactly what it computes alone and no (batch × rows × rows) tensor exists. After
//! a layer prunes, one gather keeps every sequence's surviving rows, still packed.

use std::cell::OnceCell;

use candle_core::{Device, Module, Tensor};

use super::fused_attn::{self, FusedMask};
use super::llama::{check_keep, DecoderHook, DecoderOutput, KvCache, Llama};
use super::visibility::Visibility;
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
    /// Each sequence's causal mask over its own rows, built when the eager path first needs it
    /// and kept until its rows change.
    masks: Vec<OnceCell<Option<Tensor>>>,
    /// The sequences' first rows and the end, on the device, for a varlen kernel (built on
    /// first use, like the masks).
    starts: OnceCell<Tensor>,
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
        let masks = positions.iter().map(|_| OnceCell::new()).collect();
        Self { positions, offsets, masks, starts: OnceCell::new() }
    }

    /// [`fused_attn::cumulative_lengths`] of the sequences on `device`, and the longest.
    fn starts(&self, device: &Device) -> Result<(&Tensor, usize)> {
        let lens: Vec<usize> = self.positions.iter().map(Vec::len).collect();
        let starts = match self.starts.get() {
            Some(t) => t,
            None => {
                let t = Tensor::new(fused_attn::cumulative_lengths(&lens).as_slice(), device)?;
                self.starts.get_or_init(|| t)
            }
        };
        Ok((starts, lens.into_iter().max().unwrap_or(0)))
    }

    fn all_positions(&self) -> Vec<u32> {
        self.positions.concat()
    }

    /// Sequence i's rows attending over themselves.
    fn visibility(&self, i: usize, window: Option<u32>) -> Visibility<'_> {
        let p = &self.positions[i];
        Visibility { rows: p, keys: p, window, built: &self.masks[i] }
    }

    /// The one fused mask shape every sequence's self-attention has, if they share one: then a
    /// single varlen call can attend for all of them.
    fn shared_fused_mask(&self, window: Option<u32>) -> Option<FusedMask> {
        let mut shared = None;
        for p in &self.positions {
            let shape = fused_attn::fused_mask(p, p, window)?;
            // A one-row sequence sees its one key under any shape.
            if p.len() == 1 {
                continue;
            }
            match shared {
                None => shared = Some(shape),
                Some(s) if s == shape => {}
                Some(_) => return None,
            }
        }
        Some(shared.unwrap_or(FusedMask::Full))
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
            let mut keep: Vec<Option<Vec<u32>>> = vec![None; seqs.len()];
            let want: Vec<bool> = seqs.iter().map(|s| s.hook.wants_attention(l)).collect();
            // With no probabilities wanted, one varlen kernel call attends for every sequence
            // (the caches are empty, so each sequence's keys are exactly its packed rows).
            let shared = (!want.contains(&true) && fused_attn::applies(&q))
                .then(|| packing.shared_fused_mask(self.window))
                .flatten();
            let packed = match shared {
                Some(shape) => {
                    let (starts, max_len) = packing.starts(&device)?;
                    layer.self_attn.attend_packed((&q, &k, &v), starts, max_len, shape)?
                }
                None => None,
            };
            let mut outs = Vec::with_capacity(seqs.len());
            for (i, s) in seqs.iter_mut().enumerate() {
                let (at, rows) = (packing.offsets[i], packing.positions[i].len());
                let own = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, at, rows)?.contiguous()?) };
                let (k, v) = s.cache.layers[l].append(own(&k)?, own(&v)?, &packing.positions[i])?;
                if packed.is_some() {
                    continue;
                }
                let vis = packing.visibility(i, self.window);
                let (out, probs) = layer.self_attn.attend_keys(&own(&q)?, k, v, &vis, want[i])?;
                if let Some(probs) = probs {
                    if let Some(k) = s.hook.on_attention(l, &probs, &packing.positions[i])? {
                        check_keep(&k, rows)?;
                        keep[i] = (k.len() < rows).then_some(k);
                    }
                }
                outs.push(out);
            }
            let attn = match packed {
                Some(attn) => attn,
                None => Tensor::cat(&outs, 1)?,
            };
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
