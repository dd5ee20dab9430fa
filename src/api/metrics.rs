//! `GET /metrics` (Prometheus text) and the middleware that counts every request by route
//! template and status and times it until the last body byte (streams included).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;

use crate::metrics::Metrics;

use super::error::ApiError;
use super::AppState;

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state.metrics.render().map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// Counts and times a request (route label = the matched template, or `unmatched`).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    state.metrics.requests.with_label_values(&[&route, &status]).inc();
    let timer = DoneTimer { metrics: state.metrics.clone(), route, start };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(TimedBody { inner: body, _timer: timer }))
}

/// Observes the request duration when the body is finished or dropped.
struct DoneTimer {
    metrics: Metrics,
    route: String,
    start: Instant,
}

impl Drop for DoneTimer {
    fn drop(&mut self) {
        self.metrics.request_duration.with_label_values(&[&self.route]).observe(self.start.elapsed().as_secs_f64());
    }
}

/// A response body that carries a [`DoneTimer`].
struct TimedBody {
    inner: Body,
    _timer: DoneTimer,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
