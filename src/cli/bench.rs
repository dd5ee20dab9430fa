//! `fitprune bench`: pruned vs unpruned prefill, time to first token and decode speed, side by
//! side in one run, with the FLOPs model's prediction next to each measured ratio.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::generate::{generate, GenerationParams};
use crate::engine::sampling::SamplingParams;
use crate::model::config::ModelType;
use crate::model::demo::{write_demo_model, DemoFamily, DemoOptions, Preset};
use crate::model::llava::{LoadOptions, PrefillItem};
use crate::model::prompt::{ChatMessage, ContentPart};
use crate::model::{source, LlavaModel, PreparedPrompt};
use crate::pruning::calibrate::{calibrate, CalibrateOptions, Silent};
use crate::pruning::flops::FlopsModel;
use crate::pruning::PruneHook;

use super::bench_serve::{self, ConcurrencyBench};
use super::bench_stages;
use super::input::{parse_device, parse_dtype};

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model directory or hub id (default: a bench-preset demo model in the cache directory).
    #[arg(long)]
    model: Option<String>,
    /// Demo preset to generate when --model is not given.
    #[arg(long, value_enum, default_value = "bench")]
    preset: Preset,
    /// Demo model family when --model is not given (next: a 4:3 photo-sized image, e.g. 640x480
    /// for 336-px tiles, 2,340 visual tokens; hr: the same photo padded and resized to 1024 px,
    /// 1,024 visual tokens).
    #[arg(long, value_enum, default_value = "llava")]
    family: DemoFamily,
    /// Budgets to compare (0 = unpruned baseline, always included).
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7")]
    budgets: Vec<f64>,
    /// Synthetic calibration samples.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Timed repetitions per budget (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Tokens decoded per repetition.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Prompts in the batched-prefill comparison (one batch vs one at a time); 0 skips it.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Instead of the prefill tables: the engine under this many concurrent requests each
    /// (e.g. 1,2,4,8,16), decoding --decode-tokens each, unpruned and at each --budgets value.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// KV-cache MiB for the admission count of --concurrency (default: room for 16 unpruned).
    #[arg(long)]
    kv_cache_mib: Option<u64>,
    /// Also write the measurements as JSON to this file (`scripts/device-check.sh` reads it).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Instead of the prefill tables: where one unpruned prefill's time goes, stage by stage
    /// (preprocessing, vision tower + projector, decoder attention / MLP halves, LM head), over
    /// --reps repetitions after a warm-up; no calibration.
    #[arg(long)]
    stages: bool,
}

/// One budget's measurements over the repetitions.
#[derive(Default)]
struct Measured {
    kept: usize,
    prefill: Vec<f64>,
    ttft: Vec<f64>,
    decode: Vec<f64>,
}

/// Median and spread of repeated measurements.
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(mut xs: Vec<f64>) -> Self {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 };
        Self { median, min: xs[0], max: xs[n - 1] }
    }
}

/// A deterministic noise-and-gradient image of `size` x `height`, so prompts differ between samples.
fn synthetic_image(seed: u64, size: u32, height: u32) -> DynamicImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let img = RgbImage::from_fn(size, height, |x, y| {
        let n: u8 = rng.random_range(0..60);
        image::Rgb([(x * 255 / size) as u8 ^ n, (y * 200 / size) as u8, n.wrapping_mul(3)])
    });
    DynamicImage::ImageRgb8(img)
}

const QUESTIONS: [&str; 4] = [
    "What is in the image?",
    "Describe the colours and shapes you can see.",
    "Is there any text in this picture? Answer briefly.",
    "Which object is closest to the camera?",
];

/// Bench prompt `i`: a synthetic image at the model's input size and one of the questions.
fn bench_prompt(model: &LlavaModel, i: usize) -> anyhow::Result<PreparedPrompt> {
    let side = model.config().vision_config.image_size as u32;
    // NeXT: a 4:3 photo (640x480 for 336-px tiles) goes to the 2x2 grid and unpads to 3:4 rows;
    // HR pads the same photo to a square and resizes it to its input size.
    let (width, height) = match model.config().model_type {
        ModelType::Llava => (side, side + 37),
        ModelType::LlavaNext | ModelType::LlavaHr => (side * 40 / 21, side * 40 / 21 * 3 / 4),
    };
    let msg = ChatMessage {
        role: "user".into(),
        content: vec![ContentPart::Image, ContentPart::Text(QUESTIONS[i % QUESTIONS.len()].into())],
    };
    Ok(model.prepare(&[msg], &[synthetic_image(i as u64, width, height)])?)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.reps == 0 || args.samples == 0 {
        bail!("--reps and --samples must be positive");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let dir = match &args.model {
        Some(m) => source::resolve(Some(m))?.dir,
        None => {
            let name = match args.family {
                DemoFamily::Llava => format!("bench-{:?}-seed0", args.preset),
                DemoFamily::Next => format!("bench-next-{:?}-seed0", args.preset),
                DemoFamily::Hr => format!("bench-hr-{:?}-seed0", args.preset),
            };
            let dir = source::cache_dir().join(name.to_lowercase());
            if !dir.join("model.safetensors").exists() {
                eprintln!("writing a {:?} demo model (random weights) to {}", args.preset, dir.display());
                write_demo_model(
                    &dir,
                    &DemoOptions { preset: args.preset, family: args.family, ..Default::default() },
                )?;
            }
            dir
        }
    };
    let options = LoadOptions { device, dtype, pad_to_square: false };
    let model = LlavaModel::load(&dir, options.clone())?;
    let prompt_for = |i: usize| bench_prompt(&model, i);
    if args.stages {
        let stages = bench_stages::run(&model, &prompt_for(0)?, args.reps)?;
        return write_report(&args, &dir, serde_json::json!({ "stages": stages }));
    }
    let calib: Vec<PreparedPrompt> = (0..args.samples).map(|i| prompt_for(i + 1)).collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let fitted = calibrate(
        &model,
        &calib,
        &CalibrateOptions { budgets: args.budgets.clone(), ..Default::default() },
        &mut Silent,
    )?;
    let c = fitted.counts;
    eprintln!(
        "calibrated {} budgets on {} synthetic samples in {:.1}s ({:.0} layer evaluations vs {} naive, {:.1}x fewer)",
        args.budgets.len(),
        args.samples,
        started.elapsed().as_secs_f64(),
        c.layers(),
        c.naive_layers,
        c.naive_layers as f64 / c.layers().max(1.0)
    );

    let flops = FlopsModel::from_config(&model.config().text_config);
    if !args.concurrency.is_empty() {
        let mut rows = vec![(0.0, vec![0; flops.layers])];
        rows.extend(fitted.budgets.iter().filter(|b| b.alpha.is_some()).map(|b| (b.budget, b.deletions.clone())));
        drop(model);
        let bench = ConcurrencyBench {
            concurrency: args.concurrency.clone(),
            max_tokens: args.decode_tokens,
            rows,
            kv_cache_mib: args.kv_cache_mib,
        };
        let rows = bench_serve::run(&dir, options, &bench, &bench_prompt)?;
        return write_report(&args, &dir, serde_json::json!({ "concurrency": rows }));
    }
    let prompt = prompt_for(0)?;
    let n = prompt.visual_tokens() as u64;
    let text_rows = prompt.input_ids.len() as u64 - n;
    let mut rows = vec![(0.0, vec![0; flops.layers])];
    rows.extend(fitted.budgets.iter().filter(|b| b.alpha.is_some()).map(|b| (b.budget, b.deletions.clone())));

    println!(
        "model: {} | prompt {} tokens ({} visual) | {} reps, median [min..max]",
        dir.display(),
        prompt.input_ids.len(),
        n,
        args.reps
    );
    println!(
        "| budget | kept visual | FLOPs ratio (visual / whole prompt) | LLM prefill s | prefill ratio | ratio / FLOPs | TTFT s | decode tok/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Budgets take turns within each repetition and ratios are taken per repetition, so load
    // that drifts during the run (these machines are shared) hits every budget alike.
    let embeds = model.input_embeds(&prompt)?;
    let positions: Vec<u32> = (0..prompt.input_ids.len() as u32).collect();
    let params =
        GenerationParams { sampling: SamplingParams::default(), max_tokens: args.decode_tokens, stop: Vec::new() };
    let mut measured: Vec<Measured> = rows.iter().map(|_| Measured::default()).collect();
    for rep in 0..=args.reps {
        for ((_, deletions), m) in rows.iter().zip(measured.iter_mut()) {
            // LLM prefill alone: the decoder over precomputed embeddings. A hook with no
            // deletions never asks for attention, so the baseline runs the plain path.
            let mut hook = PruneHook::new(deletions.clone(), &prompt);
            let mut cache = model.new_cache();
            let t = Instant::now();
            let out = model.llama().forward(&embeds, &positions, &mut cache, &mut hook)?;
            model.llama().last_logits(&out.hidden)?.to_vec2::<f32>()?;
            let prefill_s = t.elapsed().as_secs_f64();
            m.kept = hook.visual_kept();
            // End to end: vision tower, projector, prefill and the first token, then decoding.
            let mut hook = PruneHook::new(deletions.clone(), &prompt);
            let t = Instant::now();
            let mut first: Option<Duration> = None;
            let g = generate(&model, &prompt, &params, &mut hook, &mut |_| {
                first.get_or_insert(t.elapsed());
                true
            })?;
            if rep == 0 {
                continue; // warm-up
            }
            m.prefill.push(prefill_s);
            m.ttft.push(first.unwrap_or(g.timings.prefill).as_secs_f64());
            let steps = g.completion_tokens.saturating_sub(1).max(1);
            m.decode.push(steps as f64 / g.timings.decode.as_secs_f64().max(1e-9));
        }
    }
    let base = measured[0].prefill.clone();
    let mut report_rows = Vec::new();
    for ((budget, deletions), m) in rows.iter().zip(measured) {
        let visual_ratio = flops.pruned(n, deletions) as f64 / flops.unpruned(n) as f64;
        let prompt_ratio =
            flops.pruned_with_text(n, text_rows, deletions) as f64 / flops.pruned_with_text(n, text_rows, &[]) as f64;
        let ratio = Stat::of(m.prefill.iter().zip(&base).map(|(p, b)| p / b).collect()).median;
        let (p, t, d) = (Stat::of(m.prefill), Stat::of(m.ttft), Stat::of(m.decode));
        report_rows.push(serde_json::json!({
            "budget": budget, "visual_tokens": n, "kept_visual": m.kept,
            "flops_ratio_visual": visual_ratio, "flops_ratio_prompt": prompt_ratio,
            "prefill_s": p.median, "prefill_ratio": ratio, "ttft_s": t.median, "decode_tokens_per_s": d.median,
        }));
        println!(
            "| {budget:.2} | {} | {visual_ratio:.3} / {prompt_ratio:.3} | {:.4} [{:.4}..{:.4}] | {ratio:.3} | {:.2} | {:.4} [{:.4}..{:.4}] | {:.1} [{:.1}..{:.1}] |",
            m.kept, p.median, p.min, p.max, ratio / prompt_ratio, t.median, t.min, t.max, d.median, d.min, d.max
        );
    }
    if args.batch > 0 {
        let prompts: Vec<PreparedPrompt> =
            (0..args.batch).map(|i| prompt_for(100 + i)).collect::<anyhow::Result<_>>()?;
        bench_batched(&model, &prompts, &rows, args.reps)?;
    }
    let prompt_tokens = prompt.input_ids.len();
    write_report(&args, &dir, serde_json::json!({ "prompt_tokens": prompt_tokens, "prefill": report_rows }))
}

/// Writes `body` plus what was run to `--json`, when given.
fn write_report(args: &BenchArgs, dir: &std::path::Path, mut body: serde_json::Value) -> anyhow::Result<()> {
    let Some(path) = &args.json else {
        return Ok(());
    };
    body["model"] = serde_json::json!(dir.display().to_string());
    body["device"] = serde_json::json!(args.device);
    body["dtype"] = serde_json::json!(args.dtype);
    body["reps"] = serde_json::json!(args.reps);
    body["decode_tokens"] = serde_json::json!(args.decode_tokens);
    let text = serde_json::to_string_pretty(&body)?;
    std::fs::write(path, text + "\n").map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Prefill (vision tower, projector, decoder, first logits) of `prompts` one at a time against
/// one batched pass, at each budget.
fn bench_batched(
    model: &LlavaModel,
    prompts: &[PreparedPrompt],
    rows: &[(f64, Vec<usize>)],
    reps: usize,
) -> anyhow::Result<()> {
    let lengths: Vec<usize> = prompts.iter().map(|p| p.input_ids.len()).collect();
    println!();
    println!("batched prefill: {} prompts of {lengths:?} tokens | {reps} reps, median [min..max]", prompts.len());
    println!("| budget | one at a time s | batched s | batched / one at a time |");
    println!("|---|---|---|---|");
    for (budget, deletions) in rows {
        let hooks = || -> Vec<PruneHook> { prompts.iter().map(|p| PruneHook::new(deletions.clone(), p)).collect() };
        let (mut single, mut batched) = (Vec::new(), Vec::new());
        for rep in 0..=reps {
            let t = Instant::now();
            for (p, mut hook) in prompts.iter().zip(hooks()) {
                model.prefill(p, &mut model.new_cache(), &mut hook)?.logits.to_vec1::<f32>()?;
            }
            let single_s = t.elapsed().as_secs_f64();
            let mut hooks = hooks();
            let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
            let mut items: Vec<PrefillItem<'_>> = prompts
                .iter()
                .zip(caches.iter_mut().zip(hooks.iter_mut()))
                .map(|(prompt, (cache, hook))| PrefillItem { prompt, cache, hook })
                .collect();
            let t = Instant::now();
            for p in model.prefill_batch(&mut items)? {
                p.logits.to_vec1::<f32>()?;
            }
            if rep > 0 {
                single.push(single_s);
                batched.push(t.elapsed().as_secs_f64());
            }
        }
        let (s, b) = (Stat::of(single), Stat::of(batched));
        println!(
            "| {budget:.2} | {:.4} [{:.4}..{:.4}] | {:.4} [{:.4}..{:.4}] | {:.3} |",
            s.median,
            s.min,
            s.max,
            b.median,
            b.min,
            b.max,
            b.median / s.median
        );
    }
    Ok(())
}
