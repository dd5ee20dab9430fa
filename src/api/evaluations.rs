//! Admin API (Bearer token): evaluation jobs — list, get (with the per-budget x method rows),
//! cancel — mirroring the calibration-job routes in [`super::admin`] (`POST /admin/evaluations`
//! is in [`super::evaluate`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;

use crate::protocol::ErrorCode;
use crate::store::evaluations::{self, Evaluation};
use crate::store::jobs::JobStatus;

use super::admin::{admin, not_found, page_size, query_error, store_error, ListPage, ListParams};
use super::error::ApiError;
use super::AppState;

/// `GET /admin/evaluations[?limit=N&after=ID]`, newest first.
pub async fn list_evaluations(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ListPage<Evaluation>>, ApiError> {
    let Query(params) = params.map_err(query_error)?;
    let limit = page_size(params.limit)?;
    let page = evaluations::page(admin(&state)?.pool(), params.after.as_deref(), limit).await.map_err(store_error)?;
    Ok(Json(ListPage::new(page, |e| &e.id)))
}

/// `GET /admin/evaluations/{id}`.
pub async fn get_evaluation(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Evaluation>, ApiError> {
    match evaluations::get(admin(&state)?.pool(), &id).await.map_err(ApiError::internal)? {
        Some(e) => Ok(Json(e)),
        None => Err(not_found(ErrorCode::EvaluationNotFound, "evaluation", &id)),
    }
}

/// `DELETE /admin/evaluations/{id}`: a queued job is cancelled at once, a running one at its
/// next forward pass; a cancelled job stores no rows.
pub async fn cancel_evaluation(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Evaluation>, ApiError> {
    let admin = admin(&state)?;
    let missing = || not_found(ErrorCode::EvaluationNotFound, "evaluation", &id);
    let job = evaluations::get(admin.pool(), &id).await.map_err(ApiError::internal)?.ok_or_else(missing)?;
    if job.status.is_final() {
        return Err(ApiError::bad_request(
            Some("id"),
            ErrorCode::JobFinished,
            format!("evaluation {id} already ended ({:?})", job.status),
        ));
    }
    admin.evaluations.cancel(&id);
    if job.status == JobStatus::Queued {
        let now = crate::store::now();
        evaluations::finish(admin.pool(), &id, JobStatus::Cancelled, None, &now).await.map_err(ApiError::internal)?;
    }
    let job = evaluations::get(admin.pool(), &id).await.map_err(ApiError::internal)?.ok_or_else(missing)?;
    Ok(Json(job))
}
