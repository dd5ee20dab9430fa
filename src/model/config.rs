//! LLaVA `config.json`: serde structs with transformers' defaults, turned into plain runtime configs.
//!
//! Hub configs (e.g. `llava-hf/llava-1.5-7b-hf`) omit every field that equals the transformers
//! default, so each default below mirrors `LlamaConfig`, `CLIPVisionConfig` and `LlavaConfig`.

use serde::Deserialize;

use super::ModelError;

/// Activation functions that appear in LLaVA-family configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU / swish (Llama MLP).
    #[serde(alias = "swish")]
    Silu,
    /// Exact GELU, erf form (the projector's `gelu`).
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(alias = "gelu_new", alias = "gelu_fast")]
    GeluPytorchTanh,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// Rectified linear unit.
    Relu,
}

impl Activation {
    /// Applies the activation element-wise.
    pub fn forward(self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::GeluPytorchTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
        }
    }
}

/// Which vision features feed the projector (`vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSelect {
    /// Drop the CLS token (LLaVA-1.5).
    #[default]
    Default,
    /// Keep every token, CLS included.
    Full,
}

/// `vision_feature_layer`: one hidden-state index or several concatenated along features.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayer {
    /// A single index into HF's `hidden_states` tuple (negative counts from the end).
    One(i64),
    /// Several indices whose features are concatenated (newer LLaVA variants).
    Many(Vec<i64>),
}

impl Default for FeatureLayer {
    fn default() -> Self {
        Self::One(-2)
    }
}

impl FeatureLayer {
    /// The indices as a list.
    pub fn indices(&self) -> Vec<i64> {
        match self {
            Self::One(i) => vec![*i],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` as transformers writes it; only the unscaled form is supported so far.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (newer) or `type` (older configs).
    #[serde(alias = "type")]
    pub rope_type: String,
}

/// The decoder architecture (`text_config.model_type`); both run on [`super::llama::Llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TextArch {
    /// `LlamaForCausalLM` (Vicuna, LLaVA-1.5, NeXT-Vicuna, NeXT-34B).
    #[default]
    Llama,
    /// `MistralForCausalLM`: Llama plus an optional sliding attention window.
    Mistral,
}

/// `text_config` (a `LlamaConfig` or `MistralConfig`; a Mistral config's missing fields take
/// `MistralConfig`'s defaults, filled in by [`LlavaConfig::from_json_str`]).
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    /// `model_type` of the text config; transformers assumes `llama` when it is absent.
    #[serde(default, rename = "model_type")]
    pub arch: TextArch,
    #[serde(default = "d::vocab")]
    pub vocab_size: usize,
    #[serde(default = "d::hidden")]
    pub hidden_size: usize,
    #[serde(default = "d::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::heads")]
    pub num_attention_heads: usize,
    /// `None` means multi-head attention (= `num_attention_heads`).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// `None` means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "d::silu")]
    pub hidden_act: Activation,
    #[serde(default = "d::max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d::rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's attention window: a query sees the keys at most `sliding_window - 1`
    /// positions before it (`None`: full causal attention, and always for Llama).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "d::bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "d::eos")]
    pub eos_token_id: Option<EosTokens>,
}

/// `eos_token_id`: one id or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum EosTokens {
    /// A single end-of-sequence id.
    One(u32),
    /// Several ids, any of which ends generation.
    Many(Vec<u32>),
}

impl EosTokens {
    /// The ids as a list.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(i) => vec![*i],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `vision_config` (a `CLIPVisionConfig`, with LLaVA's defaults when the whole block is absent).
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d::v_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d::v_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d::v_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::v_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d::channels")]
    pub num_channels: usize,
    #[serde(default = "d::v_image")]
    pub image_size: usize,
    #[serde(default = "d::v_patch")]
    pub patch_size: usize,
    #[serde(default = "d::quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d::ln_eps")]
    pub layer_norm_eps: f64,
}

/// The model family, from the top-level `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    /// `LlavaForConditionalGeneration` (LLaVA-1.5): one fixed-size tile per image.
    Llava,
    /// `LlavaNextForConditionalGeneration` (LLaVA-NeXT / v1.6): anyres tiles per image.
    LlavaNext,
    /// LLaVA-HR (`LlavaLlamaForCausalLM` with `is_multipath_encoder`): a dual-branch encoder.
    /// Never read from `model_type` (HR says `llava`); see [`super::hr_config`].
    #[serde(skip)]
    LlavaHr,
}

/// Top-level `LlavaConfig` / `LlavaNextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    /// Which family the checkpoint is; anything but `llava` or `llava_next` is refused.
    pub model_type: ModelType,
    #[serde(default = "d::text")]
    pub text_config: TextConfig,
    #[serde(default = "d::vision")]
    pub vision_config: VisionConfig,
    #[serde(default = "d::image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "d::gelu")]
    pub projector_hidden_act: Activation,
    #[serde(default)]
    pub vision_feature_select_strategy: FeatureSelect,
    #[serde(default)]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default = "d::yes")]
    pub multimodal_projector_bias: bool,
    /// Top-level `tie_word_embeddings` (LLaVA's own; overrides the text config's when set).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// NeXT's grid resolutions, each (height, width) in pixels (ignored for LLaVA-1.5).
    #[serde(default = "d::pinpoints")]
    pub image_grid_pinpoints: Vec<(u32, u32)>,
}

impl LlavaConfig {
    /// Parses `config.json`; errors name the offending field.
    pub fn from_json_str(s: &str) -> Result<Self, ModelError> {
        let bad = |field: String, message: String| ModelError::Config { file: "config.json".into(), field, message };
        let mut value: serde_json::Value = serde_json::from_str(s).map_err(|e| bad(".".into(), e.to_string()))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("llava" | "llava_next") if value.get("is_multipath_encoder").is_none() => {}
            Some("llava") => {
                return Err(bad(
                    "is_multipath_encoder".into(),
                    "a LLaVA-HR config needs its model directory (the CLIP config lives beside it); \
                     load it with LlavaModel::load"
                        .into(),
                ))
            }
            _ => {
                let found = value.get("model_type").map_or("absent".to_string(), |v| v.to_string());
                return Err(bad(
                    "model_type".into(),
                    format!("{found} is not a supported model type (supported: \"llava\", \"llava_next\")"),
                ));
            }
        }
        fill_mistral_defaults(&mut value);
        let cfg: Self =
            serde_path_to_error::deserialize(&value).map_err(|e| bad(e.path().to_string(), e.inner().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub(super) fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, message: String| ModelError::Config {
            file: "config.json".into(),
            field: field.into(),
            message,
        };
        let t = &self.text_config;
        let heads_divide = t.num_attention_heads > 0 && t.hidden_size.is_multiple_of(t.num_attention_heads);
        if t.num_attention_heads == 0 || (!heads_divide && t.head_dim.is_none()) {
            return Err(bad(
                "text_config.num_attention_heads",
                format!("hidden_size {} is not divisible by {} heads", t.hidden_size, t.num_attention_heads),
            ));
        }
        let kv = t.num_key_value_heads.unwrap_or(t.num_attention_heads);
        if kv == 0 || !t.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "text_config.num_key_value_heads",
                format!("{} attention heads are not a multiple of {kv} key/value heads", t.num_attention_heads),
            ));
        }
        if let Some(rs) = &t.rope_scaling {
            if rs.rope_type != "default" {
                return Err(bad(
                    "text_config.rope_scaling.rope_type",
                    format!("rope scaling {:?} is not supported yet", rs.rope_type),
                ));
            }
        }
        let v = &self.vision_config;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(bad(
                "vision_config.patch_size",
                format!("image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size),
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(bad(
                "vision_config.num_attention_heads",
                format!("hidden_size {} is not divisible by {} heads", v.hidden_size, v.num_attention_heads),
            ));
        }
        if self.model_type == ModelType::LlavaNext {
            self.validate_next()?;
        }
        if t.sliding_window == Some(0) {
            return Err(bad("text_config.sliding_window", "must be null or positive".into()));
        }
        for idx in self.vision_feature_layer.indices() {
            if resolve_hidden_state_index(idx, v.num_hidden_layers).is_none() {
                return Err(bad(
                    "vision_feature_layer",
                    format!("{idx} is outside the {} hidden states", v.num_hidden_layers + 1),
                ));
            }
        }
        Ok(())
    }

    /// NeXT-only checks: pinpoints that tile exactly, and the `default` select strategy (the
    /// grid view in `pack_image_features` assumes side x side features per tile).
    fn validate_next(&self) -> Result<(), ModelError> {
        let bad = |field: &str, message: String| ModelError::Config {
            file: "config.json".into(),
            field: field.into(),
            message,
        };
        let tile = self.vision_config.image_size as u32;
        if self.image_grid_pinpoints.is_empty() {
            return Err(bad("image_grid_pinpoints", "must list at least one (height, width)".into()));
        }
        if let Some(&(h, w)) =
            self.image_grid_pinpoints.iter().find(|&&(h, w)| h == 0 || w == 0 || h % tile != 0 || w % tile != 0)
        {
            return Err(bad(
                "image_grid_pinpoints",
                format!("[{h}, {w}] is not a positive multiple of the {tile}-px tile"),
            ));
        }
        if self.vision_feature_select_strategy != FeatureSelect::Default {
            return Err(bad(
                "vision_feature_select_strategy",
                "LLaVA-NeXT supports only \"default\" (the packed grid drops CLS)".into(),
            ));
        }
        Ok(())
    }

    /// Whether the LM head shares the token embedding matrix.
    pub fn ties_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(self.text_config.tie_word_embeddings)
    }

    /// Features of one vision-tower tile (576 for 336px / 14): a whole LLaVA-1.5 image, or the
    /// base tile of a NeXT image.
    pub fn image_feature_count(&self) -> usize {
        let side = self.vision_config.image_size / self.vision_config.patch_size;
        let cls = usize::from(self.vision_feature_select_strategy == FeatureSelect::Full);
        side * side + cls
    }
}

impl TextConfig {
    /// Key/value heads (GQA), defaulting to the attention head count.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Maps an HF `hidden_states` index (0 = embeddings output, negative from the end) onto
/// the number of encoder layers that must run to produce it.
pub fn resolve_hidden_state_index(idx: i64, num_layers: usize) -> Option<usize> {
    let len = num_layers as i64 + 1;
    let resolved = if idx < 0 { len + idx } else { idx };
    (0..len).contains(&resolved).then_some(resolved as usize)
}

/// `MistralConfig`'s defaults where they differ from `LlamaConfig`'s, inserted into a
/// `text_config` whose `model_type` is `mistral` for the fields it omits (hub configs do).
fn fill_mistral_defaults(config: &mut serde_json::Value) {
    let Some(text) = config.get_mut("text_config").and_then(|t| t.as_object_mut()) else {
        return;
    };
    if text.get("model_type").and_then(|m| m.as_str()) != Some("mistral") {
        return;
    }
    let defaults = [
        ("intermediate_size", serde_json::json!(14336)),
        ("num_key_value_heads", serde_json::json!(8)),
        ("max_position_embeddings", serde_json::json!(4096 * 32)),
        ("sliding_window", serde_json::json!(4096)),
    ];
    for (key, value) in defaults {
        text.entry(key).or_insert(value);
    }
}

/// transformers' defaults, one function per serde default.
mod d {
    use super::*;
    pub fn vocab() -> usize {
        32000
    }
    pub fn hidden() -> usize {
        4096
    }
    pub fn intermediate() -> usize {
        11008
    }
    pub fn layers() -> usize {
        32
    }
    pub fn heads() -> usize {
        32
    }
    pub fn silu() -> Activation {
        Activation::Silu
    }
    pub fn gelu() -> Activation {
        Activation::Gelu
    }
    pub fn quick_gelu() -> Activation {
        Activation::QuickGelu
    }
    pub fn max_pos() -> usize {
        2048
    }
    pub fn rms_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn bos() -> Option<u32> {
        Some(1)
    }
    pub fn eos() -> Option<EosTokens> {
        Some(EosTokens::One(2))
    }
    // LlavaConfig builds its default vision tower as CLIP ViT-L/14-336.
    pub fn v_hidden() -> usize {
        1024
    }
    pub fn v_intermediate() -> usize {
        4096
    }
    pub fn v_layers() -> usize {
        24
    }
    pub fn v_heads() -> usize {
        16
    }
    pub fn channels() -> usize {
        3
    }
    pub fn v_image() -> usize {
        336
    }
    pub fn v_patch() -> usize {
        14
    }
    pub fn ln_eps() -> f64 {
        1e-5
    }
    pub fn image_token() -> u32 {
        32000
    }
    pub fn yes() -> bool {
        true
    }
    /// `LlavaNextConfig`'s default `image_grid_pinpoints`.
    pub fn pinpoints() -> Vec<(u32, u32)> {
        vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    }
    pub fn text() -> TextConfig {
        serde_json::from_str("{}").expect("empty text config deserialises with defaults")
    }
    pub fn vision() -> VisionConfig {
        serde_json::from_str("{}").expect("empty vision config deserialises with defaults")
    }
}

#[cfg(test)]
mod next_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact config.json of llava-hf/llava-1.5-7b-hf (hub, fields omitted as published).
    const LLAVA_15_7B: &str = r#"{
      "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
      "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
      "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064},
      "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn hub_config_takes_transformers_defaults() {
        let c = LlavaConfig::from_json_str(LLAVA_15_7B).unwrap();
        let t = &c.text_config;
        assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (4096, 11008, 32));
        assert_eq!((t.num_attention_heads, t.kv_heads(), t.head_dim()), (32, 32, 128));
        assert_eq!(t.hidden_act, Activation::Silu);
        assert_eq!(t.rope_theta, 10000.0);
        assert_eq!(t.rms_norm_eps, 1e-5);
        assert_eq!(t.vocab_size, 32064);
        assert_eq!(c.vision_config.hidden_act, Activation::QuickGelu);
        assert_eq!(c.vision_config.layer_norm_eps, 1e-5);
        assert_eq!(c.projector_hidden_act, Activation::Gelu);
        assert_eq!(c.vision_feature_layer, FeatureLayer::One(-2));
        assert_eq!(c.image_feature_count(), 576);
        assert!(!c.ties_word_embeddings());
        assert_eq!(t.eos_token_id.as_ref().map(EosTokens::ids), Some(vec![2]));
    }

    #[test]
    fn hidden_state_index_counts_embeddings_as_zero() {
        // 24 layers -> 25 hidden states; [-2] is the output of the 23rd layer.
        assert_eq!(resolve_hidden_state_index(-2, 24), Some(23));
        assert_eq!(resolve_hidden_state_index(-1, 24), Some(24));
        assert_eq!(resolve_hidden_state_index(0, 24), Some(0));
        assert_eq!(resolve_hidden_state_index(-26, 24), None);
        assert_eq!(resolve_hidden_state_index(25, 24), None);
    }

    #[test]
    fn full_strategy_keeps_cls() {
        let s = LLAVA_15_7B
            .replace("\"vision_feature_select_strategy\": \"default\"", "\"vision_feature_select_strategy\": \"full\"");
        assert_eq!(LlavaConfig::from_json_str(&s).unwrap().image_feature_count(), 577);
    }

    #[test]
    fn errors_name_the_field() {
        let s = LLAVA_15_7B.replace("\"projector_hidden_act\": \"gelu\"", "\"projector_hidden_act\": \"swiglu9\"");
        let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("projector_hidden_act"), "{e}");
        let s = LLAVA_15_7B.replace("\"num_hidden_layers\": 24", "\"num_hidden_layers\": \"many\"");
        let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
        assert!(e.contains("vision_config.num_hidden_layers"), "{e}");
        let s = LLAVA_15_7B.replace("\"vision_feature_layer\": -2", "\"vision_feature_layer\": -40");
        let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
        assert!(e.contains("vision_feature_layer"), "{e}");
    }

    #[test]
    fn gqa_must_divide_heads() {
        let s = LLAVA_15_7B.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 1e-05, \"num_key_value_heads\": 5");
        let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
