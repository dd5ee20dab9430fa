//! Deterministic random LLaVA checkpoints (`fitprune demo-model`): test fixtures and the
//! built-in demo model. The output is a complete llava-hf directory that transformers loads
//! (`LlavaForConditionalGeneration`, or `LlavaNextForConditionalGeneration` for `--family next`,
//! with a Llama or Mistral decoder).
//!
//! Weights are drawn per tensor from a ChaCha stream seeded by (seed, tensor name), so a
//! checkpoint is byte-identical for a given seed and shape whatever the write order.
//! Query/key projections get a larger gain so attention is peaked rather than uniform —
//! FitPrune's scores would be meaningless on uniform attention.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::json;

use super::config::FeatureSelect;
use super::demo_tokenizer::write_demo_tokenizer;
use super::weights::TensorLayout;
use super::{ModelError, Result};

/// Size presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 96px / 8px patches = 144 image tokens, 4-layer 128-wide GQA decoder: fast tests.
    Tiny,
    /// 336px / 14px = 576 image tokens, 8-layer 1024-wide decoder: prefill dominated by matmuls.
    Bench,
    /// LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336, 32-layer 4096-wide Vicuna, 32,064-row vocabulary)
    /// with random weights in bf16 (about 14 GB): GPU benchmarks on the real model's arithmetic.
    #[value(name = "llava-1.5-7b")]
    Llava7b,
}

/// Which model family to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoFamily {
    /// LLaVA-1.5 (`model_type` `llava`).
    Llava,
    /// LLaVA-NeXT (`model_type` `llava_next`): anyres tiles, `image_newline`.
    Next,
    /// LLaVA-HR (original-LLaVA layout, `is_multipath_encoder`): CLIP + ConvNeXt branches.
    Hr,
}

/// Which decoder to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoBackbone {
    /// `LlamaForCausalLM`, rope_theta 10000.
    Llama,
    /// `MistralForCausalLM`, rope_theta 1e6, `sliding_window` from the options.
    Mistral,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Model family.
    pub family: DemoFamily,
    /// Decoder architecture.
    pub backbone: DemoBackbone,
    /// Mistral's `sliding_window` (`None` writes null); ignored for Llama.
    pub sliding_window: Option<usize>,
    /// Size preset.
    pub preset: Preset,
    /// RNG seed for all weights.
    pub seed: u64,
    /// Override the decoder's key/value head count (GQA/MQA variants).
    pub kv_heads: Option<usize>,
    /// `vision_feature_select_strategy`.
    pub select: FeatureSelect,
    /// Tensor naming.
    pub layout: TensorLayout,
    /// Write this many safetensors shards plus an index (1 = a single `model.safetensors`).
    pub shards: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            family: DemoFamily::Llava,
            backbone: DemoBackbone::Llama,
            sliding_window: None,
            preset: Preset::Tiny,
            seed: 0,
            kv_heads: None,
            select: FeatureSelect::Default,
            layout: TensorLayout::Hub,
            shards: 1,
        }
    }
}

/// Shapes of a generated checkpoint.
#[derive(Debug, Clone)]
struct Shape {
    image: usize,
    patch: usize,
    v_hidden: usize,
    v_inter: usize,
    v_layers: usize,
    v_heads: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab_target: usize,
    /// LM-head rows when the real model's vocabulary is larger than the demo tokenizer's.
    vocab_rows: usize,
    /// Stored dtype (safetensors and `torch_dtype`).
    dtype: DType,
}

impl Shape {
    fn of(opts: &DemoOptions) -> Self {
        let s = match (opts.preset, opts.family) {
            // NeXT tiny: 32-px tiles of 8-px patches, so a 2x2 grid stays near a hundred tokens.
            (Preset::Tiny, DemoFamily::Next) => Shape { image: 32, ..Self::of(&DemoOptions::default()) },
            (Preset::Tiny, DemoFamily::Llava | DemoFamily::Hr) => Shape {
                image: 96,
                patch: 8,
                v_hidden: 64,
                v_inter: 128,
                v_layers: 3,
                v_heads: 4,
                hidden: 128,
                inter: 256,
                layers: 4,
                heads: 4,
                kv_heads: 2,
                vocab_target: 512,
                vocab_rows: 0,
                dtype: DType::F32,
            },
            (Preset::Bench, _) => Shape {
                image: 336,
                patch: 14,
                v_hidden: 256,
                v_inter: 1024,
                v_layers: 3,
                v_heads: 4,
                hidden: 1024,
                inter: 2816,
                layers: 8,
                heads: 16,
                kv_heads: 16,
                vocab_target: 1000,
                vocab_rows: 0,
                dtype: DType::F32,
            },
            // llava-hf/llava-1.5-7b-hf: 32,064 rows (32,002 tokens padded to a multiple of 64).
            (Preset::Llava7b, _) => Shape {
                image: 336,
                patch: 14,
                v_hidden: 1024,
                v_inter: 4096,
                v_layers: 24,
                v_heads: 16,
                hidden: 4096,
                inter: 11008,
                layers: 32,
                heads: 32,
                kv_heads: 32,
                vocab_target: 1000,
                vocab_rows: 32064,
                dtype: DType::BF16,
            },
        };
        Shape { kv_heads: opts.kv_heads.unwrap_or(s.kv_heads), ..s }
    }
}

/// A summary of what was written.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// Parameters over all tensors.
    pub parameters: usize,
    /// Image tokens per image (NeXT: of a square image of 2x2 tiles).
    pub image_tokens: usize,
    /// Vocabulary size of the LM head.
    pub vocab_size: usize,
}

/// Writes a complete demo checkpoint into `dir` (created if needed).
pub fn write_demo_model(dir: &Path, opts: &DemoOptions) -> Result<DemoSummary> {
    if opts.preset == Preset::Llava7b && opts.family != DemoFamily::Llava {
        return Err(ModelError::InvalidInput(
            "--preset llava-1.5-7b has LLaVA-1.5's shapes: use it with --family llava".into(),
        ));
    }
    if opts.family == DemoFamily::Hr {
        return super::demo_hr::write_demo_hr(dir, opts);
    }
    let s = Shape::of(opts);
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(ModelError::InvalidInput(format!("--kv-heads {} must divide {} heads", s.kv_heads, s.heads)));
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let tok = write_demo_tokenizer(dir, s.vocab_target).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    // Like llava-hf (32064 rows for a 32002-token tokenizer), pad the vocabulary to a multiple of 64.
    let vocab = (tok.vocab_size.div_ceil(64) * 64).max(s.vocab_rows);
    let torch_dtype = match s.dtype {
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let side = s.image / s.patch;
    let next = opts.family == DemoFamily::Next;
    let image_tokens = if next {
        // Base tile, 2x2 grid of side x side, one newline per row.
        side * side + 4 * side * side + 2 * side
    } else {
        side * side + usize::from(opts.select == FeatureSelect::Full)
    };
    let select = match opts.select {
        FeatureSelect::Default => "default",
        FeatureSelect::Full => "full",
    };
    let t = s.image;
    let pinpoints = json!([[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]]);
    let (text_type, rope_theta) = match opts.backbone {
        DemoBackbone::Llama => ("llama", 10000.0),
        DemoBackbone::Mistral => ("mistral", 1e6),
    };
    let mut text_config = json!({
        "model_type": text_type, "vocab_size": vocab, "hidden_size": s.hidden,
        "intermediate_size": s.inter, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "hidden_act": "silu", "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id, "tie_word_embeddings": false, "torch_dtype": torch_dtype
    });
    if opts.backbone == DemoBackbone::Mistral {
        text_config["sliding_window"] = json!(opts.sliding_window);
    }
    let mut config = json!({
        "architectures": [if next { "LlavaNextForConditionalGeneration" } else { "LlavaForConditionalGeneration" }],
        "model_type": if next { "llava_next" } else { "llava" },
        "image_token_index": tok.image_id,
        "pad_token_id": tok.pad_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": select,
        "image_seq_length": if next { side * side } else { image_tokens },
        "tie_word_embeddings": false,
        "torch_dtype": torch_dtype,
        "text_config": text_config,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": s.v_hidden,
            "intermediate_size": s.v_inter, "num_hidden_layers": s.v_layers,
            "num_attention_heads": s.v_heads, "image_size": s.image, "patch_size": s.patch,
            "projection_dim": s.v_hidden, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
        }
    });
    if next {
        config["image_grid_pinpoints"] = pinpoints.clone();
        config["use_image_newline_parameter"] = json!(true);
    }
    write_json(dir, "config.json", &config)?;
    let mut pre = json!({
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": true, "size": {"shortest_edge": s.image}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": s.image, "width": s.image},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": true
    });
    let processor_class = if next { "LlavaNextProcessor" } else { "LlavaProcessor" };
    if next {
        pre["image_processor_type"] = json!("LlavaNextImageProcessor");
        pre["processor_class"] = json!(processor_class);
        pre["image_grid_pinpoints"] = pinpoints;
        pre["do_pad"] = json!(true);
    }
    write_json(dir, "preprocessor_config.json", &pre)?;
    write_json(
        dir,
        "processor_config.json",
        &json!({
            "processor_class": processor_class, "image_token": "<image>", "patch_size": s.patch,
            "vision_feature_select_strategy": select, "num_additional_image_tokens": 1
        }),
    )?;
    write_json(
        dir,
        "generation_config.json",
        &json!({
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id
        }),
    )?;

    let mut tensors = random_tensors(&s, vocab, opts.seed)?;
    if next {
        // transformers initialises it as randn(hidden) / sqrt(hidden).
        let std = 1.0 / (s.hidden as f64).sqrt();
        let newline = Init::Normal(std).sample(&[s.hidden], opts.seed, "image_newline")?.to_dtype(s.dtype)?;
        tensors.push(("image_newline".into(), newline));
    }
    let parameters = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let renamed: Vec<(String, Tensor)> = tensors.into_iter().map(|(n, t)| (rename(&n, opts.layout), t)).collect();
    write_safetensors(dir, renamed, opts.shards.max(1))?;
    Ok(DemoSummary { parameters, image_tokens, vocab_size: vocab })
}

/// Hub-layout tensor names and shapes, then random values.
fn random_tensors(s: &Shape, vocab: usize, seed: u64) -> Result<Vec<(String, Tensor)>> {
    sample_all(tensor_specs(s, vocab), seed, s.dtype)
}

/// Hub-layout tensor names, shapes and initialisations.
fn tensor_specs(s: &Shape, vocab: usize) -> Vec<(String, Vec<usize>, Init)> {
    let mut specs: Vec<(String, Vec<usize>, Init)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init| specs.push((name, shape, init));
    let hd = s.hidden / s.heads;
    let lm = "language_model.model";
    add(format!("{lm}.embed_tokens.weight"), vec![vocab, s.hidden], Init::Normal(0.5));
    for l in 0..s.layers {
        let p = format!("{lm}.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), vec![s.heads * hd, s.hidden], Init::Fan(1.6));
        add(format!("{p}.self_attn.k_proj.weight"), vec![s.kv_heads * hd, s.hidden], Init::Fan(1.6));
        add(format!("{p}.self_attn.v_proj.weight"), vec![s.kv_heads * hd, s.hidden], Init::Fan(1.0));
        add(format!("{p}.self_attn.o_proj.weight"), vec![s.hidden, s.heads * hd], Init::Fan(1.0));
        add(format!("{p}.mlp.gate_proj.weight"), vec![s.inter, s.hidden], Init::Fan(1.0));
        add(format!("{p}.mlp.up_proj.weight"), vec![s.inter, s.hidden], Init::Fan(1.0));
        add(format!("{p}.mlp.down_proj.weight"), vec![s.hidden, s.inter], Init::Fan(1.0));
        add(format!("{p}.input_layernorm.weight"), vec![s.hidden], Init::Norm);
        add(format!("{p}.post_attention_layernorm.weight"), vec![s.hidden], Init::Norm);
    }
    add(format!("{lm}.norm.weight"), vec![s.hidden], Init::Norm);
    add("language_model.lm_head.weight".into(), vec![vocab, s.hidden], Init::Fan(2.0));

    let vm = "vision_tower.vision_model";
    let side = s.image / s.patch;
    add(format!("{vm}.embeddings.patch_embedding.weight"), vec![s.v_hidden, 3, s.patch, s.patch], Init::Fan(1.0));
    add(format!("{vm}.embeddings.class_embedding"), vec![s.v_hidden], Init::Normal(1.0));
    add(format!("{vm}.embeddings.position_embedding.weight"), vec![side * side + 1, s.v_hidden], Init::Normal(0.5));
    for (ln, n) in [("pre_layrnorm", s.v_hidden), ("post_layernorm", s.v_hidden)] {
        add(format!("{vm}.{ln}.weight"), vec![n], Init::Norm);
        add(format!("{vm}.{ln}.bias"), vec![n], Init::Normal(0.02));
    }
    for l in 0..s.v_layers {
        let p = format!("{vm}.encoder.layers.{l}");
        for (proj, gain) in [("q_proj", 1.6), ("k_proj", 1.6), ("v_proj", 1.0), ("out_proj", 1.0)] {
            add(format!("{p}.self_attn.{proj}.weight"), vec![s.v_hidden, s.v_hidden], Init::Fan(gain));
            add(format!("{p}.self_attn.{proj}.bias"), vec![s.v_hidden], Init::Normal(0.02));
        }
        add(format!("{p}.mlp.fc1.weight"), vec![s.v_inter, s.v_hidden], Init::Fan(1.0));
        add(format!("{p}.mlp.fc1.bias"), vec![s.v_inter], Init::Normal(0.02));
        add(format!("{p}.mlp.fc2.weight"), vec![s.v_hidden, s.v_inter], Init::Fan(1.0));
        add(format!("{p}.mlp.fc2.bias"), vec![s.v_hidden], Init::Normal(0.02));
        for ln in ["layer_norm1", "layer_norm2"] {
            add(format!("{p}.{ln}.weight"), vec![s.v_hidden], Init::Norm);
            add(format!("{p}.{ln}.bias"), vec![s.v_hidden], Init::Normal(0.02));
        }
    }
    let mp = "multi_modal_projector";
    add(format!("{mp}.linear_1.weight"), vec![s.hidden, s.v_hidden], Init::Fan(1.0));
    add(format!("{mp}.linear_1.bias"), vec![s.hidden], Init::Normal(0.02));
    add(format!("{mp}.linear_2.weight"), vec![s.hidden, s.hidden], Init::Fan(1.0));
    add(format!("{mp}.linear_2.bias"), vec![s.hidden], Init::Normal(0.02));
    specs
}

/// Samples every tensor, spread over the CPU's threads: a 7B checkpoint is 7 billion draws.
/// Each tensor's stream is seeded by its name, so the split changes nothing in the output.
fn sample_all(specs: Vec<(String, Vec<usize>, Init)>, seed: u64, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(specs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let sampled: Vec<Result<Vec<(usize, Tensor)>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((name, shape, init)) = specs.get(i) else { break };
                        done.push((i, init.sample(shape, seed, name)?.to_dtype(dtype)?));
                    }
                    Ok(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(ModelError::InvalidInput("a sampling thread panicked".into()))))
            .collect()
    });
    let mut tensors: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
    for part in sampled {
        for (i, t) in part? {
            tensors[i] = Some(t);
        }
    }
    specs
        .into_iter()
        .zip(tensors)
        .map(|((name, _, _), t)| {
            t.map(|t| (name.clone(), t)).ok_or_else(|| ModelError::InvalidInput(format!("{name} was not sampled")))
        })
        .collect()
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy)]
pub(super) enum Init {
    /// N(0, std).
    Normal(f64),
    /// N(0, gain / sqrt(fan_in)), fan_in = product of all dims but the first.
    Fan(f64),
    /// Norm weights: 1 + N(0, 0.1).
    Norm,
}

impl Init {
    pub(super) fn sample(self, shape: &[usize], seed: u64, name: &str) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let (mean, std) = match self {
            Init::Normal(std) => (0.0, std),
            Init::Fan(gain) => (0.0, gain / (fan_in as f64).sqrt()),
            Init::Norm => (1.0, 0.1),
        };
        let dist = Normal::new(mean as f32, std as f32).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name));
        let data: Vec<f32> = (0..n).map(|_| dist.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// FNV-1a: a stable (across Rust versions) hash for per-tensor seeds.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Maps a hub-layout name onto `layout`.
fn rename(name: &str, layout: TensorLayout) -> String {
    if layout == TensorLayout::Hub {
        return name.to_string();
    }
    if name == TensorLayout::Hub.image_newline() {
        return layout.image_newline().to_string();
    }
    for from in [TensorLayout::Hub.text_model(), TensorLayout::Hub.vision_model(), TensorLayout::Hub.projector()] {
        if let Some(rest) = name.strip_prefix(from) {
            let to = match from {
                f if f == TensorLayout::Hub.text_model() => layout.text_model(),
                f if f == TensorLayout::Hub.vision_model() => layout.vision_model(),
                _ => layout.projector(),
            };
            return format!("{to}{rest}");
        }
    }
    name.replacen(TensorLayout::Hub.lm_head(), layout.lm_head(), 1)
}

pub(super) fn write_safetensors(dir: &Path, tensors: Vec<(String, Tensor)>, shards: usize) -> Result<()> {
    let metadata = || Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let save = |name: &str, part: Vec<(String, Tensor)>| -> Result<()> {
        let path = dir.join(name);
        safetensors::serialize_to_file(part, metadata(), &path)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))
    };
    if shards == 1 {
        return save("model.safetensors", tensors);
    }
    let mut parts: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); shards];
    for (i, t) in tensors.into_iter().enumerate() {
        parts[i % shards].push(t);
    }
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, part) in parts.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        for (name, t) in &part {
            weight_map.insert(name.clone(), json!(file));
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        save(&file, part)?;
    }
    write_json(
        dir,
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )
}

pub(super) fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|source| ModelError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_7b_preset_has_the_published_parameter_count() {
        let opts = DemoOptions { preset: Preset::Llava7b, ..Default::default() };
        let s = Shape::of(&opts);
        let params: usize =
            tensor_specs(&s, s.vocab_rows).iter().map(|(_, shape, _)| shape.iter().product::<usize>()).sum();
        // llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters (CLIP ViT-L/14-336 vision model,
        // 2-layer projector, Vicuna-7B with a 32,064-row vocabulary).
        assert_eq!(params, 7_063_427_072);
        assert_eq!(s.dtype, DType::BF16);
    }

    #[test]
    fn threaded_sampling_matches_one_tensor_at_a_time() {
        let s = Shape::of(&DemoOptions::default());
        let specs = tensor_specs(&s, 512);
        let sampled = sample_all(specs.clone(), 7, DType::F32).unwrap();
        for ((name, shape, init), (got_name, got)) in specs.into_iter().zip(&sampled).step_by(5) {
            assert_eq!(&name, got_name);
            let want = init.sample(&shape, 7, &name).unwrap();
            let diff = (want - got).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
    }
}
