//! Deterministic random LLaVA-HR checkpoints (`fitprune demo-model --family hr`) in the published
//! layout: an original-LLaVA `config.json` with the multi-path fields, the CLIP config in the
//! sub-folder `mm_vision_tower` names, weights under LlavaLlamaForCausalLM's names (safetensors;
//! the published `.bin` pickles load the same way), and the demo tokenizer.
//!
//! Values come from the same per-tensor ChaCha streams as [`super::demo`], so a checkpoint is
//! byte-identical for a seed and preset. It is not bit-identical to the PyTorch-generated parity
//! checkpoint (torch's generator cannot be reproduced here), which is committed instead.

use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::demo::{write_json, write_safetensors, DemoOptions, DemoSummary, Init, Preset};
use super::demo_tokenizer::write_demo_tokenizer;
use super::{ModelError, Result};

/// The CLIP sub-folder name the demo's `mm_vision_tower` points at.
pub const DEMO_CLIP_DIR: &str = "clip-demo";

struct HrShape {
    /// `input_image_size` S.
    image: usize,
    clip_image: usize,
    patch: usize,
    v_hidden: usize,
    v_inter: usize,
    v_layers: usize,
    v_heads: usize,
    dims: [usize; 4],
    depths: [usize; 4],
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    vocab_target: usize,
}

impl HrShape {
    fn of(preset: Preset) -> Self {
        match preset {
            // S = 256, F = max(256 / 32 * 4, 32) = 32: an 8x8 grid (64 tokens), no resampling.
            Preset::Tiny => HrShape {
                image: 256,
                clip_image: 32,
                patch: 4,
                v_hidden: 32,
                v_inter: 64,
                v_layers: 4,
                v_heads: 2,
                dims: [8, 16, 24, 32],
                depths: [1, 1, 2, 1],
                hidden: 128,
                inter: 256,
                layers: 4,
                heads: 4,
                vocab_target: 512,
            },
            // The published geometry: S = 1024, CLIP 14-px patches at 336 -> F = 448, 1,024 tokens.
            // (`write_demo_model` refuses the LLaVA-1.5-7B preset for HR before this.)
            Preset::Bench | Preset::Llava7b => HrShape {
                image: 1024,
                clip_image: 336,
                patch: 14,
                v_hidden: 256,
                v_inter: 1024,
                v_layers: 4,
                v_heads: 4,
                dims: [32, 64, 128, 256],
                depths: [1, 1, 1, 1],
                hidden: 1024,
                inter: 2816,
                layers: 8,
                heads: 16,
                vocab_target: 1000,
            },
        }
    }
}

/// Writes an HR demo checkpoint into `dir`.
pub fn write_demo_hr(dir: &Path, opts: &DemoOptions) -> Result<DemoSummary> {
    let s = HrShape::of(opts.preset);
    let kv_heads = opts.kv_heads.unwrap_or(s.heads);
    if kv_heads == 0 || !s.heads.is_multiple_of(kv_heads) {
        return Err(ModelError::InvalidInput(format!("--kv-heads {kv_heads} must divide {} heads", s.heads)));
    }
    let clip_dir = dir.join(DEMO_CLIP_DIR);
    std::fs::create_dir_all(&clip_dir).map_err(|source| ModelError::Io { path: clip_dir.clone(), source })?;
    let tok = write_demo_tokenizer(dir, s.vocab_target).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let vocab = tok.vocab_size.div_ceil(64) * 64;
    let config = json!({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "vocab_size": vocab, "hidden_size": s.hidden, "intermediate_size": s.inter,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
        "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true,
        "freeze_vision": false, "image_aspect_ratio": "pad", "input_image_size": s.image,
        "is_multipath_encoder": true, "mm_hidden_size": s.v_hidden, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": false, "mm_use_im_start_end": false, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": DEMO_CLIP_DIR,
        "vision_tower_slow": "convnext_large_mlp.clip_laion2b_ft_320", "use_mm_proj": true
    });
    write_json(dir, "config.json", &config)?;
    let clip = json!({
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
        "hidden_size": s.v_hidden, "intermediate_size": s.v_inter, "num_hidden_layers": s.v_layers,
        "num_attention_heads": s.v_heads, "image_size": s.clip_image, "patch_size": s.patch,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3
    });
    write_json(&clip_dir, "config.json", &clip)?;
    write_json(
        dir,
        "generation_config.json",
        &json!({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}),
    )?;
    let specs = tensor_specs(&s, vocab, kv_heads);
    let tensors: Vec<(String, Tensor)> = specs
        .into_iter()
        .map(|(name, shape, init)| Ok((name.clone(), init.sample(&shape, opts.seed, &name)?)))
        .collect::<Result<_>>()?;
    let parameters = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    write_safetensors(dir, tensors, opts.shards.max(1))?;
    let fast = ((s.image as f64 / 32.0 * s.patch as f64) as usize).max(s.clip_image) / s.patch;
    Ok(DemoSummary { parameters, image_tokens: fast * fast, vocab_size: vocab })
}

/// Names (as LlavaLlamaForCausalLM saves them), shapes and initialisations.
fn tensor_specs(s: &HrShape, vocab: usize, kv_heads: usize) -> Vec<(String, Vec<usize>, Init)> {
    let mut sp = Specs(Vec::new());
    let hd = s.hidden / s.heads;
    sp.add("model.embed_tokens.weight".into(), vec![vocab, s.hidden], Init::Normal(0.5));
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        sp.add(format!("{p}.self_attn.q_proj.weight"), vec![s.heads * hd, s.hidden], Init::Fan(1.6));
        sp.add(format!("{p}.self_attn.k_proj.weight"), vec![kv_heads * hd, s.hidden], Init::Fan(1.6));
        sp.add(format!("{p}.self_attn.v_proj.weight"), vec![kv_heads * hd, s.hidden], Init::Fan(1.0));
        sp.add(format!("{p}.self_attn.o_proj.weight"), vec![s.hidden, s.heads * hd], Init::Fan(1.0));
        sp.add(format!("{p}.mlp.gate_proj.weight"), vec![s.inter, s.hidden], Init::Fan(1.0));
        sp.add(format!("{p}.mlp.up_proj.weight"), vec![s.inter, s.hidden], Init::Fan(1.0));
        sp.add(format!("{p}.mlp.down_proj.weight"), vec![s.hidden, s.inter], Init::Fan(1.0));
        sp.add(format!("{p}.input_layernorm.weight"), vec![s.hidden], Init::Norm);
        sp.add(format!("{p}.post_attention_layernorm.weight"), vec![s.hidden], Init::Norm);
    }
    sp.add("model.norm.weight".into(), vec![s.hidden], Init::Norm);
    sp.add("lm_head.weight".into(), vec![vocab, s.hidden], Init::Fan(2.0));

    let (d, side) = (s.v_hidden, s.clip_image / s.patch);
    let vm = "model.vision_tower.fast_vision_tower.vision_tower.vision_model";
    sp.add(format!("{vm}.embeddings.patch_embedding.weight"), vec![d, 3, s.patch, s.patch], Init::Fan(1.0));
    sp.add(format!("{vm}.embeddings.class_embedding"), vec![d], Init::Normal(1.0));
    sp.add(format!("{vm}.embeddings.position_embedding.weight"), vec![side * side + 1, d], Init::Normal(0.5));
    sp.norm(format!("{vm}.pre_layrnorm"), d);
    sp.norm(format!("{vm}.post_layernorm"), d);
    for l in 0..s.v_layers {
        let p = format!("{vm}.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            sp.linear(format!("{p}.self_attn.{proj}"), vec![d, d]);
        }
        sp.linear(format!("{p}.mlp.fc1"), vec![s.v_inter, d]);
        sp.linear(format!("{p}.mlp.fc2"), vec![d, s.v_inter]);
        sp.norm(format!("{p}.layer_norm1"), d);
        sp.norm(format!("{p}.layer_norm2"), d);
    }
    let cn = "model.vision_tower.slow_vision_tower.vision_tower";
    sp.linear(format!("{cn}.stem.0"), vec![s.dims[0], 3, 4, 4]);
    sp.norm(format!("{cn}.stem.1"), s.dims[0]);
    let mut prev = s.dims[0];
    for (i, (&c, &depth)) in s.dims.iter().zip(&s.depths).enumerate() {
        let p = format!("{cn}.stages.{i}");
        if i > 0 {
            sp.norm(format!("{p}.downsample.0"), prev);
            sp.linear(format!("{p}.downsample.1"), vec![c, prev, 2, 2]);
        }
        for b in 0..depth {
            let q = format!("{p}.blocks.{b}");
            sp.linear(format!("{q}.conv_dw"), vec![c, 1, 7, 7]);
            sp.norm(format!("{q}.norm"), c);
            sp.linear(format!("{q}.mlp.fc1"), vec![4 * c, c]);
            sp.linear(format!("{q}.mlp.fc2"), vec![c, 4 * c]);
            // Layer scale: far from timm's 1e-6 init so the blocks matter.
            sp.add(format!("{q}.weight"), vec![c], Init::Norm);
        }
        prev = c;
    }
    // timm keeps the classifier head; the published checkpoint carries it, unread.
    sp.norm(format!("{cn}.head.norm"), prev);
    sp.linear(format!("{cn}.head.pre_logits.fc"), vec![prev, prev]);
    sp.linear(format!("{cn}.head.fc"), vec![10, prev]);
    for k in 0..3 {
        let p = format!("model.vision_tower.align_stages_latent.{k}");
        sp.linear(format!("{p}.slow_conv"), vec![prev, prev, 1, 1]);
        sp.linear(format!("{p}.slow_proj"), vec![d, prev, 1, 1]);
        sp.linear(format!("{p}.fast_conv"), vec![d, 1, 7, 7]);
        sp.linear(format!("{p}.fast_proj"), vec![d, d, 1, 1]);
        sp.linear(format!("{p}.gate.0"), vec![d / 2, 2 * d]);
        sp.linear(format!("{p}.gate.2"), vec![1, d / 2]);
    }
    sp.linear("model.vision_tower.align_stages.0.fast_proj".into(), vec![d, d]);
    sp.linear("model.vision_tower.align_stages.0.slow_proj".into(), vec![d, prev]);
    sp.linear("model.mm_projector.0".into(), vec![s.hidden, d]);
    sp.linear("model.mm_projector.2".into(), vec![s.hidden, s.hidden]);
    sp.0
}

/// Tensor specs under construction.
struct Specs(Vec<(String, Vec<usize>, Init)>);

impl Specs {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.0.push((name, shape, init));
    }

    /// A LayerNorm's weight and bias.
    fn norm(&mut self, p: String, n: usize) {
        self.add(format!("{p}.weight"), vec![n], Init::Norm);
        self.add(format!("{p}.bias"), vec![n], Init::Normal(0.02));
    }

    /// A linear or conv weight of `shape` (out first) and its bias.
    fn linear(&mut self, p: String, shape: Vec<usize>) {
        let out = shape[0];
        self.add(format!("{p}.weight"), shape, Init::Fan(1.0));
        self.add(format!("{p}.bias"), vec![out], Init::Normal(0.02));
    }
}
