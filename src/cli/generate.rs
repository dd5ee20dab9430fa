//! `fitprune generate`: one chat turn (text + images) through the model, with timings.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use clap::Args;
use serde_json::json;

use crate::engine::generate::{generate, GenerationParams};
use crate::engine::sampling::SamplingParams;
use crate::model::config::ModelType;
use crate::model::llama::{DecoderHook, NoHook};
use crate::model::llava::LoadOptions;
use crate::model::prompt::{ChatMessage, ContentPart};
use crate::model::{source, LlavaModel};
use crate::pruning::flops::FlopsModel;
use crate::pruning::recipe::{authors_schemes_for, parse_recipes, select_by_budget};
use crate::pruning::{PruneHook, Recipe};

use super::input::{load_image, parse_device, parse_dtype};

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory or hub id; omitted = the built-in demo model (random weights).
    #[arg(long, env = "FITPRUNE_MODEL")]
    model: Option<String>,
    /// Image file or http(s) URL; repeat for several images (placed before the text, in order).
    #[arg(long)]
    image: Vec<String>,
    /// The user's message.
    #[arg(long, default_value = "What is shown in this image?")]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Alternatives to report per token with --json.
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Print a JSON document with token ids, logprobs and timings.
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", env = "FITPRUNE_DEVICE")]
    device: String,
    /// f32 (CPU), f16 or bf16 (CUDA).
    #[arg(long, default_value = "f32", env = "FITPRUNE_DTYPE")]
    dtype: String,
    /// Pad images to a square with the mean colour before resizing (original LLaVA).
    #[arg(long)]
    pad_to_square: bool,
    /// Prune with the recipe(s) in this JSON file (one recipe or a list; see --budget).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Allow image URLs on private, loopback and link-local addresses (as `serve` does).
    #[arg(long, env = "FITPRUNE_ALLOW_PRIVATE_IMAGE_URLS")]
    allow_private_image_urls: bool,
    /// Pick the recipe with the largest budget at or below this one (from --recipe, else the
    /// authors' built-in LLaVA-1.5-7B schemes, which need a 32-layer decoder).
    #[arg(long)]
    budget: Option<f64>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let src = source::resolve(args.model.as_deref())?;
    if src.is_demo {
        eprintln!("note: no --model given; using the built-in demo model (RANDOM WEIGHTS, answers are noise)");
    }
    let load_start = Instant::now();
    let model = LlavaModel::load(&src.dir, LoadOptions { device, dtype, pad_to_square: args.pad_to_square })?;
    let load_time = load_start.elapsed();
    let images =
        args.image.iter().map(|s| load_image(s, args.allow_private_image_urls)).collect::<anyhow::Result<Vec<_>>>()?;

    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage { role: "system".into(), content: vec![ContentPart::Text(system.clone())] });
    }
    let mut content: Vec<ContentPart> = images.iter().map(|_| ContentPart::Image).collect();
    content.push(ContentPart::Text(args.prompt.clone()));
    messages.push(ChatMessage { role: "user".into(), content });
    let prompt = model.prepare(&messages, &images)?;

    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            top_logprobs: args.top_logprobs,
        },
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
    };
    let recipe = choose_recipe(&args, model.llama().num_layers(), model.config().model_type)?;
    let mut prune = recipe.as_ref().map(|r| PruneHook::new(r.deletions_for(prompt.visual_tokens()), &prompt));
    let hook: &mut dyn DecoderHook = match prune.as_mut() {
        Some(h) => h,
        None => &mut NoHook,
    };
    let out = generate(&model, &prompt, &params, hook, &mut |_| true)?;
    let flops = FlopsModel::from_config(&model.config().text_config);
    let pruning = match (&recipe, &prune) {
        (Some(r), Some(h)) => json!({
            "recipe": r.name,
            "budget": r.budget,
            "visual_tokens": h.visual_in(),
            "visual_tokens_kept": h.visual_kept(),
            "flops_reduction": flops.reduction(h.visual_in() as u64, &h.applied_deletions()),
        }),
        _ => serde_json::Value::Null,
    };

    let prefill_s = out.timings.prefill.as_secs_f64();
    let decode_s = out.timings.decode.as_secs_f64();
    let decode_steps = out.completion_tokens.saturating_sub(1).max(1);
    let prefill_tps = out.prompt_tokens as f64 / prefill_s.max(1e-9);
    let decode_tps = decode_steps as f64 / decode_s.max(1e-9);
    if args.json {
        let tokenizer = model.tokenizer();
        let tokens: Vec<_> = out
            .tokens
            .iter()
            .map(|t| {
                json!({
                    "id": t.id,
                    "token": tokenizer.id_to_token(t.id),
                    "text": t.text,
                    "logprob": t.logprob,
                    "top_logprobs": t.top.iter().map(|(id, lp)| json!({"id": id, "logprob": lp})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = json!({
            "model": src.name,
            "random_weights": src.is_demo,
            "prompt_token_ids": prompt.input_ids,
            "prompt_tokens": out.prompt_tokens,
            "image_tokens": prompt.visual_tokens(),
            "completion_tokens": out.completion_tokens,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "tokens": tokens,
            "pruning": pruning,
            "timings": {
                "load_s": load_time.as_secs_f64(),
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "prefill_tokens_per_s": prefill_tps,
                "decode_tokens_per_s": decode_tps,
            }
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{}", out.text);
        if !pruning.is_null() {
            eprintln!(
                "pruning: recipe {} kept {} of {} visual tokens, FLOPs reduction {:.3}",
                pruning["recipe"], pruning["visual_tokens_kept"], pruning["visual_tokens"], pruning["flops_reduction"]
            );
        }
        eprintln!(
            "prompt {} tokens ({} image) | prefill {:.3}s ({:.1} tok/s) | decode {} tokens in {:.3}s ({:.1} tok/s) | finish {:?}",
            out.prompt_tokens,
            prompt.visual_tokens(),
            prefill_s,
            prefill_tps,
            out.completion_tokens,
            decode_s,
            decode_tps,
            out.finish_reason
        );
    }
    Ok(())
}

/// The recipe `--recipe` / `--budget` ask for, validated against the decoder depth.
fn choose_recipe(args: &GenerateArgs, layers: usize, family: ModelType) -> anyhow::Result<Option<Recipe>> {
    let recipe = match (&args.recipe, args.budget) {
        (None, None) => return Ok(None),
        (Some(path), budget) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let recipes = parse_recipes(&text).with_context(|| format!("parsing {}", path.display()))?;
            match budget {
                Some(b) => select_by_budget(&recipes, b).cloned(),
                None if recipes.len() == 1 => recipes.into_iter().next(),
                None => bail!("{} holds {} recipes: pick one with --budget", path.display(), recipes.len()),
            }
        }
        (None, Some(b)) => {
            if layers != 32 {
                bail!("--budget without --recipe uses the authors' 7B schemes (32 layers); this model has {layers}: calibrate first");
            }
            let all: Vec<Recipe> = authors_schemes_for(family);
            select_by_budget(&all, b).cloned()
        }
    };
    match recipe {
        Some(r) => {
            r.validate(layers)?;
            Ok(Some(r))
        }
        None => {
            eprintln!("note: no recipe has a budget at or below the one requested; running unpruned");
            Ok(None)
        }
    }
}
