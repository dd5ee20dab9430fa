//! `fitprune eval`: accuracy and fidelity against FLOPs budgets for FitPrune and the random and
//! FastV baselines; `--demo` runs it on the committed trained demo model and held-out set.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::eval::baselines::FastVHook;
use crate::eval::recipes::{calibrate_recipes, load_images, match_budgets};
use crate::eval::{evaluate, load_eval_dataset, report, AnswerKind, EvalObserver, EvalPlan, Method};
use crate::model::fingerprint::fingerprint;
use crate::model::llava::LoadOptions;
use crate::model::{source, LlavaModel};
use crate::pruning::calibrate::CalibrationObserver;
use crate::pruning::recipe::parse_recipes;
use crate::pruning::Recipe;

use super::input::{parse_device, parse_dtype};

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run on the committed trained demo model, held-out set and calibration subset
    /// (tests/fixtures/trained-demo); other inputs are then optional overrides.
    #[arg(long)]
    demo: bool,
    /// Where `--demo` finds those fixtures (a copy of tests/fixtures/trained-demo; ignored
    /// without `--demo`). Default: the first of <exe dir>/../share/fitprune/trained-demo,
    /// ./tests/fixtures/trained-demo and the source tree the binary was built from.
    #[arg(long, env = "FITPRUNE_DEMO_DIR")]
    demo_dir: Option<PathBuf>,
    /// Model directory or hub id.
    #[arg(long, env = "FITPRUNE_MODEL")]
    model: Option<String>,
    /// JSONL, one {"question_id", "image", "text"[, "answer" | "label"]} per line.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Folder the dataset's image paths are relative to (default: the dataset's folder).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// How answers are read: yes-no (POPE), choice (a letter), vqa; default inferred per line.
    #[arg(long, value_enum)]
    format: Option<AnswerKind>,
    /// Comma-separated FLOPs budgets; 0 is the unpruned row.
    #[arg(long, value_delimiter = ',', default_value = "0,0.3,0.5,0.7")]
    budgets: Vec<f64>,
    /// Recipes from this JSON file (one or a list); each budget takes the largest at or below it.
    #[arg(long, conflicts_with_all = ["database_url", "calibration_set"])]
    recipe: Option<PathBuf>,
    /// Recipes stored for this model in this SQLite database (e.g. sqlite://fitprune.db).
    #[arg(long, conflicts_with = "calibration_set")]
    database_url: Option<String>,
    /// Fit recipes on the spot from this JSONL calibration set (labels ignored).
    #[arg(long)]
    calibration_set: Option<PathBuf>,
    /// Image folder of the calibration set (default: its file's folder).
    #[arg(long)]
    calibration_image_dir: Option<PathBuf>,
    /// Deletion methods (repeatable or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fitprune,random,fastv")]
    method: Vec<Method>,
    /// Layer the FastV baseline deletes at (default 1; 0 for decoders of two layers or fewer).
    #[arg(long)]
    fastv_layer: Option<usize>,
    /// Seed of the random baseline.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tokens per greedy answer.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Use at most this many samples.
    #[arg(long)]
    max_samples: Option<usize>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the rows as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write a PNG plot (accuracy, or agreement without labels, against FLOPs reduction) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", env = "FITPRUNE_DEVICE")]
    device: String,
    /// f32 (CPU), f16 or bf16 (CUDA).
    #[arg(long, default_value = "f32", env = "FITPRUNE_DTYPE")]
    dtype: String,
}

/// Where the trained demo's fixtures are looked for when `--demo-dir` is not given, in order:
/// an installed layout next to the binary, the working directory's source tree, and the source
/// tree the binary was built from (which `cargo run` and the tests use; an installed binary,
/// e.g. in a container, usually lacks it).
fn demo_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(bin_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        out.push(bin_dir.join("../share/fitprune/trained-demo"));
    }
    out.push(PathBuf::from("tests/fixtures/trained-demo"));
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-demo"));
    out
}

/// Whether `dir` holds the trained demo: a model, a held-out set and a calibration subset.
fn is_demo_dir(dir: &Path) -> bool {
    ["model/config.json", "eval/eval.jsonl", "calib/calib.jsonl"].iter().all(|f| dir.join(f).is_file())
}

/// The trained demo's fixtures: `given` (`--demo-dir` / `FITPRUNE_DEMO_DIR`), else the first
/// [`demo_candidates`] entry that holds them; an error names every place looked at.
pub fn demo_root(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let hint = "copy tests/fixtures/trained-demo from the fitprune source tree and pass --demo-dir DIR \
                (or set FITPRUNE_DEMO_DIR)";
    if let Some(dir) = given {
        if is_demo_dir(dir) {
            return Ok(dir.to_path_buf());
        }
        bail!(
            "--demo-dir {}: not the trained demo's fixtures (model/config.json, eval/eval.jsonl and \
             calib/calib.jsonl expected); {hint}",
            dir.display()
        );
    }
    let candidates = demo_candidates();
    if let Some(dir) = candidates.iter().find(|d| is_demo_dir(d)) {
        return Ok(dir.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    bail!("--demo: the trained demo's fixtures are not in any of {}; {hint}", looked.join(", "))
}

struct Bar(ProgressBar);

impl EvalObserver for Bar {
    fn progress(&mut self, done: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }
}

impl CalibrationObserver for Bar {
    fn progress(&mut self, done: usize, total: usize, phase: &str) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
        self.0.set_message(phase.to_string());
    }
}

fn bar(message: &str) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?.progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    Ok(bar)
}

/// The folder a file's relative image paths default to.
fn parent_of(path: &Path) -> PathBuf {
    path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub fn run(mut args: EvalArgs) -> anyhow::Result<()> {
    if args.demo {
        let root = demo_root(args.demo_dir.as_deref())?;
        args.model.get_or_insert_with(|| root.join("model").display().to_string());
        args.dataset.get_or_insert_with(|| root.join("eval/eval.jsonl"));
        if args.recipe.is_none() && args.database_url.is_none() {
            args.calibration_set.get_or_insert_with(|| root.join("calib/calib.jsonl"));
        }
    }
    let Some(dataset) = args.dataset.clone() else {
        bail!("--dataset is required (or --demo)");
    };
    if args.model.is_none() {
        bail!("--model is required (or --demo): random demo weights say nothing about accuracy");
    }
    if args.budgets.iter().any(|b| !(0.0..1.0).contains(b)) {
        bail!("budgets must lie in [0, 1), got {:?}", args.budgets);
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let src = source::resolve(args.model.as_deref())?;
    let model = LlavaModel::load(&src.dir, LoadOptions { device, dtype, pad_to_square: false })?;
    let fp = fingerprint(&src.dir)?;

    let image_dir = args.image_dir.clone().unwrap_or_else(|| parent_of(&dataset));
    let mut samples = load_eval_dataset(&dataset, &image_dir, args.format)?;
    if let Some(max) = args.max_samples {
        samples.truncate(max.max(1));
    }
    let recipes = recipes_for(&args, &model, &fp)?;
    let (budgets, missing) = match_budgets(&args.budgets, &recipes);
    for b in missing {
        eprintln!("budget {b}: no recipe at or below it; row skipped");
    }
    for (b, r) in &budgets {
        if let Some(r) = r {
            eprintln!("budget {b:.2}: recipe {} (budget {:.2}), deletions {:?}", r.name, r.budget, r.deletions);
        }
    }
    let layers = model.llama().num_layers();
    let plan = EvalPlan {
        methods: dedup(&args.method),
        budgets,
        max_tokens: args.max_tokens,
        seed: args.seed,
        fastv_layer: args.fastv_layer.unwrap_or_else(|| FastVHook::default_layer(layers)),
    };
    if plan.fastv_layer >= layers {
        bail!("--fastv-layer {} is past the decoder's {layers} layers", plan.fastv_layer);
    }
    let images = load_images(&samples)?;
    let progress = bar("evaluating")?;
    let report = evaluate(&model, &samples, &images, &plan, &mut Bar(progress.clone()))?;
    progress.finish_and_clear();

    print!("{}", report::table(&report));
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "model": src.name,
            "dataset": dataset.display().to_string(),
            "fastv_layer": plan.fastv_layer,
            "seed": plan.seed,
            "recipes": plan.budgets.iter().filter_map(|(_, r)| r.as_ref()).collect::<Vec<_>>(),
            "report": report,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, report::csv(&report)).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let name = if args.demo { "trained demo LLaVA, shapes VQA" } else { src.name.as_str() };
        let title = format!("{name}: {} samples", report.samples);
        report::plot(&report, path, &title)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

fn dedup(methods: &[Method]) -> Vec<Method> {
    let mut out = Vec::new();
    for &m in methods {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// Recipes from `--recipe`, `--database-url` (those stored for this model) or fitted on
/// `--calibration-set`; none at all is only fine when every budget is 0.
fn recipes_for(args: &EvalArgs, model: &LlavaModel, fp: &str) -> anyhow::Result<Vec<Recipe>> {
    let layers = model.llama().num_layers();
    let recipes = if let Some(path) = &args.recipe {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        parse_recipes(&text).with_context(|| format!("parsing {}", path.display()))?
    } else if let Some(url) = &args.database_url {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let db = crate::store::open(url).await?;
            let list = crate::store::recipes::list(&db, Some(fp)).await;
            db.close().await;
            list
        })?
    } else if let Some(calib) = &args.calibration_set {
        let dir = args.calibration_image_dir.clone().unwrap_or_else(|| parent_of(calib));
        let calib_samples = load_eval_dataset(calib, &dir, None)?;
        let progress = bar("calibrating")?;
        let fitted = calibrate_recipes(model, &calib_samples, &args.budgets, fp, &mut Bar(progress.clone()))?;
        progress.finish_and_clear();
        eprintln!("calibrated {} recipes on {} samples", fitted.len(), calib_samples.len());
        fitted
    } else if args.budgets.iter().all(|&b| b == 0.0) {
        Vec::new()
    } else {
        bail!("pruned budgets need recipes: --recipe FILE, --database-url URL or --calibration-set FILE");
    };
    let mut usable = Vec::new();
    for r in recipes {
        match r.validate(layers) {
            Ok(()) => usable.push(r),
            Err(e) => eprintln!("recipe {:?} skipped: {e}", r.name),
        }
    }
    Ok(usable)
}
