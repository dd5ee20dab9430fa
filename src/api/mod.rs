//! The HTTP layer: axum handlers only (extract -> validate -> engine -> respond), plus the
//! router with its layers (request ids, tracing, metrics, body limit, API key).

pub mod admin;
pub mod auth;
pub mod calibrate;
pub mod error;
pub mod evaluate;
pub mod evaluations;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod openai;
mod sse;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, Method};
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::engine::recipes::RecipeSource;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::validation::images::ImageFetcher;
use crate::validation::ValidationSettings;

use self::error::ApiError;
use crate::protocol::ErrorCode;

/// Every served (method, path) pair, as written in openapi.yaml (a test checks they agree).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/admin/calibrate"),
    ("GET", "/admin/jobs"),
    ("GET", "/admin/jobs/{id}"),
    ("DELETE", "/admin/jobs/{id}"),
    ("POST", "/admin/evaluations"),
    ("GET", "/admin/evaluations"),
    ("GET", "/admin/evaluations/{id}"),
    ("DELETE", "/admin/evaluations/{id}"),
    ("GET", "/admin/recipes"),
    ("POST", "/admin/recipes"),
    ("GET", "/admin/recipes/{id}"),
    ("DELETE", "/admin/recipes/{id}"),
];

/// The request-id header set on every request and response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Request validation (served name, image limits, default budget).
    pub validation: ValidationSettings,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Unix time the server started (`created` of the model card).
    pub started: i64,
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Metrics (the same instance the engine records into).
    pub metrics: Metrics,
    /// Pruning recipes.
    pub recipes: Arc<dyn RecipeSource>,
    /// Image URL fetcher with its limits.
    pub fetcher: ImageFetcher,
    /// Settings.
    pub settings: Arc<ApiSettings>,
    /// Admin API state (store, calibration and evaluation threads, token); `None` answers 403
    /// on /admin.
    pub admin: Option<Arc<admin::AdminState>>,
}

/// The router with every route and layer.
pub fn build_app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model}", get(openai::get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    let admin_routes = Router::new()
        .route("/admin/calibrate", post(calibrate::calibrate))
        .route("/admin/jobs", get(admin::list_jobs))
        .route("/admin/jobs/{id}", get(admin::get_job).delete(admin::cancel_job))
        .route("/admin/evaluations", get(evaluations::list_evaluations).post(evaluate::evaluate))
        .route("/admin/evaluations/{id}", get(evaluations::get_evaluation).delete(evaluations::cancel_evaluation))
        .route("/admin/recipes", get(admin::list_recipes).post(admin::import_recipe))
        .route("/admin/recipes/{id}", get(admin::get_recipe).delete(admin::delete_recipe))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin_token));
    Router::new()
        .merge(v1)
        .merge(admin_routes)
        .route("/health", get(health::health))
        .route("/metrics", get(metrics::metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("http", request_id = %id, method = %req.method(), path = %req.uri().path())
                })
                // One access-log line per request; 5xx (e.g. /health while loading) are warnings.
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound {
        message: format!("no route {method} {}", uri.path()),
        param: None,
        code: ErrorCode::UnknownRoute,
    }
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
