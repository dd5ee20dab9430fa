//! A loaded model plus what the HTTP layer needs to know about it without touching tensors.

use std::sync::Arc;

use crate::model::fingerprint::fingerprint;
use crate::model::{LlavaModel, ModelError};
use crate::pruning::FlopsModel;

use super::kv::KvLayout;
use super::token_bytes::TokenBytes;

/// Facts about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name clients use (`--served-model-name`, else the source's name).
    pub name: String,
    /// Whether this is the built-in random-weight demo model.
    pub is_demo: bool,
    /// `model::fingerprint` of the directory (recipes are matched on it).
    pub fingerprint: String,
    /// Decoder layers (a recipe has one entry per layer).
    pub layers: usize,
    /// Visual tokens of a typical image (fixed for LLaVA-1.5; NeXT counts vary with the size,
    /// this is a 2x2-tile square's): the default N of imported recipes.
    pub image_tokens: usize,
    /// `max_position_embeddings`: prompt + completion must fit.
    pub max_context: usize,
    /// Device label (`cpu`, `cuda:0`).
    pub device: String,
    /// Dtype label (`f32`, `bf16`).
    pub dtype: String,
    /// FLOPs model of the decoder, for pruning reports.
    pub flops: FlopsModel,
    /// KV-cache geometry, for memory accounting.
    pub kv: KvLayout,
}

/// The model and its facts; the engine thread runs it, other threads only read.
pub struct LoadedModel {
    /// The model. Only the engine thread runs forward passes; others may call `prepare`.
    pub model: Arc<LlavaModel>,
    /// Facts.
    pub info: ModelInfo,
    /// Raw bytes of every token, for logprobs.
    pub token_bytes: TokenBytes,
}

impl LoadedModel {
    /// Wraps a freshly loaded model.
    pub fn new(model: LlavaModel, name: String, is_demo: bool, device: String) -> Result<Self, ModelError> {
        let cfg = model.config();
        let info = ModelInfo {
            name,
            is_demo,
            fingerprint: fingerprint(model.dir())?,
            layers: model.llama().num_layers(),
            image_tokens: model.nominal_image_tokens(),
            max_context: cfg.text_config.max_position_embeddings,
            device,
            dtype: model.options().dtype.as_str().to_string(),
            flops: FlopsModel::from_config(&cfg.text_config),
            kv: KvLayout::new(
                cfg.text_config.num_hidden_layers,
                cfg.text_config.kv_heads(),
                cfg.text_config.head_dim(),
                model.options().dtype.size_in_bytes(),
            ),
        };
        let token_bytes = TokenBytes::new(model.tokenizer());
        Ok(Self { model: Arc::new(model), info, token_bytes })
    }
}
