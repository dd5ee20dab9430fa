//! `POST /admin/calibrate`: checks a calibration request — counts, sizes and paths before any
//! image is fetched, read or decoded — loads its samples, creates the queued job and hands it to
//! the calibration thread.
//!
//! Samples come inline (`data:`/http(s) image URLs, as in chat) or from a dataset in the authors'
//! JSONL format read from the server's calibration data root (`--calibration-data-dir`, see
//! [`crate::validation::data_root`]); without a root, dataset input is refused.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::jobs::calibration::{CalibrationRequest, CalibrationSample};
use crate::protocol::ErrorCode;
use crate::pruning::dataset::parse_lines;
use crate::store::jobs::{self, JobStatus, NewJob};
use crate::store::new_id;
use crate::validation::data_root::{DataRoot, DataRootError};
use crate::validation::images::{decode, inspect, parse_url, Header};
use crate::validation::ImageLimits;

use super::admin::admin;
use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;

/// Most inline samples one job may carry (they travel in the request body).
pub const MAX_INLINE_SAMPLES: usize = 64;
/// Most dataset samples one job may use (the authors' question file holds about 66).
pub const MAX_DATASET_SAMPLES: usize = 512;
/// Most distinct budgets one job may fit.
pub const MAX_BUDGETS: usize = 16;
/// Largest dataset (JSONL) file.
pub const MAX_DATASET_FILE_BYTES: u64 = 16 << 20;
/// Decoded image bytes one job may hold: its samples stay decoded until the job runs, so this,
/// not the sample count, bounds a job's memory (512 samples of 1 MP RGB take 1.5 GiB).
pub const MAX_JOB_IMAGE_BYTES: u64 = 2 << 30;

/// One inline calibration sample.
#[derive(Debug, Deserialize)]
pub struct SampleIn {
    /// `data:` or http(s) URL, as in chat requests.
    image: String,
    /// The question.
    prompt: String,
}

/// A dataset file in the authors' format plus its image folder, both inside the data root.
#[derive(Debug, Deserialize)]
pub struct DatasetIn {
    path: String,
    image_dir: String,
}

/// `POST /admin/calibrate` body.
#[derive(Debug, Deserialize)]
pub struct CalibrateIn {
    budgets: Vec<f64>,
    #[serde(default)]
    samples: Vec<SampleIn>,
    dataset: Option<DatasetIn>,
    tolerance: Option<f64>,
    name: Option<String>,
}

fn bad(param: &str, message: String) -> ApiError {
    ApiError::bad_request(Some(param), ErrorCode::InvalidValue, message)
}

/// `POST /admin/calibrate`: validates, creates a queued job, returns 202 with its id.
pub async fn calibrate(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CalibrateIn>,
) -> Result<Response, ApiError> {
    let admin = admin(&state)?;
    let loaded = state.engine.ready()?;
    let budgets = check_budgets(&body.budgets)?;
    let tolerance = body.tolerance.unwrap_or(0.01);
    if !(tolerance > 0.0 && tolerance <= 0.5) {
        return Err(bad("tolerance", format!("{tolerance} is not in (0, 0.5]")));
    }
    let samples = match (&body.dataset, body.samples.is_empty()) {
        (Some(_), false) => return Err(bad("dataset", "give either samples or dataset, not both".into())),
        (None, true) => return Err(bad("samples", "at least one sample (or a dataset) is required".into())),
        (None, false) => inline_samples(&state, &body.samples).await?,
        (Some(d), true) => {
            let root = admin.data_root.clone().ok_or_else(|| dataset_error("dataset", "", DataRootError::Disabled))?;
            let limits = state.fetcher.limits().clone();
            let (path, image_dir) = (PathBuf::from(&d.path), PathBuf::from(&d.image_dir));
            // File reads block (and a slow disk must not stall the async workers).
            tokio::task::spawn_blocking(move || dataset_samples(&root, &path, &image_dir, &limits))
                .await
                .map_err(|e| ApiError::Internal(format!("reading the dataset panicked: {e}")))??
        }
    };
    let id = new_id("job");
    let now = crate::store::now();
    let job = NewJob {
        id: &id,
        model_fingerprint: &loaded.info.fingerprint,
        name: body.name.as_deref(),
        budgets: &budgets,
        tolerance,
        samples: samples.len(),
        created_at: &now,
    };
    jobs::create(admin.pool(), &job).await.map_err(ApiError::internal)?;
    let req = CalibrationRequest { job_id: id.clone(), name: body.name, budgets, tolerance, samples };
    if !admin.jobs.submit(req) {
        jobs::finish(admin.pool(), &id, JobStatus::Failed, Some("calibration thread stopped"), &[], &now)
            .await
            .map_err(ApiError::internal)?;
        return Err(ApiError::Unavailable {
            message: "calibration is unavailable".into(),
            code: ErrorCode::CalibrationStopped,
        });
    }
    let location = format!("/admin/jobs/{id}");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(json!({"id": id, "status": "queued"})))
        .into_response())
}

/// The budgets in (0, 1), duplicates dropped (first occurrence kept), at most [`MAX_BUDGETS`].
fn check_budgets(budgets: &[f64]) -> Result<Vec<f64>, ApiError> {
    if budgets.is_empty() {
        return Err(bad("budgets", "at least one budget is required".into()));
    }
    let mut unique: Vec<f64> = Vec::new();
    for (i, &b) in budgets.iter().enumerate() {
        if !(b > 0.0 && b < 1.0) {
            return Err(bad(&format!("budgets[{i}]"), format!("{b} is not in (0, 1)")));
        }
        if !unique.contains(&b) {
            unique.push(b);
        }
        if unique.len() > MAX_BUDGETS {
            return Err(bad("budgets", format!("more than {MAX_BUDGETS} distinct budgets; fit them in several jobs")));
        }
    }
    Ok(unique)
}

/// Decoded image bytes of one job (calibration or evaluation) so far, against
/// [`MAX_JOB_IMAGE_BYTES`].
#[derive(Default)]
pub(super) struct JobImages {
    decoded: u64,
}

impl JobImages {
    /// Adds an image by its header (before decoding it) or refuses it.
    pub(super) fn admit(&mut self, header: &Header, param: &str) -> Result<(), ApiError> {
        self.decoded += header.decoded_bytes;
        if self.decoded > MAX_JOB_IMAGE_BYTES {
            return Err(ApiError::bad_request(
                Some(param),
                ErrorCode::CalibrationTooLarge,
                format!(
                    "the job's images would take more than {} MiB decoded; use fewer or smaller images",
                    MAX_JOB_IMAGE_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }
}

async fn inline_samples(state: &AppState, samples: &[SampleIn]) -> Result<Vec<CalibrationSample>, ApiError> {
    let parts: Vec<(&str, &str)> = samples.iter().map(|s| (s.image.as_str(), s.prompt.as_str())).collect();
    let images = inline_images(state, &parts, "calibration").await?;
    Ok(images
        .into_iter()
        .zip(samples)
        .map(|(image, s)| CalibrationSample { image, prompt: s.prompt.clone() })
        .collect())
}

/// Inline `(image, prompt)` samples of a job (calibration or evaluation, named by `what`):
/// checks their count and prompts, fetches the images and decodes them within one job's
/// decoded-image budget, every header checked before anything is decoded.
pub(super) async fn inline_images(
    state: &AppState,
    samples: &[(&str, &str)],
    what: &str,
) -> Result<Vec<image::DynamicImage>, ApiError> {
    if samples.len() > MAX_INLINE_SAMPLES {
        return Err(bad(
            "samples",
            format!(
                "{} samples; at most {MAX_INLINE_SAMPLES} inline (up to {MAX_DATASET_SAMPLES} through a dataset)",
                samples.len()
            ),
        ));
    }
    let limits = state.fetcher.limits().clone();
    let mut refs = Vec::with_capacity(samples.len());
    for (i, (image, prompt)) in samples.iter().enumerate() {
        if prompt.trim().is_empty() {
            return Err(bad(&format!("samples[{i}].prompt"), "the prompt is empty".into()));
        }
        refs.push(parse_url(image, format!("samples[{i}].image"), &limits)?);
    }
    let bytes = state.fetcher.fetch_all(&refs).await?;
    tokio::task::spawn_blocking(move || -> Result<Vec<image::DynamicImage>, ApiError> {
        let mut budget = JobImages::default();
        for (b, r) in bytes.iter().zip(&refs) {
            budget.admit(&inspect(b, &r.param, &limits)?, &r.param)?;
        }
        bytes.iter().zip(&refs).map(|(b, r)| decode(b, &r.param, &limits).map_err(ApiError::from)).collect()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoding {what} images panicked: {e}")))?
}

/// Reads a dataset and its images from the data root (blocking). Lines are counted before any
/// image is read, and each image's decoded size is checked from its header before decoding.
fn dataset_samples(
    root: &DataRoot,
    path: &Path,
    image_dir: &Path,
    limits: &ImageLimits,
) -> Result<Vec<CalibrationSample>, ApiError> {
    let bytes = root.read(path, MAX_DATASET_FILE_BYTES).map_err(|e| dataset_error("dataset.path", "", e))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ApiError::bad_request(Some("dataset.path"), ErrorCode::InvalidDataset, "the dataset file is not UTF-8 text")
    })?;
    let lines = parse_lines(&text, MAX_DATASET_SAMPLES)
        .map_err(|e| ApiError::bad_request(Some("dataset.path"), ErrorCode::InvalidDataset, e.to_string()))?;
    let mut budget = JobImages::default();
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        let param = format!("dataset line {}: image", line.line);
        let image = root
            .read(&image_dir.join(&line.image), limits.max_bytes as u64)
            .map_err(|e| dataset_error("dataset.image_dir", &format!("dataset line {}: image ", line.line), e))?;
        budget.admit(&inspect(&image, &param, limits)?, &param)?;
        out.push(CalibrationSample { image: decode(&image, &param, limits)?, prompt: line.text });
    }
    Ok(out)
}

/// A data-root refusal as a 400 naming the field.
pub(super) fn dataset_error(param: &str, prefix: &str, e: DataRootError) -> ApiError {
    let code = match e {
        DataRootError::Disabled => ErrorCode::DatasetDisabled,
        DataRootError::NotAllowed { .. } => ErrorCode::DatasetUnreadable,
        DataRootError::TooLarge { .. } => ErrorCode::DatasetTooLarge,
    };
    ApiError::bad_request(Some(param), code, format!("{prefix}{e}"))
}
