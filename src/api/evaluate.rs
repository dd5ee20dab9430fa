//! `POST /admin/evaluations`: checks an evaluation request — budgets against the recipes that
//! realise them, methods, counts, sizes and paths, all before any image is fetched, read or
//! decoded — loads its samples, creates the queued job and hands it to the evaluation thread.
//!
//! Samples come inline (`data:`/http(s) image URLs with optional labels) or from a dataset in
//! one of the JSONL formats `fitprune eval` reads, from the server's data root
//! (`--calibration-data-dir`); the same limits as calibration jobs apply.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::engine::LoadedModel;
use crate::eval::answer::infer_kind;
use crate::eval::baselines::FastVHook;
use crate::eval::dataset::parse_eval_records;
use crate::eval::recipes::match_budgets;
use crate::eval::{AnswerKind, EvalPlan, EvalSample, Method};
use crate::jobs::evaluation::{EvaluationRequest, SampleSet};
use crate::protocol::ErrorCode;
use crate::pruning::Recipe;
use crate::store::evaluations::{self, EvalSettings, NewEvaluation};
use crate::store::jobs::JobStatus;
use crate::store::{new_id, recipes};
use crate::validation::data_root::{DataRoot, DataRootError};
use crate::validation::images::{decode, inspect};
use crate::validation::ImageLimits;

use super::admin::{admin, AdminState};
use super::calibrate::{
    dataset_error, inline_images, JobImages, MAX_BUDGETS, MAX_DATASET_FILE_BYTES, MAX_DATASET_SAMPLES,
};
use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;

/// Most tokens one answer may generate.
pub const MAX_NEW_TOKENS: u64 = 256;
/// Default answer length (`fitprune eval --max-tokens`).
pub const DEFAULT_NEW_TOKENS: u64 = 16;

/// One label or several acceptable ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LabelIn {
    /// One acceptable answer.
    One(String),
    /// Several acceptable answers.
    Many(Vec<String>),
}

/// One inline evaluation sample.
#[derive(Debug, Deserialize)]
pub struct EvalSampleIn {
    /// `data:` or http(s) URL, as in chat requests.
    image: String,
    /// The question.
    prompt: String,
    /// The label (or labels); without one the sample counts for agreement only.
    #[serde(default)]
    answer: Option<LabelIn>,
    /// The dataset's id of the question (a string or an integer), as in JSONL lines.
    #[serde(default)]
    question_id: Option<QuestionId>,
}

/// A `question_id` as datasets write it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    /// `"q17"`.
    Text(String),
    /// `17`.
    Number(i64),
}

/// A JSONL dataset inside the data root and the folder its image paths are relative to.
#[derive(Debug, Deserialize)]
pub struct EvalDatasetIn {
    path: String,
    /// Default: the dataset file's folder.
    image_dir: Option<String>,
}

/// `POST /admin/evaluations` body.
#[derive(Debug, Deserialize)]
pub struct EvaluateIn {
    budgets: Vec<f64>,
    #[serde(default)]
    samples: Vec<EvalSampleIn>,
    dataset: Option<EvalDatasetIn>,
    /// Fit the budgets' recipes on this set first (labels ignored) instead of using stored ones.
    calibration_dataset: Option<EvalDatasetIn>,
    methods: Option<Vec<String>>,
    recipe_ids: Option<Vec<String>>,
    format: Option<AnswerKind>,
    max_new_tokens: Option<u64>,
    seed: Option<u64>,
    fastv_layer: Option<u64>,
    name: Option<String>,
}

fn bad(param: &str, message: String) -> ApiError {
    ApiError::bad_request(Some(param), ErrorCode::InvalidValue, message)
}

/// `POST /admin/evaluations`: validates, creates a queued job, returns 202 with its id.
pub async fn evaluate(State(state): State<AppState>, ApiJson(body): ApiJson<EvaluateIn>) -> Result<Response, ApiError> {
    let admin = admin(&state)?;
    let loaded = state.engine.ready()?;
    let Options { budgets, methods, max_new_tokens, seed, fastv_layer } = check_options(&body, loaded.info.layers)?;
    let planned = if body.calibration_dataset.is_some() {
        if body.recipe_ids.is_some() {
            return Err(bad("calibration_dataset", "give either recipe_ids or calibration_dataset, not both".into()));
        }
        // Recipes are fitted when the job runs.
        budgets.iter().map(|&b| (b, None)).collect()
    } else {
        planned_recipes(&state, admin, &loaded, &body, &budgets).await?
    };
    let (samples, images) = match (&body.dataset, body.samples.is_empty()) {
        (Some(_), false) => return Err(bad("dataset", "give either samples or dataset, not both".into())),
        (None, true) => return Err(bad("samples", "at least one sample (or a dataset) is required".into())),
        (None, false) => inline_samples(&state, &body.samples, body.format).await?,
        (Some(d), true) => {
            let root = admin.data_root.clone().ok_or_else(|| dataset_error("dataset", "", DataRootError::Disabled))?;
            let limits = state.fetcher.limits().clone();
            read_dataset(root, "dataset", d, body.format, limits).await?
        }
    };
    let calibration = match &body.calibration_dataset {
        None => None,
        Some(d) => {
            let root = admin
                .data_root
                .clone()
                .ok_or_else(|| dataset_error("calibration_dataset", "", DataRootError::Disabled))?;
            let (samples, images) =
                read_dataset(root, "calibration_dataset", d, None, state.fetcher.limits().clone()).await?;
            Some(SampleSet { samples, images })
        }
    };
    let settings = EvalSettings {
        budgets,
        methods: methods.clone(),
        recipe_ids: planned.iter().map(|(_, r)| r.as_ref().map(|r| r.id.clone())).collect(),
        max_new_tokens: max_new_tokens as usize,
        seed,
        fastv_layer,
    };
    let id = new_id("eval");
    let now = crate::store::now();
    let labelled = samples.iter().filter(|s| !s.labels.is_empty()).count();
    let row = NewEvaluation {
        id: &id,
        model_fingerprint: &loaded.info.fingerprint,
        name: body.name.as_deref(),
        settings: &settings,
        samples: samples.len(),
        labelled,
        created_at: &now,
    };
    evaluations::create(admin.pool(), &row).await.map_err(ApiError::internal)?;
    let plan = EvalPlan { methods, budgets: planned, max_tokens: max_new_tokens as usize, seed, fastv_layer };
    let req = EvaluationRequest { job_id: id.clone(), samples: SampleSet { samples, images }, calibration, plan };
    if !admin.evaluations.submit(req) {
        evaluations::finish(admin.pool(), &id, JobStatus::Failed, Some("evaluation thread stopped"), &now)
            .await
            .map_err(ApiError::internal)?;
        return Err(ApiError::Unavailable {
            message: "evaluation is unavailable".into(),
            code: ErrorCode::EvaluationStopped,
        });
    }
    let location = format!("/admin/evaluations/{id}");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(json!({"id": id, "status": "queued"})))
        .into_response())
}

/// The checked scalar options of a request, defaults applied.
struct Options {
    budgets: Vec<f64>,
    methods: Vec<Method>,
    max_new_tokens: u64,
    seed: u64,
    fastv_layer: usize,
}

/// Budgets, methods, answer length, seed and FastV layer (for a decoder of `layers` layers).
fn check_options(body: &EvaluateIn, layers: usize) -> Result<Options, ApiError> {
    let budgets = check_budgets(&body.budgets)?;
    let methods = check_methods(body.methods.as_deref())?;
    let max_new_tokens = body.max_new_tokens.unwrap_or(DEFAULT_NEW_TOKENS);
    if !(1..=MAX_NEW_TOKENS).contains(&max_new_tokens) {
        return Err(bad("max_new_tokens", format!("{max_new_tokens} is not in [1, {MAX_NEW_TOKENS}]")));
    }
    let seed = body.seed.unwrap_or(0);
    if seed > i64::MAX as u64 {
        return Err(bad("seed", format!("{seed} is larger than {}", i64::MAX)));
    }
    let fastv_layer = body.fastv_layer.map_or(FastVHook::default_layer(layers), |l| l as usize);
    if fastv_layer >= layers {
        return Err(bad("fastv_layer", format!("{fastv_layer} is past the decoder's {layers} layers")));
    }
    Ok(Options { budgets, methods, max_new_tokens, seed, fastv_layer })
}

/// The budgets in [0, 1) (0 = the unpruned row), duplicates dropped, at most [`MAX_BUDGETS`].
fn check_budgets(budgets: &[f64]) -> Result<Vec<f64>, ApiError> {
    if budgets.is_empty() {
        return Err(bad("budgets", "at least one budget is required".into()));
    }
    let mut unique: Vec<f64> = Vec::new();
    for (i, &b) in budgets.iter().enumerate() {
        if !(0.0..1.0).contains(&b) {
            return Err(bad(&format!("budgets[{i}]"), format!("{b} is not in [0, 1)")));
        }
        if !unique.contains(&b) {
            unique.push(b);
        }
        if unique.len() > MAX_BUDGETS {
            return Err(bad("budgets", format!("more than {MAX_BUDGETS} distinct budgets")));
        }
    }
    Ok(unique)
}

/// The methods by name (default: all three), duplicates dropped.
fn check_methods(names: Option<&[String]>) -> Result<Vec<Method>, ApiError> {
    let all = [Method::Fitprune, Method::Random, Method::Fastv];
    let Some(names) = names else { return Ok(all.to_vec()) };
    if names.is_empty() {
        return Err(bad("methods", "at least one method is required (fitprune, random, fastv)".into()));
    }
    let mut out = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let m = all.into_iter().find(|m| m.name() == n).ok_or_else(|| {
            bad(&format!("methods[{i}]"), format!("unknown method {n:?}; known: fitprune, random, fastv"))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Each budget with the recipe that realises it, from `recipe_ids` or the recipes chat requests
/// select from; a budget with none is a 400.
async fn planned_recipes(
    state: &AppState,
    admin: &AdminState,
    loaded: &LoadedModel,
    body: &EvaluateIn,
    budgets: &[f64],
) -> Result<Vec<(f64, Option<Recipe>)>, ApiError> {
    let candidates = candidate_recipes(state, admin, loaded, body.recipe_ids.as_deref()).await?;
    let (planned, missing) = match_budgets(budgets, &candidates);
    if let Some(b) = missing.first() {
        let i = body.budgets.iter().position(|x| x == b).unwrap_or(0);
        let which = if body.recipe_ids.is_some() { "among recipe_ids" } else { "available for the loaded model" };
        return Err(ApiError::bad_request(
            Some(&format!("budgets[{i}]")),
            ErrorCode::NoRecipe,
            format!(
                "no recipe {which} has a budget at or below {b}; calibrate one (POST /admin/calibrate) first, \
                 or give a calibration_dataset"
            ),
        ));
    }
    Ok(planned)
}

/// The recipes budgets may use: those named (each must exist and fit the loaded model), else
/// every recipe the chat path would select from for this model.
async fn candidate_recipes(
    state: &AppState,
    admin: &AdminState,
    loaded: &LoadedModel,
    ids: Option<&[String]>,
) -> Result<Vec<Recipe>, ApiError> {
    let Some(ids) = ids else {
        let all = state.recipes.for_model(&loaded.info).await?;
        return Ok(all.iter().map(|r| Recipe::clone(r)).collect());
    };
    if ids.len() > MAX_BUDGETS {
        return Err(bad("recipe_ids", format!("more than {MAX_BUDGETS} recipes")));
    }
    let mut out = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let param = format!("recipe_ids[{i}]");
        let r = recipes::get(admin.pool(), id).await.map_err(ApiError::internal)?.ok_or_else(|| {
            ApiError::bad_request(Some(&param), ErrorCode::RecipeNotFound, format!("no recipe {id:?}"))
        })?;
        let fits = r.model_fingerprint == loaded.info.fingerprint && r.validate(loaded.info.layers).is_ok();
        if !fits {
            return Err(ApiError::bad_request(
                Some(&param),
                ErrorCode::InvalidRecipe,
                format!("recipe {id:?} was not fitted for the loaded model"),
            ));
        }
        out.push(r);
    }
    Ok(out)
}

/// The folder a dataset's image paths default to: its own (inside the data root).
fn parent_of(path: &Path) -> PathBuf {
    path.parent().map_or_else(PathBuf::new, Path::to_path_buf)
}

fn labels_of(answer: Option<&LabelIn>) -> Vec<String> {
    match answer {
        None => Vec::new(),
        Some(LabelIn::One(s)) => vec![s.clone()],
        Some(LabelIn::Many(v)) => v.clone(),
    }
}

async fn inline_samples(
    state: &AppState,
    samples: &[EvalSampleIn],
    format: Option<AnswerKind>,
) -> Result<(Vec<EvalSample>, Vec<image::DynamicImage>), ApiError> {
    let parts: Vec<(&str, &str)> = samples.iter().map(|s| (s.image.as_str(), s.prompt.as_str())).collect();
    let images = inline_images(state, &parts, "evaluation").await?;
    let out = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let labels = labels_of(s.answer.as_ref());
            let question_id = match &s.question_id {
                Some(QuestionId::Text(q)) => q.clone(),
                Some(QuestionId::Number(n)) => n.to_string(),
                None => (i + 1).to_string(),
            };
            let kind = format.unwrap_or_else(|| infer_kind(&labels));
            EvalSample { question_id, image: PathBuf::new(), text: s.prompt.clone(), labels, kind }
        })
        .collect();
    Ok((out, images))
}

/// Reads the dataset `d` (the request field `field`) off the async workers: file reads block,
/// and a slow disk must not stall them.
async fn read_dataset(
    root: DataRoot,
    field: &'static str,
    d: &EvalDatasetIn,
    format: Option<AnswerKind>,
    limits: ImageLimits,
) -> Result<(Vec<EvalSample>, Vec<image::DynamicImage>), ApiError> {
    let path = PathBuf::from(&d.path);
    let image_dir = d.image_dir.as_ref().map_or_else(|| parent_of(&path), PathBuf::from);
    tokio::task::spawn_blocking(move || dataset_samples(&root, field, &path, &image_dir, format, &limits))
        .await
        .map_err(|e| ApiError::Internal(format!("reading the dataset panicked: {e}")))?
}

/// Reads a dataset and its images from the data root (blocking). Lines are parsed and counted
/// before any image is read, and each image's decoded size is checked from its header first.
fn dataset_samples(
    root: &DataRoot,
    field: &str,
    path: &Path,
    image_dir: &Path,
    format: Option<AnswerKind>,
    limits: &ImageLimits,
) -> Result<(Vec<EvalSample>, Vec<image::DynamicImage>), ApiError> {
    let (path_param, dir_param) = (format!("{field}.path"), format!("{field}.image_dir"));
    let invalid = |m: String| ApiError::bad_request(Some(&path_param), ErrorCode::InvalidDataset, m);
    let bytes = root.read(path, MAX_DATASET_FILE_BYTES).map_err(|e| dataset_error(&path_param, "", e))?;
    let text = String::from_utf8(bytes).map_err(|_| invalid("the dataset file is not UTF-8 text".into()))?;
    let records = parse_eval_records(&text, format).map_err(|e| invalid(e.to_string()))?;
    if records.len() > MAX_DATASET_SAMPLES {
        return Err(invalid(format!("{} samples; at most {MAX_DATASET_SAMPLES}", records.len())));
    }
    let mut budget = JobImages::default();
    let (mut samples, mut images) = (Vec::with_capacity(records.len()), Vec::with_capacity(records.len()));
    for (line, sample) in records {
        let param = format!("{field} line {line}: image");
        let bytes = root
            .read(&image_dir.join(&sample.image), limits.max_bytes as u64)
            .map_err(|e| dataset_error(&dir_param, &format!("{field} line {line}: image "), e))?;
        budget.admit(&inspect(&bytes, &param, limits)?, &param)?;
        images.push(decode(&bytes, &param, limits)?);
        samples.push(sample);
    }
    Ok((samples, images))
}
