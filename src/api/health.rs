//! `GET /health`: 200 once the model is loaded, 503 while loading, after a failed load and
//! during shutdown (so load balancers stop sending traffic).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::engine::EngineState;

use super::AppState;

/// The health body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, `loading`, `failed`, `shutting_down` or `stopped`.
    pub status: String,
    /// The served model name.
    pub model: String,
    /// Why the server is not healthy, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /health`.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (status, error) = match state.engine.state() {
        _ if state.engine.is_draining() => ("shutting_down", None),
        EngineState::Ready(_) => ("ok", None),
        EngineState::Loading => ("loading", None),
        EngineState::Failed(e) => ("failed", Some(e)),
        EngineState::Stopped => ("stopped", None),
    };
    let code = if status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let model = state.settings.validation.served_model_name.clone();
    (code, Json(Health { status: status.into(), model, error }))
}
