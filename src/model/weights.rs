//! Safetensors checkpoints: single file or sharded index, in either LLaVA tensor layout.
//!
//! The hub's llava-hf checkpoints name tensors `language_model.model.*`,
//! `language_model.lm_head.weight`, `vision_tower.vision_model.*` and `multi_modal_projector.*`;
//! transformers ≥ 4.52 saves `model.language_model.*`, `lm_head.weight`,
//! `model.vision_tower.vision_model.*` and `model.multi_modal_projector.*`. Both load the same.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::{ModelError, Result};

/// Which tensor naming a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    /// `language_model.model.*` (llava-hf on the hub).
    Hub,
    /// `model.language_model.*` (transformers ≥ 4.52).
    Nested,
    /// The original LLaVA code's names (`model.layers.*`, `lm_head`, `model.vision_tower.*`,
    /// `model.mm_projector.*`), as LLaVA-HR saves them.
    Original,
}

impl TensorLayout {
    /// Prefix of the Llama `LlamaModel` tensors.
    pub fn text_model(self) -> &'static str {
        match self {
            Self::Hub => "language_model.model",
            Self::Nested => "model.language_model",
            Self::Original => "model",
        }
    }

    /// Prefix of the LM head.
    pub fn lm_head(self) -> &'static str {
        match self {
            Self::Hub => "language_model.lm_head",
            Self::Nested | Self::Original => "lm_head",
        }
    }

    /// Prefix of the CLIP vision model.
    pub fn vision_model(self) -> &'static str {
        match self {
            Self::Hub => "vision_tower.vision_model",
            Self::Nested => "model.vision_tower.vision_model",
            Self::Original => "model.vision_tower",
        }
    }

    /// Name of LLaVA-NeXT's `image_newline` parameter.
    pub fn image_newline(self) -> &'static str {
        match self {
            Self::Hub => "image_newline",
            Self::Nested | Self::Original => "model.image_newline",
        }
    }

    /// Prefix of the projector.
    pub fn projector(self) -> &'static str {
        match self {
            Self::Hub => "multi_modal_projector",
            Self::Nested => "model.multi_modal_projector",
            Self::Original => "model.mm_projector",
        }
    }
}

/// The safetensors files of a model directory: the shards an index names, or `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = read(&index)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            file: index.display().to_string(),
            field: "(document)".into(),
            message: e.to_string(),
        })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
            file: index.display().to_string(),
            field: "weight_map".into(),
            message: "missing or not an object".into(),
        })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        for f in &files {
            if !f.exists() {
                return Err(ModelError::MissingFile { path: f.clone(), what: "shard named in the weight_map".into() });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::MissingFile {
        path: single,
        what: "neither model.safetensors nor model.safetensors.index.json is present".into(),
    })
}

/// Memory-maps the checkpoint and detects its tensor layout.
pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<(VarBuilder<'static>, TensorLayout)> {
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mmapped read-only; like every safetensors loader we rely on nobody
    // truncating them while the server runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    let layout = if vb.contains_tensor("language_model.model.embed_tokens.weight") {
        TensorLayout::Hub
    } else if vb.contains_tensor("model.language_model.embed_tokens.weight") {
        TensorLayout::Nested
    } else {
        return Err(ModelError::Weights(format!(
            "{}: no `language_model.model.embed_tokens.weight` or `model.language_model.embed_tokens.weight`; \
             not a LLaVA checkpoint in a known layout",
            dir.display()
        )));
    };
    Ok((vb, layout))
}

/// Reads a text file, naming it on failure.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile { path: path.to_path_buf(), what: "required".into() },
        _ => ModelError::Io { path: path.to_path_buf(), source },
    })
}
