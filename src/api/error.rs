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
use crate::protocol::{ErrorBody, ErrorCode, ErrorDetail};
use crate::validation::ValidationError;

/// Seconds a client should wait after a 429.
pub const RETRY_AFTER_S: u64 = 1;

/// What a client sees of a server fault: the details go to the log (with the request id).
pub const INTERNAL_MESSAGE: &str =
    "internal server error; the server log has the details under this response's x-request-id";

/// An error response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed or invalid input.
    #[error("{message}")]
    BadRequest { message: String, param: Option<String>, code: ErrorCode },
    /// 401: missing or wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the route is disabled on this server (admin API without a token).
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown route, model or recipe.
    #[error("{message}")]
    NotFound { message: String, param: Option<String>, code: ErrorCode },
    /// 405: the route exists with other methods.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: the body is over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422: well-formed input the model cannot process.
    #[error("{message}")]
    Unprocessable { message: String, param: Option<String>, code: ErrorCode },
    /// 429: the queue is full.
    #[error("{0}")]
    TooManyRequests(String),
    /// 500: a server fault (never bad input). The text is logged, never sent.
    #[error("{0}")]
    Internal(String),
    /// 503: loading, shutting down, stopped or timed out.
    #[error("{message}")]
    Unavailable { message: String, code: ErrorCode },
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn bad_request(param: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: param.map(str::to_string), code }
    }

    /// A 500 from a lower layer's error (a store query, a broken invariant).
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
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

    /// The machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest { code, .. } | Self::NotFound { code, .. } | Self::Unprocessable { code, .. } => *code,
            Self::Unavailable { code, .. } => *code,
            Self::Unauthorized(_) => ErrorCode::InvalidApiKey,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            Self::PayloadTooLarge(_) => ErrorCode::RequestTooLarge,
            Self::TooManyRequests(_) => ErrorCode::QueueFull,
            Self::Internal(_) => ErrorCode::InternalError,
        }
    }

    /// Logs the error with its details. Called inside the request's span (handlers, and SSE
    /// bodies, which tower-http polls in it), so the line carries the x-request-id.
    pub fn log(&self) {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request refused");
        }
    }

    /// The OpenAI-shaped body (a server fault's details stay out of it).
    pub fn body(&self) -> ErrorBody {
        let (kind, param) = match self {
            Self::BadRequest { param, .. } | Self::Unprocessable { param, .. } => ("invalid_request_error", param),
            Self::NotFound { param, .. } => ("not_found_error", param),
            Self::Unauthorized(_) => ("authentication_error", &None),
            Self::Forbidden(_) => ("permission_error", &None),
            Self::MethodNotAllowed(_) | Self::PayloadTooLarge(_) => ("invalid_request_error", &None),
            Self::TooManyRequests(_) => ("rate_limit_error", &None),
            Self::Internal(_) => ("server_error", &None),
            Self::Unavailable { .. } => ("service_unavailable_error", &None),
        };
        let message = match self {
            Self::Internal(_) => INTERNAL_MESSAGE.to_string(),
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.into(),
                param: param.clone(),
                code: Some(self.code().as_str().to_string()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let mut resp = (status, Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS || self.code() == ErrorCode::ModelLoading {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        resp
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Invalid { param, message, code } => Self::BadRequest { message, param: Some(param), code },
            e @ ValidationError::UnknownModel { .. } => {
                Self::NotFound { message: e.to_string(), param: Some("model".into()), code: ErrorCode::ModelNotFound }
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let unavailable = |code, e: &EngineError| Self::Unavailable { message: e.to_string(), code };
        match e {
            EngineError::QueueFull { .. } => Self::TooManyRequests(e.to_string()),
            EngineError::Loading => unavailable(ErrorCode::ModelLoading, &e),
            EngineError::LoadFailed(_) => unavailable(ErrorCode::ModelLoadFailed, &e),
            EngineError::ShuttingDown => unavailable(ErrorCode::ShuttingDown, &e),
            EngineError::Stopped => unavailable(ErrorCode::EngineStopped, &e),
            EngineError::Timeout(_) => unavailable(ErrorCode::RequestTimeout, &e),
            // Requests reach the engine validated and prepared (the prompt fits the context), so
            // a model error there, even one the model layer calls `InvalidInput` (a hook's
            // answer, a batch shape), is a broken invariant or a device fault: a 500.
            EngineError::Model(m) => Self::Internal(m.to_string()),
            EngineError::Internal(m) => Self::Internal(m),
            EngineError::Schedule(ref s) => Self::BadRequest {
                message: s.to_string(),
                param: Some("max_tokens".into()),
                code: ErrorCode::KvCacheExceeded,
            },
        }
    }
}

/// Errors of `LlavaModel::prepare` (rendering, image checks, tokenizing a request).
impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput(message) => {
                Self::BadRequest { message, param: Some("messages".into()), code: ErrorCode::InvalidInput }
            }
            ModelError::Prompt(PromptError::Rejected { message }) => Self::Unprocessable {
                message: format!("the model's chat template rejected the conversation: {message}"),
                param: Some("messages".into()),
                code: ErrorCode::TemplateRejected,
            },
            ModelError::Preprocess(p) => Self::Unprocessable {
                message: format!("the image could not be preprocessed: {p}"),
                param: Some("messages".into()),
                code: ErrorCode::InvalidImage,
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
        let e: ApiError = ValidationError::invalid("top_p", ErrorCode::InvalidValue, "bad").into();
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

    #[test]
    fn faults_inside_the_engine_are_500s_that_keep_their_details_out_of_the_body() {
        // The model layer reports a broken invariant as InvalidInput; past validation it is ours.
        let e: ApiError =
            EngineError::Model(ModelError::InvalidInput("decoder got 3 rows for 4 positions".into())).into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_value(e.body()).unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "internal_error");
        assert_eq!(body["error"]["message"], INTERNAL_MESSAGE);
        assert!(!body.to_string().contains("rows"), "{body}");
        // The detail is still what gets logged.
        assert!(e.to_string().contains("3 rows"));
    }

    #[test]
    fn every_code_has_a_distinct_snake_case_name() {
        let names: std::collections::HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
