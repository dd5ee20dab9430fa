//! Family selection and hub-sparse LLaVA-NeXT configs (Vicuna and Mistral backbones).

use super::*;

/// config.json of llava-hf/llava-v1.6-mistral-7b-hf as published (fields omitted as on the hub).
const NEXT_MISTRAL_7B: &str = r#"{
  "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
    "architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
    "torch_dtype": "bfloat16", "vocab_size": 32064},
  "torch_dtype": "float16", "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": true,
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
    "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
    "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
}"#;

/// config.json of llava-hf/llava-v1.6-vicuna-7b-hf: the 1.5 Vicuna text config plus the pinpoints.
const NEXT_VICUNA_7B: &str = r#"{
  "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "image_token_index": 32000, "model_type": "llava_next", "pad_token_id": 0,
  "projector_hidden_act": "gelu",
  "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05,
    "torch_dtype": "float16", "vocab_size": 32064},
  "torch_dtype": "float16", "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": true,
  "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
    "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
    "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
  "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
}"#;

#[test]
fn mistral_next_config_takes_mistral_values_and_defaults() {
    let c = LlavaConfig::from_json_str(NEXT_MISTRAL_7B).unwrap();
    assert_eq!(c.model_type, ModelType::LlavaNext);
    let t = &c.text_config;
    assert_eq!(t.arch, TextArch::Mistral);
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (4096, 14336, 32));
    assert_eq!((t.num_attention_heads, t.kv_heads(), t.head_dim()), (32, 8, 128));
    assert_eq!(t.rope_theta, 1e6);
    // Explicit null: no window (a missing field would be MistralConfig's 4096).
    assert_eq!(t.sliding_window, None);
    assert_eq!(t.max_position_embeddings, 32768);
    assert_eq!(c.image_grid_pinpoints, vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]);
    assert_eq!(c.image_feature_count(), 576);

    let sparse = NEXT_MISTRAL_7B
        .replace("\"sliding_window\": null,", "")
        .replace("\"num_key_value_heads\": 8,", "")
        .replace("\"intermediate_size\": 14336,", "");
    let t = LlavaConfig::from_json_str(&sparse).unwrap().text_config;
    assert_eq!((t.sliding_window, t.kv_heads(), t.intermediate_size), (Some(4096), 8, 14336));
}

#[test]
fn vicuna_next_config_is_llama_with_default_pinpoints_when_omitted() {
    let c = LlavaConfig::from_json_str(NEXT_VICUNA_7B).unwrap();
    assert_eq!((c.model_type, c.text_config.arch), (ModelType::LlavaNext, TextArch::Llama));
    let t = &c.text_config;
    assert_eq!((t.intermediate_size, t.kv_heads(), t.rope_theta, t.sliding_window), (11008, 32, 10000.0, None));
    let no_pins = NEXT_VICUNA_7B
        .replace("\"image_grid_pinpoints\": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],", "");
    assert_eq!(LlavaConfig::from_json_str(&no_pins).unwrap().image_grid_pinpoints, d::pinpoints());
}

#[test]
fn unknown_families_are_refused_naming_what_was_found() {
    let s = NEXT_VICUNA_7B.replace("\"model_type\": \"llava_next\"", "\"model_type\": \"llava_onevision\"");
    let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
    assert!(e.contains("llava_onevision") && e.contains("\"llava\"") && e.contains("\"llava_next\""), "{e}");
    let s = NEXT_VICUNA_7B.replace("\"model_type\": \"llava_next\",", "");
    let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
    assert!(e.contains("model_type") && e.contains("absent"), "{e}");
    let s = NEXT_VICUNA_7B.replace("\"model_type\": \"llama\"", "\"model_type\": \"qwen2\"");
    let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
    assert!(e.contains("text_config.model_type") && e.contains("qwen2"), "{e}");
}

#[test]
fn next_rejects_pinpoints_that_do_not_tile_and_the_full_strategy() {
    let s = NEXT_VICUNA_7B.replace("[1008, 336]", "[1000, 336]");
    let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
    assert!(e.contains("image_grid_pinpoints") && e.contains("1000"), "{e}");
    let s = NEXT_VICUNA_7B.replace("\"select_strategy\": \"default\"", "\"select_strategy\": \"full\"");
    let s =
        s.replace("\"vision_feature_select_strategy\": \"default\"", "\"vision_feature_select_strategy\": \"full\"");
    let e = LlavaConfig::from_json_str(&s).unwrap_err().to_string();
    assert!(e.contains("vision_feature_select_strategy"), "{e}");
    // LLaVA-1.5 ignores the pinpoints entirely.
    let s = NEXT_VICUNA_7B
        .replace("\"model_type\": \"llava_next\"", "\"model_type\": \"llava\"")
        .replace("[1008, 336]", "[1000, 336]");
    assert_eq!(LlavaConfig::from_json_str(&s).unwrap().model_type, ModelType::Llava);
}
