//! LLaVA-HR's `config.json` (luogen1996/LLaVA-HR, original-LLaVA layout): a flat Llama config
//! plus the `mm_*` fields, `is_multipath_encoder`, `vision_tower_slow` and `input_image_size`;
//! the CLIP config comes from the folder `mm_vision_tower` names (inside the model directory when
//! a folder of that name exists, as tiny test checkpoints ship it, else the hub cache).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::config::{Activation, FeatureLayer, FeatureSelect, LlavaConfig, ModelType, TextConfig, VisionConfig};
use super::weights::read;
use super::{ModelError, Result};

/// Whether a parsed `config.json` is LLaVA-HR's: an original-LLaVA config with
/// `is_multipath_encoder: true` (the family is told by these keys, not by `model_type`).
pub fn is_hr_config(value: &serde_json::Value) -> bool {
    value.get("is_multipath_encoder").and_then(|v| v.as_bool()) == Some(true)
}

/// The HR-only fields, as the reference reads them.
#[derive(Debug, Clone, Deserialize)]
struct HrFields {
    mm_vision_tower: String,
    vision_tower_slow: String,
    input_image_size: usize,
    #[serde(default = "linear")]
    mm_projector_type: String,
    #[serde(default)]
    image_aspect_ratio: Option<String>,
    #[serde(default)]
    mm_hidden_size: Option<usize>,
    /// `enable_adapter = not freeze_vision`: the MR adapters exist only when the tower was tuned.
    #[serde(default)]
    freeze_vision: bool,
    #[serde(default)]
    mm_use_im_start_end: bool,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

fn linear() -> String {
    "linear".into()
}

/// What the HR family needs beyond the shared [`LlavaConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HrSpec {
    /// `input_image_size` S: the slow branch's (and the preprocessor's) resolution.
    pub image_size: usize,
    /// The fast branch's input F = max(int(S / 32 * patch), CLIP image size) (448 at S = 1024).
    pub fast_size: usize,
    /// `vision_tower_slow` (the ConvNeXt name; its shape is read off the checkpoint).
    pub slow_tower: String,
    /// Expand to a square with the mean colour first (`image_aspect_ratio: "pad"`).
    pub pad_to_square: bool,
    /// Whether the three MR adapters exist (`freeze_vision: false`).
    pub adapters: bool,
}

impl HrSpec {
    /// Visual tokens per image: the fast branch's (F / patch)^2.
    pub fn tokens(&self, patch: usize) -> usize {
        let side = self.fast_size / patch;
        side * side
    }

    /// Side of the slow branch's stage-4 map (stem /4, then three /2 downsamplings, floored).
    pub fn slow_side(&self) -> usize {
        self.image_size / 4 / 2 / 2 / 2
    }
}

/// Parses an HR `config.json` found in `dir` into the shared config and the HR fields.
pub fn load_hr_config(dir: &Path, value: &serde_json::Value) -> Result<(LlavaConfig, HrSpec)> {
    let bad =
        |field: &str, message: String| ModelError::Config { file: "config.json".into(), field: field.into(), message };
    let hr: HrFields =
        serde_path_to_error::deserialize(value).map_err(|e| bad(&e.path().to_string(), e.inner().to_string()))?;
    if hr.mm_projector_type != "mlp2x_gelu" {
        return Err(bad(
            "mm_projector_type",
            format!("{:?} is not supported (LLaVA-HR uses \"mlp2x_gelu\")", hr.mm_projector_type),
        ));
    }
    if hr.mm_use_im_start_end {
        return Err(bad("mm_use_im_start_end", "image start/end tokens are not supported".into()));
    }
    if !hr.vision_tower_slow.contains("convnext") {
        return Err(bad(
            "vision_tower_slow",
            format!("{:?} is not a ConvNeXt; only ConvNeXt slow branches are supported", hr.vision_tower_slow),
        ));
    }
    // The flat Llama fields; `model_type` here is the LLaVA one, not the decoder architecture.
    let mut text_value = value.clone();
    if let Some(obj) = text_value.as_object_mut() {
        obj.insert("model_type".into(), serde_json::json!("llama"));
    }
    let text_config: TextConfig =
        serde_path_to_error::deserialize(&text_value).map_err(|e| bad(&e.path().to_string(), e.inner().to_string()))?;
    let vision_config = clip_config(dir, &hr.mm_vision_tower)?;
    if let Some(mm) = hr.mm_hidden_size {
        if mm != vision_config.hidden_size {
            return Err(bad(
                "mm_hidden_size",
                format!("is {mm}, but the CLIP tower is {} wide", vision_config.hidden_size),
            ));
        }
    }
    let s = hr.input_image_size;
    let patch = vision_config.patch_size;
    // The reference's `max(int(self.image_size / 32 * 14), 336)` with CLIP ViT-L/14-336's patch
    // and input size read from its config, in the same floating-point order.
    let fast_size = ((s as f64 / 32.0 * patch as f64) as usize).max(vision_config.image_size);
    let spec = HrSpec {
        image_size: s,
        fast_size,
        slow_tower: hr.vision_tower_slow.clone(),
        pad_to_square: hr.image_aspect_ratio.as_deref() == Some("pad"),
        adapters: !hr.freeze_vision,
    };
    if s < 32 || patch == 0 || fast_size < patch {
        return Err(bad("input_image_size", format!("{s} is too small for the two branches")));
    }
    let (fast, slow) = (spec.tokens(patch), spec.slow_side() * spec.slow_side());
    // MultiPathAlignModule asserts one token count divides the other (upsample or pool).
    if !(fast.is_multiple_of(slow) || slow.is_multiple_of(fast)) {
        return Err(bad(
            "input_image_size",
            format!("{s} gives {fast} fast and {slow} slow tokens; the reference needs one to divide the other"),
        ));
    }
    let cfg = LlavaConfig {
        model_type: ModelType::LlavaHr,
        // Original LLaVA marks the image with -200 between text chunks; the expanded prompt here
        // uses one id past the vocabulary, which no text token can take.
        image_token_index: text_config.vocab_size as u32,
        text_config,
        vision_config,
        projector_hidden_act: Activation::Gelu,
        vision_feature_select_strategy: FeatureSelect::Default,
        vision_feature_layer: FeatureLayer::One(-1),
        multimodal_projector_bias: true,
        tie_word_embeddings: hr.tie_word_embeddings,
        pad_token_id: hr.pad_token_id,
        image_grid_pinpoints: Vec::new(),
    };
    cfg.validate()?;
    Ok((cfg, spec))
}

/// The folder holding the CLIP tower's config: `dir/<mm_vision_tower>` when it exists, else the
/// hub cache's snapshot of that id.
pub fn clip_dir(dir: &Path, tower: &str) -> Result<PathBuf> {
    let local = dir.join(tower);
    if local.join("config.json").is_file() {
        return Ok(local);
    }
    let cached = hf_hub::Cache::from_env().model(tower.to_string()).get("config.json");
    cached.and_then(|p| p.parent().map(Path::to_path_buf)).ok_or_else(|| ModelError::MissingFile {
        path: local.join("config.json"),
        what: format!(
            "the CLIP config of mm_vision_tower {tower:?} (neither in the model directory nor in the hub cache)"
        ),
    })
}

/// A `CLIPVisionConfig`, or the `vision_config` of a full `CLIPConfig` (as openai's hub configs are).
fn clip_config(dir: &Path, tower: &str) -> Result<VisionConfig> {
    let path = clip_dir(dir, tower)?.join("config.json");
    let file = path.display().to_string();
    let value: serde_json::Value = serde_json::from_str(&read(&path)?).map_err(|e| ModelError::Config {
        file: file.clone(),
        field: ".".into(),
        message: e.to_string(),
    })?;
    let vision = value.get("vision_config").unwrap_or(&value);
    serde_path_to_error::deserialize(vision).map_err(|e| ModelError::Config {
        file,
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: usize) -> HrSpec {
        let fast_size = ((s as f64 / 32.0 * 14.0) as usize).max(336);
        HrSpec { image_size: s, fast_size, slow_tower: String::new(), pad_to_square: true, adapters: true }
    }

    #[test]
    fn published_sizes_give_the_papers_token_counts() {
        // 1024 px -> F = 448, 32x32 = 1,024 tokens; 1536 -> 672, 2,304; 768 -> 336, 576.
        assert_eq!((spec(1024).fast_size, spec(1024).tokens(14), spec(1024).slow_side()), (448, 1024, 32));
        assert_eq!((spec(1536).fast_size, spec(1536).tokens(14)), (672, 2304));
        assert_eq!((spec(768).fast_size, spec(768).tokens(14)), (336, 576));
        // Below 768 px the fast branch stays at 336 and the slow map is upsampled to it.
        assert_eq!((spec(384).fast_size, spec(384).slow_side()), (336, 12));
    }
}
