//! Streaming completions as server-sent events in OpenAI's shape: a first chunk with the role,
//! one chunk per token that releases text (or carries logprobs), a last chunk with
//! `finish_reason`, an optional usage chunk, then `data: [DONE]`. An error after the stream has
//! started is sent as a `data: {"error": ...}` event before `[DONE]`.
//!
//! Dropping the response body (client gone) drops the engine receiver, which cancels the
//! sequence at its next step.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Event, PrefillReport};
use crate::protocol::chat::ChoiceLogprobs;
use crate::protocol::stream::{ChatCompletionChunk, ChunkChoice, Delta};

use super::error::ApiError;
use super::openai::{finish_reason, usage, ResponseMeta};

struct StreamState {
    meta: ResponseMeta,
    prefill: PrefillReport,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
    /// Events ready to send.
    out: VecDeque<SseEvent>,
    /// `[DONE]` has been queued.
    done: bool,
}

/// The SSE response for a request whose prefill is done.
pub(super) fn respond(
    meta: ResponseMeta,
    prefill: PrefillReport,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut state = StreamState { meta, prefill, rx, include_usage, out: VecDeque::new(), done: false };
    let first = state.chunk(Delta { role: Some("assistant".into()), content: Some(String::new()) }, None, None);
    state.out.push_back(first);
    let stream = futures::stream::unfold(state, |mut st| async move {
        let event = st.next().await?;
        Some((Ok(event), st))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

impl StreamState {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.out.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some(Event::Prefilled(_)) => {}
                Some(Event::Token(t)) => {
                    let lp = self.meta.logprob(&t);
                    if !t.text.is_empty() || lp.is_some() {
                        let logprobs = lp.map(|entry| ChoiceLogprobs { content: vec![entry] });
                        let chunk = self.chunk(Delta { role: None, content: Some(t.text) }, logprobs, None);
                        self.out.push_back(chunk);
                    }
                }
                Some(Event::Finished(f)) => {
                    let content = (!f.tail.is_empty()).then(|| f.tail.clone());
                    let mut last = self.chunk_value(Delta { role: None, content }, None, Some(finish_reason(f.reason)));
                    last.pruning = Some(self.meta.pruning(&self.prefill));
                    self.out.push_back(json_event(&last));
                    if self.include_usage {
                        let mut u = self.chunk_value(Delta::default(), None, None);
                        u.choices.clear();
                        u.usage = Some(usage(&f));
                        self.out.push_back(json_event(&u));
                    }
                    self.finish();
                }
                Some(Event::Failed(e)) => {
                    let e = ApiError::from(e);
                    e.log();
                    self.out.push_back(json_event(&e.body()));
                    self.finish();
                }
                None => {
                    let e = ApiError::Internal("the engine ended the stream without a result".into());
                    e.log();
                    self.out.push_back(json_event(&e.body()));
                    self.finish();
                }
            }
        }
    }

    fn finish(&mut self) {
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    fn chunk_value(
        &self,
        delta: Delta,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<String>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![ChunkChoice { index: 0, delta, logprobs, finish_reason: finish }],
            usage: None,
            pruning: None,
        }
    }

    fn chunk(&self, delta: Delta, logprobs: Option<ChoiceLogprobs>, finish: Option<String>) -> SseEvent {
        json_event(&self.chunk_value(delta, logprobs, finish))
    }
}

fn json_event<T: serde::Serialize>(value: &T) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(s) => SseEvent::default().data(s),
        Err(e) => SseEvent::default().data(format!(r#"{{"error": {{"message": "serialization failed: {e}"}}}}"#)),
    }
}
