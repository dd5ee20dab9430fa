//! Pruned prefill: a [`DecoderHook`] that applies a recipe's per-layer deletion counts using
//! FitPrune's `cross × self` score (the authors' inference in `modeling_llama.py`).
//!
//! Kept tokens keep their original positions; each pruning layer's KV cache keeps every token it
//! saw; decode steps (which see one row) never prune.

use candle_core::Tensor;

use crate::model::llama::DecoderHook;
use crate::model::{ModelError, PreparedPrompt};

use super::score::{head_max, lowest_products, visual_scores, RowRoles};

/// What one pruning layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPrune {
    /// Decoder layer index.
    pub layer: usize,
    /// Original positions of the visual tokens still present after this layer, ascending.
    pub kept_visual: Vec<u32>,
}

/// Applies per-layer deletion counts during one prefill.
#[derive(Debug, Clone)]
pub struct PruneHook {
    deletions: Vec<usize>,
    /// Per current row: whether it is a visual token.
    is_visual: Vec<bool>,
    visual_in: usize,
    trace: Vec<LayerPrune>,
}

impl PruneHook {
    /// A hook for `prompt` deleting `deletions[l]` visual tokens at layer l (already scaled to the
    /// prompt's visual-token count, see `Recipe::deletions_for`).
    pub fn new(deletions: Vec<usize>, prompt: &PreparedPrompt) -> Self {
        let mut is_visual = vec![false; prompt.input_ids.len()];
        for span in &prompt.image_spans {
            for i in span.clone() {
                is_visual[i] = true;
            }
        }
        Self { deletions, visual_in: prompt.visual_tokens(), is_visual, trace: Vec::new() }
    }

    /// Visual tokens in the prompt.
    pub fn visual_in(&self) -> usize {
        self.visual_in
    }

    /// Visual tokens still present after the last pruning layer.
    pub fn visual_kept(&self) -> usize {
        self.is_visual.iter().filter(|&&v| v).count()
    }

    /// Per pruning layer, the visual tokens that survived it.
    pub fn trace(&self) -> &[LayerPrune] {
        &self.trace
    }

    /// The deletions actually applied per layer (a layer cannot delete more than remain).
    pub fn applied_deletions(&self) -> Vec<usize> {
        let mut applied = vec![0; self.deletions.len()];
        let mut before = self.visual_in;
        for t in &self.trace {
            applied[t.layer] = before - t.kept_visual.len();
            before = t.kept_visual.len();
        }
        applied
    }
}

impl DecoderHook for PruneHook {
    fn wants_attention(&self, layer: usize) -> bool {
        self.deletions.get(layer).is_some_and(|&d| d > 0) && self.visual_kept() > 0
    }

    fn on_attention(
        &mut self,
        layer: usize,
        probs: &Tensor,
        positions: &[u32],
    ) -> Result<Option<Vec<u32>>, ModelError> {
        let (_, _, rows, keys) = probs.dims4()?;
        // Only a prefill over the whole prompt prunes; a step that extends a cache does not.
        if rows != keys || rows != self.is_visual.len() {
            return Ok(None);
        }
        let roles = RowRoles::from_flags(&self.is_visual);
        let a = head_max(probs).map_err(to_model)?;
        let scores = visual_scores(&a, &roles).map_err(to_model)?;
        let delete = lowest_products(&scores, self.deletions[layer]);
        let mut drop = vec![false; rows];
        for j in delete {
            drop[roles.visual[j] as usize] = true;
        }
        let keep: Vec<u32> = (0..rows as u32).filter(|&i| !drop[i as usize]).collect();
        let kept_visual =
            keep.iter().filter(|&&i| self.is_visual[i as usize]).map(|&i| positions[i as usize]).collect();
        self.is_visual = keep.iter().map(|&i| self.is_visual[i as usize]).collect();
        self.trace.push(LayerPrune { layer, kept_visual });
        Ok(Some(keep))
    }
}

fn to_model(e: super::PruneError) -> ModelError {
    match e {
        super::PruneError::Model(m) => m,
        super::PruneError::Candle(c) => ModelError::Candle(c),
        other => ModelError::InvalidInput(other.to_string()),
    }
}
