//! LLaVA's multi-modal projector: two linear layers with an activation (`gelu`, erf form) between.

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::{Activation, LlavaConfig};
use super::Result;

/// `LlavaMultiModalProjector`: maps vision features into the language model's embedding space.
#[derive(Debug, Clone)]
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl Projector {
    /// Loads from the `multi_modal_projector` prefix.
    pub fn load(vb: VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        Self::load_named(vb, cfg, ("linear_1", "linear_2"))
    }

    /// Loads with the two linears under `names`: the original LLaVA code's `mlp2x_gelu` is an
    /// `nn.Sequential` whose linears are `0` and `2` (the GELU is `1`).
    pub fn load_named(vb: VarBuilder, cfg: &LlavaConfig, names: (&str, &str)) -> Result<Self> {
        let vision = cfg.vision_config.hidden_size * cfg.vision_feature_layer.indices().len();
        let text = cfg.text_config.hidden_size;
        let lin = |i, o, vb| -> Result<Linear> {
            Ok(if cfg.multimodal_projector_bias {
                candle_nn::linear(i, o, vb)?
            } else {
                candle_nn::linear_no_bias(i, o, vb)?
            })
        };
        Ok(Self {
            linear_1: lin(vision, text, vb.pp(names.0))?,
            linear_2: lin(text, text, vb.pp(names.1))?,
            act: cfg.projector_hidden_act,
        })
    }

    /// (images, tokens, vision hidden) -> (images, tokens, text hidden)
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.linear_1.forward(features)?)?;
        Ok(self.linear_2.forward(&h)?)
    }
}
