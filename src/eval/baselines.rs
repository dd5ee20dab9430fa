//! Baseline deletions that `fitprune eval` sets against FitPrune's scores, as [`DecoderHook`]s.
//!
//! - [`RandomHook`]: at every layer where the recipe deletes `d[l]` tokens, deletes `d[l]` visual
//!   tokens drawn uniformly (without replacement) from those still present; seeded. Same per-layer
//!   kept counts as FitPrune, so the difference is what the scores buy.
//! - [`FastVHook`] (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): all of the
//!   recipe's deletions `D = Σ d[l]` at one early layer K, keeping the visual tokens that receive
//!   the most attention from the **last prompt token**, averaged over heads (FastV's
//!   `last_attention.mean(dim=1)[0][-1]`). FastV ranks with layer K-1's attention and drops the
//!   tokens before layer K; here the hook at layer K ranks with that layer's own attention and
//!   drops the rows after its attention, which is the same thing one layer index earlier (FastV's
//!   K = 2 on LLaVA-1.5 is hook layer 1). Per-layer kept counts differ from the recipe's by
//!   construction, so its FLOPs reduction differs too; the report says what it achieved.

use candle_core::{DType, Tensor};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::llama::DecoderHook;
use crate::model::{ModelError, PreparedPrompt};

/// Which rows of the current prefill are visual tokens (they shrink as layers prune).
#[derive(Debug, Clone)]
struct VisualRows {
    is_visual: Vec<bool>,
}

impl VisualRows {
    fn of(prompt: &PreparedPrompt) -> Self {
        let mut is_visual = vec![false; prompt.input_ids.len()];
        for span in &prompt.image_spans {
            is_visual[span.clone()].iter_mut().for_each(|v| *v = true);
        }
        Self { is_visual }
    }

    fn visual(&self) -> Vec<usize> {
        self.is_visual.iter().enumerate().filter(|(_, &v)| v).map(|(i, _)| i).collect()
    }

    /// Drops the given current rows; returns the ascending rows kept.
    fn drop_rows(&mut self, drop: &[usize]) -> Vec<u32> {
        let mut gone = vec![false; self.is_visual.len()];
        drop.iter().for_each(|&r| gone[r] = true);
        let keep: Vec<u32> = (0..self.is_visual.len() as u32).filter(|&i| !gone[i as usize]).collect();
        self.is_visual = keep.iter().map(|&i| self.is_visual[i as usize]).collect();
        keep
    }

    /// Whether `probs` (batch, heads, rows, keys) is this prompt's prefill (decode steps never prune).
    fn is_prefill(&self, probs: &Tensor) -> Result<bool, ModelError> {
        let (_, _, rows, keys) = probs.dims4()?;
        Ok(rows == keys && rows == self.is_visual.len())
    }
}

/// Deletes `deletions[l]` uniformly random visual tokens at each layer l.
#[derive(Debug, Clone)]
pub struct RandomHook {
    deletions: Vec<usize>,
    rows: VisualRows,
    rng: ChaCha8Rng,
    applied: Vec<usize>,
}

impl RandomHook {
    /// A hook for `prompt` with per-layer counts (already scaled to its visual tokens) and a seed.
    pub fn new(deletions: Vec<usize>, prompt: &PreparedPrompt, seed: u64) -> Self {
        let applied = vec![0; deletions.len()];
        Self { deletions, rows: VisualRows::of(prompt), rng: ChaCha8Rng::seed_from_u64(seed), applied }
    }

    /// Tokens deleted per layer in the last prefill.
    pub fn applied_deletions(&self) -> &[usize] {
        &self.applied
    }
}

impl DecoderHook for RandomHook {
    fn wants_attention(&self, layer: usize) -> bool {
        // The probabilities are not needed, but the hook is only called where they are made;
        // FitPrune pays the same materialisation at the same layers, so TTFT stays comparable.
        self.deletions.get(layer).is_some_and(|&d| d > 0)
    }

    fn on_attention(&mut self, layer: usize, probs: &Tensor, _: &[u32]) -> Result<Option<Vec<u32>>, ModelError> {
        if !self.rows.is_prefill(probs)? {
            return Ok(None);
        }
        let visual = self.rows.visual();
        let d = self.deletions[layer].min(visual.len());
        let drop: Vec<usize> = sample(&mut self.rng, visual.len(), d).into_iter().map(|j| visual[j]).collect();
        self.applied[layer] = d;
        Ok(Some(self.rows.drop_rows(&drop)))
    }
}

/// Deletes `total` visual tokens at `layer`: those the last prompt token attends to least.
#[derive(Debug, Clone)]
pub struct FastVHook {
    layer: usize,
    total: usize,
    rows: VisualRows,
    applied: Vec<usize>,
}

impl FastVHook {
    /// The early layer FastV prunes at in our hook numbering: 1 (FastV's K = 2 on LLaVA-1.5),
    /// 0 for a decoder too shallow to have a layer 1 worth keeping.
    pub fn default_layer(layers: usize) -> usize {
        usize::from(layers > 2)
    }

    /// A hook for `prompt` deleting `total` visual tokens at `layer` of a `layers`-layer decoder.
    pub fn new(layer: usize, total: usize, layers: usize, prompt: &PreparedPrompt) -> Self {
        Self { layer, total, rows: VisualRows::of(prompt), applied: vec![0; layers] }
    }

    /// Per-layer deletions FastV makes for a recipe's counts: their sum, all at `layer`.
    pub fn deletions(layer: usize, recipe: &[usize]) -> Vec<usize> {
        let mut d = vec![0; recipe.len()];
        if let Some(slot) = d.get_mut(layer) {
            *slot = recipe.iter().sum();
        }
        d
    }

    /// Tokens deleted per layer in the last prefill.
    pub fn applied_deletions(&self) -> &[usize] {
        &self.applied
    }
}

impl DecoderHook for FastVHook {
    fn wants_attention(&self, layer: usize) -> bool {
        layer == self.layer && self.total > 0
    }

    fn on_attention(&mut self, layer: usize, probs: &Tensor, _: &[u32]) -> Result<Option<Vec<u32>>, ModelError> {
        if layer != self.layer || !self.rows.is_prefill(probs)? {
            return Ok(None);
        }
        let (_, _, rows, _) = probs.dims4()?;
        // (1, heads, rows, keys) -> the last row, averaged over heads: (keys,).
        let last = probs.squeeze(0)?.narrow(1, rows - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.mean(0)?;
        let received = last.to_vec1::<f32>()?;
        let visual = self.rows.visual();
        let mut order: Vec<usize> = visual.clone();
        // Ascending attention; ties drop the earlier token first (deterministic).
        order.sort_by(|&a, &b| received[a].total_cmp(&received[b]).then(a.cmp(&b)));
        let d = self.total.min(visual.len());
        order.truncate(d);
        self.applied[layer] = d;
        Ok(Some(self.rows.drop_rows(&order)))
    }
}
