//! Admin API (Bearer token): calibration jobs and the recipe store.
//!
//! Handlers only validate, call the store or the calibration thread, and answer; calibration
//! itself runs in `jobs::calibration`.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::jobs::calibration::{CalibrationJobs, CalibrationRequest, CalibrationSample};
use crate::pruning::dataset::load_dataset;
use crate::pruning::recipe::{authors_scheme, authors_scheme_names, ModelShape};
use crate::pruning::Recipe;
use crate::store::jobs::{self, JobStatus, NewJob};
use crate::store::source::DbRecipes;
use crate::store::{new_id, recipes};
use crate::validation::images::{decode, parse_url};

use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;

/// Most samples one calibration job may carry.
pub const MAX_SAMPLES: usize = 64;

/// What the admin routes share.
pub struct AdminState {
    /// The token clients must present; `None` disables the admin API (403).
    pub token: Option<String>,
    /// Recipe store (also the chat path's recipe source).
    pub recipes: Arc<DbRecipes>,
    /// The calibration thread.
    pub jobs: CalibrationJobs,
}

impl AdminState {
    fn pool(&self) -> &sqlx::SqlitePool {
        self.recipes.pool()
    }
}

fn admin(state: &AppState) -> Result<&Arc<AdminState>, ApiError> {
    state.admin.as_ref().ok_or_else(|| ApiError::Forbidden("the admin API is not configured on this server".into()))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Requires `Authorization: Bearer <admin token>`, compared in constant time.
pub async fn require_admin_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.admin.as_ref().and_then(|a| a.token.clone()) else {
        return ApiError::Forbidden(
            "the admin API is disabled: start the server with --admin-token (or FITPRUNE_ADMIN_TOKEN) to enable it"
                .into(),
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return ApiError::Unauthorized("a valid admin token is required: Authorization: Bearer <token>".into())
            .into_response();
    }
    next.run(req).await
}

/// One inline calibration sample.
#[derive(Debug, Deserialize)]
pub struct SampleIn {
    /// `data:` or http(s) URL, as in chat requests.
    image: String,
    /// The question.
    prompt: String,
}

/// A dataset file in the authors' format plus its image folder (paths on the server).
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

/// `POST /admin/calibrate`: validates, creates a queued job, returns 202 with its id.
pub async fn calibrate(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CalibrateIn>,
) -> Result<Response, ApiError> {
    let admin = admin(&state)?;
    let loaded = state.engine.ready()?;
    let bad = |param: &str, message: String| ApiError::bad_request(Some(param), "invalid_value", message);
    if body.budgets.is_empty() {
        return Err(bad("budgets", "at least one budget is required".into()));
    }
    if let Some((i, b)) = body.budgets.iter().enumerate().find(|(_, b)| !(**b > 0.0 && **b < 1.0)) {
        return Err(bad(&format!("budgets[{i}]"), format!("{b} is not in (0, 1)")));
    }
    let tolerance = body.tolerance.unwrap_or(0.01);
    if !(tolerance > 0.0 && tolerance <= 0.5) {
        return Err(bad("tolerance", format!("{tolerance} is not in (0, 0.5]")));
    }
    let samples = match (&body.dataset, body.samples.is_empty()) {
        (Some(_), false) => return Err(bad("dataset", "give either samples or dataset, not both".into())),
        (None, true) => return Err(bad("samples", "at least one sample (or a dataset) is required".into())),
        (None, false) => inline_samples(&state, &body.samples).await?,
        (Some(d), true) => dataset_samples(&state, d).await?,
    };
    if samples.len() > MAX_SAMPLES {
        return Err(bad("samples", format!("{} samples; at most {MAX_SAMPLES}", samples.len())));
    }
    let id = new_id("job");
    let now = crate::store::now();
    let job = NewJob {
        id: &id,
        model_fingerprint: &loaded.info.fingerprint,
        name: body.name.as_deref(),
        budgets: &body.budgets,
        tolerance,
        samples: samples.len(),
        created_at: &now,
    };
    jobs::create(admin.pool(), &job).await.map_err(internal)?;
    let req = CalibrationRequest { job_id: id.clone(), name: body.name, budgets: body.budgets, tolerance, samples };
    if !admin.jobs.submit(req) {
        jobs::finish(admin.pool(), &id, JobStatus::Failed, Some("calibration thread stopped"), &[], &now)
            .await
            .map_err(internal)?;
        return Err(ApiError::Unavailable {
            message: "calibration is unavailable".into(),
            code: "calibration_stopped".into(),
        });
    }
    let location = format!("/admin/jobs/{id}");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(json!({"id": id, "status": "queued"})))
        .into_response())
}

async fn inline_samples(state: &AppState, samples: &[SampleIn]) -> Result<Vec<CalibrationSample>, ApiError> {
    let limits = state.fetcher.limits();
    let mut refs = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        if s.prompt.trim().is_empty() {
            return Err(ApiError::bad_request(
                Some(&format!("samples[{i}].prompt")),
                "invalid_value",
                "the prompt is empty",
            ));
        }
        refs.push(parse_url(&s.image, format!("samples[{i}].image"), limits)?);
    }
    let bytes = state.fetcher.fetch_all(&refs).await?;
    let mut out = Vec::with_capacity(samples.len());
    for ((s, r), b) in samples.iter().zip(&refs).zip(bytes) {
        out.push(CalibrationSample { image: decode(&b, &r.param, limits)?, prompt: s.prompt.clone() });
    }
    Ok(out)
}

async fn dataset_samples(state: &AppState, d: &DatasetIn) -> Result<Vec<CalibrationSample>, ApiError> {
    let entries = load_dataset(std::path::Path::new(&d.path), std::path::Path::new(&d.image_dir))
        .map_err(|e| ApiError::bad_request(Some("dataset"), "invalid_dataset", e.to_string()))?;
    let limits = state.fetcher.limits();
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let bytes = tokio::fs::read(&e.image).await.map_err(|err| {
            ApiError::bad_request(Some("dataset"), "invalid_dataset", format!("{}: {err}", e.image.display()))
        })?;
        out.push(CalibrationSample { image: decode(&bytes, &format!("dataset[{i}].image"), limits)?, prompt: e.text });
    }
    Ok(out)
}

/// `GET /admin/jobs`.
pub async fn list_jobs(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let all = jobs::list(admin(&state)?.pool()).await.map_err(internal)?;
    Ok(Json(json!({"object": "list", "data": all})))
}

/// `GET /admin/jobs/{id}`.
pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<jobs::Job>, ApiError> {
    match jobs::get(admin(&state)?.pool(), &id).await.map_err(internal)? {
        Some(j) => Ok(Json(j)),
        None => Err(not_found("job", &id)),
    }
}

/// `DELETE /admin/jobs/{id}`: a queued job is cancelled at once, a running one at its next layer.
pub async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<jobs::Job>, ApiError> {
    let admin = admin(&state)?;
    let job = jobs::get(admin.pool(), &id).await.map_err(internal)?.ok_or_else(|| not_found("job", &id))?;
    if job.status.is_final() {
        return Err(ApiError::bad_request(
            Some("id"),
            "job_finished",
            format!("job {id} already ended ({:?})", job.status),
        ));
    }
    admin.jobs.cancel(&id);
    if job.status == JobStatus::Queued {
        let now = crate::store::now();
        jobs::finish(admin.pool(), &id, JobStatus::Cancelled, None, &[], &now).await.map_err(internal)?;
    }
    let job = jobs::get(admin.pool(), &id).await.map_err(internal)?.ok_or_else(|| not_found("job", &id))?;
    Ok(Json(job))
}

/// `GET /admin/recipes` query.
#[derive(Debug, Deserialize)]
pub struct RecipeFilter {
    /// A model fingerprint, or `loaded` for the model being served.
    model: Option<String>,
}

/// `GET /admin/recipes[?model=FINGERPRINT|loaded]`.
pub async fn list_recipes(
    State(state): State<AppState>,
    Query(filter): Query<RecipeFilter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let admin = admin(&state)?;
    let model = match filter.model.as_deref() {
        Some("loaded") => Some(state.engine.ready()?.info.fingerprint.clone()),
        other => other.map(str::to_string),
    };
    let all = recipes::list(admin.pool(), model.as_deref()).await.map_err(internal)?;
    Ok(Json(json!({"object": "list", "data": all})))
}

/// `GET /admin/recipes/{id}`.
pub async fn get_recipe(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Recipe>, ApiError> {
    match recipes::get(admin(&state)?.pool(), &id).await.map_err(internal)? {
        Some(r) => Ok(Json(r)),
        None => Err(not_found("recipe", &id)),
    }
}

/// `DELETE /admin/recipes/{id}`.
pub async fn delete_recipe(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let admin = admin(&state)?;
    if !recipes::delete(admin.pool(), &id).await.map_err(internal)? {
        return Err(not_found("recipe", &id));
    }
    admin.recipes.invalidate();
    if let Ok(n) = recipes::count(admin.pool()).await {
        state.metrics.recipes_stored.set(n);
    }
    Ok(Json(json!({"id": id, "object": "recipe", "deleted": true})))
}

/// `POST /admin/recipes` body: a recipe as exported, or a built-in scheme by name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImportIn {
    /// `{"scheme": "authors-llava15-7b-50"}`.
    Scheme { scheme: String },
    /// A recipe (only `deletions` is required).
    Recipe(Recipe),
}

/// `POST /admin/recipes`: validates against the loaded model and stores; 201 with the recipe.
pub async fn import_recipe(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ImportIn>,
) -> Result<Response, ApiError> {
    let admin = admin(&state)?;
    let loaded = state.engine.ready()?;
    let recipe = match body {
        ImportIn::Recipe(r) => r,
        ImportIn::Scheme { scheme } => authors_scheme(&scheme).ok_or_else(|| {
            ApiError::bad_request(
                Some("scheme"),
                "unknown_scheme",
                format!("unknown scheme {scheme:?}; built in: {}", authors_scheme_names().join(", ")),
            )
        })?,
    };
    let shape = ModelShape {
        fingerprint: loaded.info.fingerprint.clone(),
        visual_tokens: loaded.info.image_tokens,
        flops: loaded.info.flops,
    };
    let now = crate::store::now();
    let recipe = recipe
        .for_import(&shape, new_id("rcp"), now)
        .map_err(|e| ApiError::bad_request(Some("deletions"), "invalid_recipe", e.to_string()))?;
    recipes::insert(admin.pool(), &recipe).await.map_err(internal)?;
    admin.recipes.invalidate();
    if let Ok(n) = recipes::count(admin.pool()).await {
        state.metrics.recipes_stored.set(n);
    }
    Ok((StatusCode::CREATED, Json(recipe)).into_response())
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("no {what} {id:?}"),
        param: Some("id".into()),
        code: format!("{what}_not_found"),
    }
}
