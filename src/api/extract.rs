//! [`ApiJson`]: a JSON body extractor whose rejection is an [`ApiError`], so malformed JSON,
//! wrong types and oversized bodies answer in OpenAI's error shape (axum's default rejections
//! are plain text). Wrong types name the field's path in `param`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::protocol::ErrorCode;

/// A JSON request body of type `T`.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parses a body, reporting the path of the offending field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let param = param_of(&path, &inner.to_string());
                ApiError::bad_request(
                    param.as_deref(),
                    ErrorCode::InvalidType,
                    format!("invalid request body: {inner}"),
                )
            }
            _ => ApiError::bad_request(None, ErrorCode::InvalidJson, format!("the body is not valid JSON: {inner}")),
        }
    })?;
    // serde stops after the first value; anything but whitespace after it (`{...} xyz`, a
    // second object) means the client sent something other than what was parsed.
    de.end().map_err(|e| {
        ApiError::bad_request(None, ErrorCode::InvalidJson, format!("the body has data after the JSON value: {e}"))
    })?;
    Ok(value)
}

/// The field a data error is about: its path, plus the field name of a "missing field" error.
fn param_of(path: &str, message: &str) -> Option<String> {
    let path = if path == "." { "" } else { path };
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
    match (path, missing) {
        ("", None) => None,
        ("", Some(field)) => Some(field.to_string()),
        (p, Some(field)) => Some(format!("{p}.{field}")),
        (p, None) => Some(p.to_string()),
    }
}

fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!("the request body is too large: {}", e.body_text()))
    } else {
        ApiError::bad_request(
            None,
            ErrorCode::InvalidBody,
            format!("could not read the request body: {}", e.body_text()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChatRequest;

    fn param(body: &str) -> (Option<String>, ErrorCode) {
        match parse::<ChatRequest>(body.as_bytes()) {
            Err(ApiError::BadRequest { param, code, .. }) => (param, code),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(param("{"), (None, ErrorCode::InvalidJson));
        assert_eq!(param("{}"), (Some("messages".into()), ErrorCode::InvalidType));
        assert_eq!(
            param(r#"{"messages": [{"content": "x"}]}"#),
            (Some("messages[0].role".into()), ErrorCode::InvalidType)
        );
        assert_eq!(
            param(r#"{"messages": [], "temperature": "hot"}"#),
            (Some("temperature".into()), ErrorCode::InvalidType)
        );
        assert_eq!(
            param(r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#),
            (Some("messages[0].content[0].image_url.url".into()), ErrorCode::InvalidType)
        );
        assert_eq!(
            param(r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#),
            (Some("messages[0].content[0].text".into()), ErrorCode::InvalidType)
        );
    }

    #[test]
    fn trailing_data_after_the_value_is_refused() {
        assert_eq!(param(r#"{"messages": []} xyz"#), (None, ErrorCode::InvalidJson));
        assert_eq!(param(r#"{"messages": []}{"messages": []}"#), (None, ErrorCode::InvalidJson));
        // Trailing whitespace is still fine.
        assert!(parse::<ChatRequest>(b"{\"messages\": []}\n \t").is_ok());
    }
}
