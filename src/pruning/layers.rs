//! The forward-pass pieces calibration runs, behind a seam: [`LlavaModel`] runs them in place
//! (the CLI), the server runs them on its engine thread so that one thread owns every forward
//! pass (`jobs::calibration`).

use candle_core::Tensor;

use crate::model::{LlavaModel, PreparedPrompt};

use super::flops::FlopsModel;
use super::score::{head_max, visual_scores, RowRoles, VisualScores};
use super::PruneError;

/// Runs calibration's layer evaluations.
pub trait LayerRunner {
    /// The decoder's FLOPs model.
    fn flops(&self) -> FlopsModel;
    /// The prompt's input embeddings (vision tower, projector, token embeddings): (1, rows, hidden).
    fn input_embeds(&self, prompt: &PreparedPrompt) -> Result<Tensor, PruneError>;
    /// The attention half of layer `layer` on `x` at `positions`: the output before `o_proj`
    /// and, when `roles` are given, FitPrune's visual scores from the head-wise maximum of the
    /// attention probabilities.
    fn layer_attention(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &[u32],
        roles: Option<&RowRoles>,
    ) -> Result<(Tensor, Option<VisualScores>), PruneError>;
    /// The rest of layer `layer`: keeps rows `keep` (all if `None`) of `x` and `attn`, then
    /// `o_proj`, residual and MLP.
    fn layer_finish(&self, layer: usize, x: &Tensor, attn: &Tensor, keep: Option<&[u32]>)
        -> Result<Tensor, PruneError>;
}

impl LayerRunner for LlavaModel {
    fn flops(&self) -> FlopsModel {
        FlopsModel::from_config(&self.config().text_config)
    }

    fn input_embeds(&self, prompt: &PreparedPrompt) -> Result<Tensor, PruneError> {
        Ok(LlavaModel::input_embeds(self, prompt)?)
    }

    fn layer_attention(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &[u32],
        roles: Option<&RowRoles>,
    ) -> Result<(Tensor, Option<VisualScores>), PruneError> {
        let (attn, probs) = self.llama().layer_attention(layer, x, positions)?;
        let scores = roles.map(|r| visual_scores(&head_max(&probs)?, r)).transpose()?;
        Ok((attn, scores))
    }

    fn layer_finish(
        &self,
        layer: usize,
        x: &Tensor,
        attn: &Tensor,
        keep: Option<&[u32]>,
    ) -> Result<Tensor, PruneError> {
        Ok(self.llama().layer_finish(layer, x, attn, keep)?)
    }
}
