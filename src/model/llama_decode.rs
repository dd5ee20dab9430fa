//! Batched decode through the prunable decoder: one new token for each of B sequences per pass.
//!
//! The B rows are packed along the row axis, so embeddings, the q/k/v/o projections, the MLP
//! and the LM head run once over all of them (every weight is read once per step, not once per
//! sequence). Attention runs per sequence over that sequence's own per-layer cache, whose length
//! differs between sequences and, after pruning, between layers; nothing is padded to the
//! longest. Each row gets RoPE at its own sequence's position, and with a sliding window
//! (Mistral) each sequence's keys outside its window are masked.

use candle_core::{DType, Module, Tensor};

use super::llama::{KvCache, Llama};
use super::visibility::Visibility;
use super::{ModelError, Result};

impl Llama {
    /// Advances every sequence by one token: `tokens[i]` at `positions[i]`, appending to
    /// `caches[i]`. Returns (B, vocab) f32 logits, row i for sequence i, each equal (up to float
    /// rounding of the shared matrix products) to what that sequence computes alone.
    pub fn decode_batch(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || positions.len() != b || caches.len() != b {
            return Err(ModelError::InvalidInput(format!(
                "decode batch of {b} tokens, {} positions and {} caches",
                positions.len(),
                caches.len()
            )));
        }
        if let Some(i) = caches.iter().position(|c| c.layers.len() != self.layers.len()) {
            return Err(ModelError::InvalidInput(format!("decode sequence {i}: cache has the wrong layer count")));
        }
        let device = self.embed_tokens.embeddings().device().clone();
        let ids = Tensor::new(tokens, &device)?.unsqueeze(0)?;
        let mut x = self.embed(&ids)?;
        let (cos, sin) = self.rotary.tables(positions, &device)?;
        // RoPE tables per sequence, (B, 1, half): each sequence is its own batch entry below.
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let hidden_size = x.dim(2)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // The B rows as B one-row sequences, so each sequence's q/k/v is a contiguous slice:
            // q (B, heads, 1, head_dim), k and v (B, kv_heads, 1, head_dim).
            let normed = layer.input_layernorm.forward(&x)?.reshape((b, 1, hidden_size))?;
            let (q, k, v) = layer.self_attn.project(&normed, &cos, &sin)?;
            let mut outs = Vec::with_capacity(b);
            for (i, cache) in caches.iter_mut().enumerate() {
                let own = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, i, 1)?) };
                let layer_cache = &mut cache.layers[l];
                let (k, v) = layer_cache.append(own(&k)?, own(&v)?, &positions[i..i + 1])?;
                // Every cached key sits at or before the new token's position, so only a sliding
                // window (Mistral) can hide keys: those W or more positions back.
                let built = std::cell::OnceCell::new();
                let vis = Visibility {
                    rows: &positions[i..i + 1],
                    keys: layer_cache.positions(),
                    window: self.window,
                    built: &built,
                };
                let (out, _) = layer.self_attn.attend_keys(&own(&q)?, k, v, &vis, false)?;
                outs.push(out);
            }
            let attn = Tensor::cat(&outs, 1)?;
            x = layer.finish(&x, &attn, None)?;
        }
        let hidden = self.norm.forward(&x)?.squeeze(0)?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }
}
