//! `fitprune calibrate`: fits recipes to FLOPs budgets from a dataset in the authors' format.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::model::fingerprint::fingerprint;
use crate::model::llava::LoadOptions;
use crate::model::prompt::{ChatMessage, ContentPart};
use crate::model::{source, LlavaModel};
use crate::pruning::calibrate::{calibrate, CalibrateOptions, CalibrationObserver};
use crate::pruning::dataset::load_dataset;
use crate::pruning::Recipe;

use super::input::{load_image, parse_device, parse_dtype};

/// Arguments of `calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model directory or hub id; omitted = the built-in demo model.
    #[arg(long, env = "FITPRUNE_MODEL")]
    model: Option<String>,
    /// JSONL file, one {"question_id", "image", "text"} per line (the authors' format).
    #[arg(long)]
    dataset: PathBuf,
    /// Folder the dataset's image paths are relative to.
    #[arg(long)]
    image_dir: PathBuf,
    /// Comma-separated FLOPs budgets in (0, 1).
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7")]
    budgets: Vec<f64>,
    /// Alpha search tolerance.
    #[arg(long, default_value_t = 0.01)]
    tolerance: f64,
    /// MiB of hidden states to memoise between alpha steps (least recently used dropped past it;
    /// results do not change, only the work).
    #[arg(long, default_value_t = 4096)]
    cache_mib: usize,
    /// Use at most this many samples.
    #[arg(long)]
    max_samples: Option<usize>,
    /// Write the recipes (a JSON list) here; printed to stdout otherwise.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also store the recipes in this SQLite database (e.g. sqlite://fitprune.db).
    #[arg(long, env = "FITPRUNE_DATABASE_URL")]
    database_url: Option<String>,
    /// Allow image URLs on private, loopback and link-local addresses (as `serve` does).
    #[arg(long, env = "FITPRUNE_ALLOW_PRIVATE_IMAGE_URLS")]
    allow_private_image_urls: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", env = "FITPRUNE_DEVICE")]
    device: String,
    /// f32 (CPU), f16 or bf16 (CUDA).
    #[arg(long, default_value = "f32", env = "FITPRUNE_DTYPE")]
    dtype: String,
}

struct Bar(ProgressBar);

impl CalibrationObserver for Bar {
    fn progress(&mut self, done: usize, total: usize, phase: &str) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
        self.0.set_message(phase.to_string());
    }
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let src = source::resolve(args.model.as_deref())?;
    let model = LlavaModel::load(&src.dir, LoadOptions { device, dtype, pad_to_square: false })?;
    let mut samples = load_dataset(&args.dataset, &args.image_dir)?;
    if let Some(max) = args.max_samples {
        samples.truncate(max);
    }
    let mut prompts = Vec::with_capacity(samples.len());
    for s in &samples {
        let image = load_image(&s.image.to_string_lossy(), args.allow_private_image_urls)?;
        let msg =
            ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text(s.text.clone())] };
        prompts.push(model.prepare(&[msg], std::slice::from_ref(&image))?);
    }
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?.progress_chars("=> "),
    );
    let started = Instant::now();
    let opts = CalibrateOptions {
        budgets: args.budgets.clone(),
        tolerance: args.tolerance,
        cache_bytes: args.cache_mib.saturating_mul(1 << 20),
    };
    let result = calibrate(&model, &prompts, &opts, &mut Bar(bar.clone()))?;
    bar.finish_and_clear();
    let fp = fingerprint(&src.dir)?;
    let created_at = crate::store::now();
    let mut recipes = Vec::new();
    for b in &result.budgets {
        let Some(alpha) = b.alpha else {
            eprintln!("budget {}: not reachable even at alpha = 1; no recipe", b.budget);
            continue;
        };
        recipes.push(Recipe {
            id: String::new(),
            name: format!("fitprune-{:.0}", b.budget * 100.0),
            model_fingerprint: fp.clone(),
            budget: b.budget,
            achieved_reduction: b.achieved_reduction,
            deletions: b.deletions.clone(),
            alpha: Some(alpha),
            visual_tokens: result.visual_tokens,
            samples: result.samples,
            created_at: created_at.clone(),
            job_id: None,
        });
    }
    let c = result.counts;
    eprintln!(
        "calibrated {} budgets on {} samples in {:.1}s: {:.0} layer evaluations ({} attention + {} MLP halves) \
         vs {} for the naive search ({:.1}x fewer), {} alpha fits",
        opts.budgets.len(),
        result.samples,
        started.elapsed().as_secs_f64(),
        c.layers(),
        c.attention,
        c.mlp,
        c.naive_layers,
        c.naive_layers as f64 / c.layers().max(1.0),
        c.fits
    );
    for r in &recipes {
        eprintln!(
            "  budget {:.2}: alpha {:.4}, achieved {:.3}, deletions {:?}",
            r.budget,
            r.alpha.unwrap_or(0.0),
            r.achieved_reduction,
            r.deletions
        );
    }
    if let Some(url) = &args.database_url {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let db = crate::store::open(url).await?;
            for r in &mut recipes {
                r.id = crate::store::new_id("rcp");
                crate::store::recipes::insert(&db, r).await?;
                eprintln!("stored {} in {url}", r.id);
            }
            db.close().await;
            Ok::<_, crate::store::StoreError>(())
        })?;
    }
    let json = serde_json::to_string_pretty(&recipes)?;
    match &args.out {
        Some(path) => std::fs::write(path, json + "\n")?,
        None => println!("{json}"),
    }
    Ok(())
}
