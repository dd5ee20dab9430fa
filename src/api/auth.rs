//! Bearer-token checks for `/v1` (API key) and `/admin` (admin token): the scheme name is
//! case-insensitive (RFC 7235 §2.1) and tokens are compared in constant time, so response timing
//! does not reveal how much of a guessed key was right.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// The credentials of `Authorization: <scheme> <token>` when the scheme is `Bearer` in any case.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether `given` equals `expected`, in time that depends only on their lengths.
pub fn token_matches(given: Option<&str>, expected: &str) -> bool {
    bool::from(given.unwrap_or("").as_bytes().ct_eq(expected.as_bytes()))
}

/// Refuses `/v1/*` requests without `Authorization: Bearer <api key>` when a key is configured.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.settings.api_key {
        if !token_matches(bearer(req.headers()), key) {
            return ApiError::Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)".into())
                .into_response();
        }
    }
    next.run(req).await
}

/// Requires `Authorization: Bearer <admin token>`; without a configured token the admin API is off.
pub async fn require_admin_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.admin.as_ref().and_then(|a| a.token.as_deref()) else {
        return ApiError::Forbidden(
            "the admin API is disabled: start the server with --admin-token (or FITPRUNE_ADMIN_TOKEN) to enable it"
                .into(),
        )
        .into_response();
    };
    if !token_matches(bearer(req.headers()), expected) {
        return ApiError::Unauthorized("a valid admin token is required: Authorization: Bearer <token>".into())
            .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_other_schemes_are_not_bearer() {
        for v in ["Bearer k1", "bearer k1", "BEARER k1", "bEaReR   k1 "] {
            assert_eq!(bearer(&auth(v)), Some("k1"), "{v}");
        }
        for v in ["Basic k1", "Bearerk1", "k1", "Token k1"] {
            assert_eq!(bearer(&auth(v)), None, "{v}");
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn tokens_must_match_exactly() {
        assert!(token_matches(Some("s3cret"), "s3cret"));
        for wrong in [Some("s3cre"), Some("s3cret2"), Some(""), None, Some("S3CRET")] {
            assert!(!token_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
