//! [`ApiError`]: every failure an HTTP client can see, converted from the lower layers' errors
//! and rendered as OpenAI's `{"error": {"message", "type", "param", "code"}}`. The status match
//! lives here and nowhere else.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::recipes::RecipeError;
use crate::engine::EngineError;
use crate::model::prompt::PromptError;
use crate::model::ModelError;
use crate::protocol::{ErrorBody, ErrorDetail};
use crate::validation::ValidationError;

/// Seconds a client should wait after a 429.
pub const RETRY_AFTER_S: u64 = 1;

/// An error response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed or invalid input.
    #[error("{message}")]
    BadRequest { message: String, param: Option<String>, code: Option<String> },
    /// 401: missing or wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the route is disabled on this server (admin API without a token).
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown route, model or recipe.
    #[error("{message}")]
    NotFound { message: String, param: Option<String>, code: String },
    /// 405: the route exists with other methods.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: the body is over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422: well-formed input the model cannot process.
    #[error("{message}")]
    Unprocessable { message: String, param: Option<String>, code: String },
    /// 429: the queue is full.
    #[error("{0}")]
    TooManyRequests(String),
    /// 500: a server fault (never bad input).
    #[error("{0}")]
    Internal(String),
    /// 503: loading, shutting down, stopped or timed out.
    #[error("{message}")]
    Unavailable { message: String, code: String },
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn bad_request(param: Option<&str>, code: &str, message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: param.map(str::to_string), code: Some(code.to_string()) }
    }

    /// The one status match.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI-shaped body.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::BadRequest { param, code, .. } => ("invalid_request_error", param.clone(), code.clone()),
            Self::Unauthorized(_) => ("authentication_error", None, Some("invalid_api_key".into())),
            Self::Forbidden(_) => ("permission_error", None, Some("forbidden".into())),
            Self::NotFound { param, code, .. } => ("not_found_error", param.clone(), Some(code.clone())),
            Self::MethodNotAllowed(_) => ("invalid_request_error", None, Some("method_not_allowed".into())),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("request_too_large".into())),
            Self::Unprocessable { param, code, .. } => ("invalid_request_error", param.clone(), Some(code.clone())),
            Self::TooManyRequests(_) => ("rate_limit_error", None, Some("queue_full".into())),
            Self::Internal(_) => ("server_error", None, None),
            Self::Unavailable { code, .. } => ("service_unavailable_error", None, Some(code.clone())),
        };
        ErrorBody { error: ErrorDetail { message: self.to_string(), kind: kind.into(), param, code } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request refused");
        }
        let mut resp = (status, Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS
            || matches!(&self, Self::Unavailable { code, .. } if code == "model_loading")
        {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        resp
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Invalid { param, message, code } => {
                Self::BadRequest { message, param: Some(param), code: Some(code.to_string()) }
            }
            e @ ValidationError::UnknownModel { .. } => {
                Self::NotFound { message: e.to_string(), param: Some("model".into()), code: "model_not_found".into() }
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let unavailable = |code: &str, e: &EngineError| Self::Unavailable { message: e.to_string(), code: code.into() };
        match e {
            EngineError::QueueFull { .. } => Self::TooManyRequests(e.to_string()),
            EngineError::Loading => unavailable("model_loading", &e),
            EngineError::LoadFailed(_) => unavailable("model_load_failed", &e),
            EngineError::ShuttingDown => unavailable("shutting_down", &e),
            EngineError::Stopped => unavailable("engine_stopped", &e),
            EngineError::Timeout(_) => unavailable("request_timeout", &e),
            EngineError::Schedule(ref s) => Self::BadRequest {
                message: s.to_string(),
                param: Some("max_tokens".into()),
                code: Some("kv_cache_exceeded".into()),
            },
            EngineError::Model(m) => m.into(),
            EngineError::Internal(m) => Self::Internal(m),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput(message) => {
                Self::BadRequest { message, param: Some("messages".into()), code: Some("invalid_input".into()) }
            }
            ModelError::Prompt(PromptError::Rejected { message }) => Self::Unprocessable {
                message: format!("the model's chat template rejected the conversation: {message}"),
                param: Some("messages".into()),
                code: "template_rejected".into(),
            },
            ModelError::Preprocess(p) => Self::Unprocessable {
                message: format!("the image could not be preprocessed: {p}"),
                param: Some("messages".into()),
                code: "invalid_image".into(),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<RecipeError> for ApiError {
    fn from(e: RecipeError) -> Self {
        Self::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_keep_param_and_code() {
        let e: ApiError = ValidationError::invalid("top_p", "invalid_value", "bad").into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = serde_json::to_value(e.body()).unwrap();
        assert_eq!(body["error"]["param"], "top_p");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_value");
        assert_eq!(body["error"]["message"], "bad");
    }

    #[test]
    fn engine_errors_map_to_429_and_503_with_retry_after() {
        let e: ApiError = EngineError::QueueFull { max_waiting: 3 }.into();
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let e: ApiError = EngineError::Loading.into();
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e: ApiError = ModelError::InvalidInput("too long".into()).into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e: ApiError = ModelError::Tokenizer("boom".into()).into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
