//! Admin API (Bearer token): calibration jobs and the recipe store (`POST /admin/calibrate` is
//! in [`super::calibrate`]; evaluation jobs in [`super::evaluate`] and [`super::evaluations`]).
//!
//! Handlers only validate, call the store or the calibration thread, and answer; calibration
//! itself runs in `jobs::calibration`. Lists are paginated the OpenAI way: `limit` (1..=100,
//! default 20) and `after` (the last id of the previous page) in, `has_more`, `first_id` and
//! `last_id` out.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::jobs::calibration::CalibrationJobs;
use crate::jobs::evaluation::EvaluationJobs;
use crate::jobs::recipe_source::DbRecipes;
use crate::protocol::ErrorCode;
use crate::pruning::recipe::{authors_scheme, authors_scheme_names, ModelShape};
use crate::pruning::Recipe;
use crate::store::jobs::{self, JobStatus};
use crate::store::{new_id, recipes, Page, StoreError};
use crate::validation::data_root::DataRoot;

use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;

/// Default page size of the admin lists.
pub const DEFAULT_PAGE: usize = 20;
/// Largest page size of the admin lists.
pub const MAX_PAGE: usize = 100;

/// What the admin routes share.
pub struct AdminState {
    /// The token clients must present; `None` disables the admin API (403).
    pub token: Option<String>,
    /// Recipe store (also the chat path's recipe source).
    pub recipes: Arc<DbRecipes>,
    /// The calibration thread.
    pub jobs: CalibrationJobs,
    /// The evaluation thread.
    pub evaluations: EvaluationJobs,
    /// Where datasets may be read from (`--calibration-data-dir`); `None` refuses dataset input.
    pub data_root: Option<DataRoot>,
}

impl AdminState {
    pub(super) fn pool(&self) -> &sqlx::SqlitePool {
        self.recipes.pool()
    }
}

pub(super) fn admin(state: &AppState) -> Result<&Arc<AdminState>, ApiError> {
    state.admin.as_ref().ok_or_else(|| ApiError::Forbidden("the admin API is not configured on this server".into()))
}

/// `limit` and `after` of a list request.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub(super) limit: Option<i64>,
    pub(super) after: Option<String>,
}

/// An OpenAI-style list page.
#[derive(Debug, Serialize)]
pub struct ListPage<T> {
    object: &'static str,
    data: Vec<T>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

impl<T> ListPage<T> {
    pub(super) fn new(page: Page<T>, id: impl Fn(&T) -> &str) -> Self {
        let first_id = page.data.first().map(|t| id(t).to_string());
        let last_id = page.data.last().map(|t| id(t).to_string());
        Self { object: "list", data: page.data, first_id, last_id, has_more: page.has_more }
    }
}

/// Query strings that do not parse answer in the OpenAI error shape, not axum's plain text.
pub(super) fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request(None, ErrorCode::InvalidType, format!("invalid query string: {}", e.body_text()))
}

pub(super) fn page_size(limit: Option<i64>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::bad_request(
            Some("limit"),
            ErrorCode::InvalidValue,
            format!("limit must be in [1, {MAX_PAGE}], got {n}"),
        )),
    }
}

pub(super) fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::UnknownCursor(id) => ApiError::bad_request(
            Some("after"),
            ErrorCode::InvalidCursor,
            format!("after names no item of this list: {id:?}"),
        ),
        other => ApiError::internal(other),
    }
}

/// `GET /admin/jobs[?limit=N&after=ID]`, newest first.
pub async fn list_jobs(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ListPage<jobs::Job>>, ApiError> {
    let Query(params) = params.map_err(query_error)?;
    let limit = page_size(params.limit)?;
    let page = jobs::page(admin(&state)?.pool(), params.after.as_deref(), limit).await.map_err(store_error)?;
    Ok(Json(ListPage::new(page, |j| &j.id)))
}

/// `GET /admin/jobs/{id}`.
pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<jobs::Job>, ApiError> {
    match jobs::get(admin(&state)?.pool(), &id).await.map_err(ApiError::internal)? {
        Some(j) => Ok(Json(j)),
        None => Err(not_found(ErrorCode::JobNotFound, "job", &id)),
    }
}

/// `DELETE /admin/jobs/{id}`: a queued job is cancelled at once, a running one at its next layer.
pub async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<jobs::Job>, ApiError> {
    let admin = admin(&state)?;
    let job = jobs::get(admin.pool(), &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(ErrorCode::JobNotFound, "job", &id))?;
    if job.status.is_final() {
        return Err(ApiError::bad_request(
            Some("id"),
            ErrorCode::JobFinished,
            format!("job {id} already ended ({:?})", job.status),
        ));
    }
    admin.jobs.cancel(&id);
    if job.status == JobStatus::Queued {
        let now = crate::store::now();
        jobs::finish(admin.pool(), &id, JobStatus::Cancelled, None, &[], &now).await.map_err(ApiError::internal)?;
    }
    let job = jobs::get(admin.pool(), &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(ErrorCode::JobNotFound, "job", &id))?;
    Ok(Json(job))
}

/// `GET /admin/recipes` query.
#[derive(Debug, Deserialize)]
pub struct RecipeFilter {
    /// A model fingerprint, or `loaded` for the model being served.
    model: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

/// `GET /admin/recipes[?model=FINGERPRINT|loaded][&limit=N&after=ID]`.
pub async fn list_recipes(
    State(state): State<AppState>,
    filter: Result<Query<RecipeFilter>, QueryRejection>,
) -> Result<Json<ListPage<Recipe>>, ApiError> {
    let Query(filter) = filter.map_err(query_error)?;
    let admin = admin(&state)?;
    let limit = page_size(filter.limit)?;
    let model = match filter.model.as_deref() {
        Some("loaded") => Some(state.engine.ready()?.info.fingerprint.clone()),
        other => other.map(str::to_string),
    };
    let page =
        recipes::page(admin.pool(), model.as_deref(), filter.after.as_deref(), limit).await.map_err(store_error)?;
    Ok(Json(ListPage::new(page, |r| &r.id)))
}

/// `GET /admin/recipes/{id}`.
pub async fn get_recipe(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Recipe>, ApiError> {
    match recipes::get(admin(&state)?.pool(), &id).await.map_err(ApiError::internal)? {
        Some(r) => Ok(Json(r)),
        None => Err(not_found(ErrorCode::RecipeNotFound, "recipe", &id)),
    }
}

/// `DELETE /admin/recipes/{id}`.
pub async fn delete_recipe(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let admin = admin(&state)?;
    if !recipes::delete(admin.pool(), &id).await.map_err(ApiError::internal)? {
        return Err(not_found(ErrorCode::RecipeNotFound, "recipe", &id));
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
                ErrorCode::UnknownScheme,
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
        .map_err(|e| ApiError::bad_request(Some("deletions"), ErrorCode::InvalidRecipe, e.to_string()))?;
    // Checked here so the insert cannot fail on the foreign key: every client fault is a 400
    // by now, and an insert error is the server's.
    if let Some(job) = &recipe.job_id {
        if jobs::get(admin.pool(), job).await.map_err(ApiError::internal)?.is_none() {
            return Err(ApiError::bad_request(Some("job_id"), ErrorCode::JobNotFound, format!("no job {job:?}")));
        }
    }
    recipes::insert(admin.pool(), &recipe).await.map_err(ApiError::internal)?;
    admin.recipes.invalidate();
    if let Ok(n) = recipes::count(admin.pool()).await {
        state.metrics.recipes_stored.set(n);
    }
    Ok((StatusCode::CREATED, Json(recipe)).into_response())
}

pub(super) fn not_found(code: ErrorCode, what: &str, id: &str) -> ApiError {
    ApiError::NotFound { message: format!("no {what} {id:?}"), param: Some("id".into()), code }
}
