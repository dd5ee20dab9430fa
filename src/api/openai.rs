//! OpenAI-compatible handlers: `POST /v1/chat/completions` (extract -> validate -> fetch and
//! decode images -> choose a recipe -> tokenize -> engine -> JSON or SSE) and `GET /v1/models`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::recipes::{self, Selected};
use crate::engine::sequence::{FinishReason, GeneratedToken};
use crate::engine::{ChatJob, Event, FinishReport, LoadedModel, PrefillReport};
use crate::model::{PreparedPrompt, TokenizedPrompt};
use crate::protocol::chat::{
    AssistantMessage, ChatCompletion, ChatRequest, Choice, ChoiceLogprobs, PruningInfo, TokenLogprob, TopLogprob, Usage,
};
use crate::protocol::models::{ModelCard, ModelList};
use crate::pruning::Recipe;
use crate::validation::context::{self, PromptShape};
use crate::validation::{images, LogprobOptions, ValidRequest};

use super::error::ApiError;
use super::extract::ApiJson;
use super::{sse, AppState};
use crate::protocol::ErrorCode;

/// What every response of one completion shares.
pub(super) struct ResponseMeta {
    pub(super) id: String,
    pub(super) created: i64,
    pub(super) model: String,
    pub(super) logprobs: Option<LogprobOptions>,
    pub(super) loaded: Arc<LoadedModel>,
    pub(super) recipe: Option<Arc<Recipe>>,
    pub(super) unpruned_reason: Option<&'static str>,
}

impl ResponseMeta {
    /// A token's logprob entry, if logprobs were requested.
    pub(super) fn logprob(&self, t: &GeneratedToken) -> Option<TokenLogprob> {
        let opts = self.logprobs?;
        let bytes = &self.loaded.token_bytes;
        let name = |id: u32| if opts.as_token_ids { format!("token_id:{id}") } else { bytes.text(id) };
        Some(TokenLogprob {
            token: name(t.id),
            logprob: t.logprob,
            bytes: bytes.get(t.id).to_vec(),
            top_logprobs: t
                .top
                .iter()
                .map(|&(id, logprob)| TopLogprob { token: name(id), logprob, bytes: bytes.get(id).to_vec() })
                .collect(),
        })
    }

    /// The `pruning` report.
    pub(super) fn pruning(&self, p: &PrefillReport) -> PruningInfo {
        let applied = self.recipe.as_ref().filter(|_| p.visual_tokens > 0);
        let reason = match (applied, self.unpruned_reason) {
            (Some(_), _) => None,
            (None, Some(why)) => Some(why),
            (None, None) => Some("no images"),
        };
        PruningInfo {
            recipe_id: applied.map(|r| r.id.clone()),
            budget: applied.map(|r| r.budget),
            visual_tokens: p.visual_tokens,
            visual_tokens_kept: p.visual_kept,
            flops_reduction: p.flops_reduction,
            reason: reason.map(str::to_string),
        }
    }
}

/// `stop` or `length`.
pub(super) fn finish_reason(r: FinishReason) -> String {
    match r {
        FinishReason::Stop => "stop".into(),
        FinishReason::Length => "length".into(),
    }
}

/// Usage from the end of a request.
pub(super) fn usage(f: &FinishReport) -> Usage {
    Usage {
        prompt_tokens: f.prompt_tokens,
        completion_tokens: f.completion_tokens,
        total_tokens: f.prompt_tokens + f.completion_tokens,
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let loaded = state.engine.ready()?;
    let valid = crate::validation::validate(req, &state.settings.validation)?;
    let (recipe, unpruned_reason) = match recipes::select(&*state.recipes, &loaded.info, &valid.pruning).await? {
        Selected::Recipe(r) => (Some(r), None),
        Selected::Unpruned(why) => (None, Some(why)),
        Selected::UnknownId(id) => {
            return Err(ApiError::NotFound {
                message: format!("no recipe `{id}` for the loaded model"),
                param: Some("pruning.recipe_id".into()),
                code: ErrorCode::RecipeNotFound,
            })
        }
    };
    let prompt = prepare(&state, &loaded, &valid).await?;
    let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let recipe_label = recipe.as_ref().map_or("none", |r| r.id.as_str()).to_string();
    state.metrics.requests_by_recipe.with_label_values(&[recipe_label.as_str()]).inc();
    let job = ChatJob { request_id, prompt, params: valid.params.clone(), recipe: recipe.clone() };
    let mut rx = state.engine.submit(job)?;
    // Wait for prefill so errors up to there (timeout in the queue, shutdown, a prompt the
    // model refuses) still get a proper status instead of a 200 stream that fails.
    let prefill = match rx.recv().await {
        Some(Event::Prefilled(p)) => p,
        Some(Event::Failed(e)) => return Err(e.into()),
        _ => return Err(ApiError::Internal("the engine ended the request before prefill".into())),
    };
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: chrono::Utc::now().timestamp(),
        model: loaded.info.name.clone(),
        logprobs: valid.logprobs,
        loaded: loaded.clone(),
        recipe,
        unpruned_reason,
    };
    let mut resp = if valid.stream {
        sse::respond(meta, prefill, rx, valid.include_usage).into_response()
    } else {
        Json(collect(meta, prefill, rx).await?).into_response()
    };
    if let Ok(v) = axum::http::HeaderValue::from_str(&recipe_label) {
        resp.headers_mut().insert("x-fitprune-recipe", v);
    }
    Ok(resp)
}

/// Fetches the images and reads their headers; tokenizes the prompt for the images' sizes and
/// checks it against the context (so a prompt whose images do not fit is refused before any
/// pixel is decoded); reserves the images' decoded size from the server-wide budget (waiting
/// while other requests hold it); then decodes them and adds the pixels, off the async workers.
/// The reservation ends when the decoded images are dropped, with the prompt's pixel tensor built.
async fn prepare(
    state: &AppState,
    loaded: &Arc<LoadedModel>,
    valid: &ValidRequest,
) -> Result<PreparedPrompt, ApiError> {
    let bytes = state.fetcher.fetch_all(&valid.images).await?;
    // Only the field paths travel to the blocking tasks: the refs hold data-URL bytes.
    let params: Vec<String> = valid.images.iter().map(|r| r.param.clone()).collect();
    let limits = state.fetcher.limits().clone();
    let mut decoded_bytes = 0u64;
    let mut sizes = Vec::with_capacity(params.len());
    for (b, param) in bytes.iter().zip(&params) {
        let header = images::inspect(b, param, &limits)?;
        decoded_bytes += header.decoded_bytes;
        let (w, h) = header.upright_size();
        sizes.push((h, w));
    }
    let messages = valid.messages.clone();
    let model = loaded.model.clone();
    let max_context = loaded.info.max_context;
    let (max_tokens_param, max_tokens) = (valid.max_tokens_param, valid.params.max_tokens);
    let parts: Vec<String> = valid.images.iter().map(|r| r.part().to_string()).collect();
    let check = move |shape: PromptShape<'_>, parts: &[String]| {
        context::check(shape, parts, max_context, max_tokens_param, max_tokens)
    };
    let tokenized = {
        let (model, messages, parts) = (model.clone(), messages.clone(), parts.clone());
        tokio::task::spawn_blocking(move || -> Result<TokenizedPrompt, ApiError> {
            let t = model.tokenize(&messages, &sizes)?;
            let shape =
                PromptShape { tokens: t.input_ids.len(), image_spans: &t.image_spans, image_sizes: &t.image_sizes };
            check(shape, &parts)?;
            Ok(t)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("prompt tokenization panicked: {e}")))??
    };
    let permit = state.fetcher.decode_budget().reserve(decoded_bytes).await;
    tokio::task::spawn_blocking(move || -> Result<PreparedPrompt, ApiError> {
        let _permit = permit;
        let decoded = bytes
            .iter()
            .zip(&params)
            .map(|(b, param)| images::decode(b, param, &limits))
            .collect::<Result<Vec<_>, _>>()?;
        let decoded_sizes: Vec<(u32, u32)> = decoded.iter().map(|i| (i.height(), i.width())).collect();
        if decoded_sizes == tokenized.image_sizes {
            return Ok(model.prepare_tokenized(tokenized, &decoded)?);
        }
        // A decoder disagreeing with its header: count again from the pixels and check again.
        let prompt = model.prepare(&messages, &decoded)?;
        let shape = PromptShape {
            tokens: prompt.input_ids.len(),
            image_spans: &prompt.image_spans,
            image_sizes: &prompt.image_sizes,
        };
        check(shape, &parts)?;
        Ok(prompt)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("prompt preparation panicked: {e}")))?
}

/// Gathers a whole completion.
async fn collect(
    meta: ResponseMeta,
    prefill: PrefillReport,
    mut rx: UnboundedReceiver<Event>,
) -> Result<ChatCompletion, ApiError> {
    let mut content = String::new();
    let mut logprobs = meta.logprobs.map(|_| ChoiceLogprobs::default());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Prefilled(_) => {}
            Event::Token(t) => {
                content.push_str(&t.text);
                if let (Some(lp), Some(entry)) = (logprobs.as_mut(), meta.logprob(&t)) {
                    lp.content.push(entry);
                }
            }
            Event::Finished(f) => {
                content.push_str(&f.tail);
                return Ok(ChatCompletion {
                    id: meta.id.clone(),
                    object: "chat.completion".into(),
                    created: meta.created,
                    model: meta.model.clone(),
                    choices: vec![Choice {
                        index: 0,
                        message: AssistantMessage { role: "assistant".into(), content },
                        logprobs,
                        finish_reason: finish_reason(f.reason),
                    }],
                    usage: usage(&f),
                    pruning: meta.pruning(&prefill),
                });
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal("the engine ended the request without a result".into()))
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList { object: "list".into(), data: vec![card(&state)] })
}

/// `GET /v1/models/{model}`.
pub async fn get_model(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    let card = card(&state);
    if card.id == model {
        Ok(Json(card))
    } else {
        Err(ApiError::NotFound {
            message: format!("the model `{model}` does not exist"),
            param: Some("model".into()),
            code: ErrorCode::ModelNotFound,
        })
    }
}

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.settings.validation.served_model_name.clone(),
        object: "model".into(),
        created: state.settings.started,
        owned_by: "fitprune".into(),
    }
}
