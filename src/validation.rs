//! Turns a [`ChatRequest`] into a [`ValidRequest`]: every range, combination and limit is
//! checked here, once, so the engine and handlers only ever see validated input. Errors name the
//! offending field in OpenAI's `param` form (`messages[1].content[0].image_url.url`).
//!
//! Images are checked in two stages: here (count, data-URL size and syntax, URL scheme) and in
//! [`images`] (fetching, header-first pixel check, decoding).

pub mod context;
pub mod data_root;
pub mod decode;
pub mod images;

use crate::engine::recipes::PruningChoice;
use crate::engine::sampling::SamplingParams;
use crate::engine::sequence::GenerationParams;
use crate::model::prompt::{ChatMessage, ContentPart};
use crate::protocol::chat::{ChatRequest, Content, Part, PruningField, Role};
use crate::protocol::ErrorCode;

pub use images::{ImageLimits, ImageRef, ImageSource};

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A request that failed validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A field is missing, out of range, or conflicts with another.
    #[error("{message}")]
    Invalid { param: String, message: String, code: ErrorCode },
    /// `model` names a model this server does not serve.
    #[error("the model `{requested}` does not exist; this server serves `{served}`")]
    UnknownModel { requested: String, served: String },
}

impl ValidationError {
    /// An invalid field.
    pub fn invalid(param: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Invalid { param: param.into(), message: message.into(), code }
    }
}

/// What the engine needs to know about logprobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobOptions {
    /// Alternatives per token (0..=20).
    pub top: usize,
    /// Report tokens as `token_id:N` (vLLM's `return_tokens_as_token_ids`).
    pub as_token_ids: bool,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Messages in the chat template's shape.
    pub messages: Vec<ChatMessage>,
    /// Images in the order their parts appear.
    pub images: Vec<ImageRef>,
    /// Sampling and limits.
    pub params: GenerationParams,
    /// The field `params.max_tokens` came from (`max_completion_tokens` or `max_tokens`), if
    /// the client set one: a limit the context cannot honour is refused naming it once the
    /// prompt's length is known (no silent clamp); without one the context bounds generation.
    pub max_tokens_param: Option<&'static str>,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Send a final usage chunk when streaming.
    pub include_usage: bool,
    /// Logprobs, when requested.
    pub logprobs: Option<LogprobOptions>,
    /// The pruning requested (or the server default).
    pub pruning: PruningChoice,
}

/// Server-side settings validation depends on.
#[derive(Debug, Clone)]
pub struct ValidationSettings {
    /// The name in `model` must equal this one when present.
    pub served_model_name: String,
    /// Image limits.
    pub images: ImageLimits,
    /// Budget applied when a request has no `pruning` field.
    pub default_budget: Option<f64>,
    /// Budget for images sent with `detail: "low"` when a request has no `pruning` field.
    pub detail_low_budget: f64,
}

/// Checks `req` against the settings.
pub fn validate(req: ChatRequest, settings: &ValidationSettings) -> Result<ValidRequest, ValidationError> {
    if let Some(model) = &req.model {
        if model != &settings.served_model_name {
            return Err(ValidationError::UnknownModel {
                requested: model.clone(),
                served: settings.served_model_name.clone(),
            });
        }
    }
    refuse_unsupported(&req)?;
    let (messages, images) = convert_messages(&req, &settings.images)?;
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens_param = max_tokens.map(|(param, _)| param);
    let max_tokens = match max_tokens {
        Some((param, n)) if n < 1 => {
            return Err(ValidationError::invalid(
                param,
                ErrorCode::InvalidValue,
                format!("{param} must be at least 1, got {n}"),
            ))
        }
        Some((_, n)) => usize::try_from(n).unwrap_or(usize::MAX),
        // No limit asked for: generation runs until the context is full.
        None => usize::MAX,
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ValidationError::invalid(
            "temperature",
            ErrorCode::InvalidValue,
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ValidationError::invalid(
            "top_p",
            ErrorCode::InvalidValue,
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    match req.n {
        None | Some(1) => {}
        Some(n) => {
            return Err(ValidationError::invalid(
                "n",
                ErrorCode::UnsupportedValue,
                format!("n must be 1 (this server generates one choice per request), got {n}"),
            ))
        }
    }
    let stop = req.stop.as_ref().map(|s| s.0.clone()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ValidationError::invalid(
            "stop",
            ErrorCode::InvalidValue,
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    let logprobs = logprob_options(&req)?;
    let stream = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ValidationError::invalid(
            "stream_options",
            ErrorCode::InvalidValue,
            "stream_options needs stream: true",
        ));
    }
    let default = match image_detail(&req)? {
        Some(Detail::High) => None,
        Some(Detail::Low) => Some(settings.detail_low_budget),
        None => settings.default_budget,
    };
    let pruning = pruning_choice(req.pruning.as_ref(), default)?;
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed: req.seed,
        top_logprobs: logprobs.map_or(0, |l| l.top),
    };
    Ok(ValidRequest {
        messages,
        images,
        params: GenerationParams { sampling, max_tokens, stop },
        max_tokens_param,
        stream,
        include_usage,
        logprobs,
        pruning,
    })
}

/// Known OpenAI parameters this server does not implement: refused by name unless neutral.
fn refuse_unsupported(req: &ChatRequest) -> Result<(), ValidationError> {
    let unsupported = |param: &str, why: &str| {
        ValidationError::invalid(
            param,
            ErrorCode::UnsupportedParameter,
            format!("{param} is not supported by this server: {why}"),
        )
    };
    for (param, value) in [("frequency_penalty", req.frequency_penalty), ("presence_penalty", req.presence_penalty)] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(unsupported(param, "repetition penalties are not implemented; send 0 or omit it"));
        }
    }
    if req.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias", "send {} or omit it"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("tools", "LLaVA-1.5 has no tool-calling template"));
    }
    if let Some(format) = &req.response_format {
        if format.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(unsupported("response_format", "only {\"type\": \"text\"} (no constrained decoding)"));
        }
    }
    Ok(())
}

fn logprob_options(req: &ChatRequest) -> Result<Option<LogprobOptions>, ValidationError> {
    let wanted = req.logprobs.unwrap_or(false);
    let top = req.top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
        return Err(ValidationError::invalid(
            "top_logprobs",
            ErrorCode::InvalidValue,
            format!("top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}"),
        ));
    }
    if req.top_logprobs.is_some() && !wanted {
        return Err(ValidationError::invalid(
            "top_logprobs",
            ErrorCode::InvalidValue,
            "top_logprobs needs logprobs: true",
        ));
    }
    Ok(wanted
        .then(|| LogprobOptions { top: top as usize, as_token_ids: req.return_tokens_as_token_ids.unwrap_or(false) }))
}

/// The strongest `detail` over the request's images: any `high` wins (unpruned), then `low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    Low,
    High,
}

fn image_detail(req: &ChatRequest) -> Result<Option<Detail>, ValidationError> {
    let mut found = None;
    for (i, m) in req.messages.iter().enumerate() {
        let Some(crate::protocol::chat::Content::Parts(parts)) = &m.content else { continue };
        for (j, p) in parts.iter().enumerate() {
            let crate::protocol::chat::Part::ImageUrl { image_url } = p else { continue };
            let d = match image_url.detail.as_deref() {
                None | Some("auto") => continue,
                Some("low") => Detail::Low,
                Some("high") => Detail::High,
                Some(other) => {
                    return Err(ValidationError::invalid(
                        format!("messages[{i}].content[{j}].image_url.detail"),
                        ErrorCode::InvalidValue,
                        format!("detail must be auto, low or high, got {other:?}"),
                    ))
                }
            };
            found = Some(match found {
                Some(Detail::High) => Detail::High,
                _ => d,
            });
        }
    }
    Ok(found)
}

fn pruning_choice(field: Option<&PruningField>, default_budget: Option<f64>) -> Result<PruningChoice, ValidationError> {
    let check_budget = |b: f64, param: &str| {
        if (0.0..1.0).contains(&b) {
            Ok(PruningChoice::Budget(b))
        } else {
            Err(ValidationError::invalid(param, ErrorCode::InvalidValue, format!("{param} must be in [0, 1), got {b}")))
        }
    };
    match field {
        None => match default_budget {
            Some(b) => check_budget(b, "pruning.budget"),
            None => Ok(PruningChoice::Off),
        },
        Some(PruningField::Off) => Ok(PruningChoice::Off),
        Some(PruningField::Select(s)) => match (&s.budget, &s.recipe_id) {
            (Some(b), None) => check_budget(*b, "pruning.budget"),
            (None, Some(id)) if !id.is_empty() => Ok(PruningChoice::RecipeId(id.clone())),
            (None, Some(_)) => {
                Err(ValidationError::invalid("pruning.recipe_id", ErrorCode::InvalidValue, "recipe_id is empty"))
            }
            _ => Err(ValidationError::invalid(
                "pruning",
                ErrorCode::InvalidValue,
                "pruning must set exactly one of budget or recipe_id (or be \"off\")",
            )),
        },
    }
}

/// Messages in the template's shape, plus the images their parts refer to.
fn convert_messages(
    req: &ChatRequest,
    limits: &ImageLimits,
) -> Result<(Vec<ChatMessage>, Vec<ImageRef>), ValidationError> {
    if req.messages.is_empty() {
        return Err(ValidationError::invalid("messages", ErrorCode::InvalidValue, "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    let mut images = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let content = match &m.content {
            None => {
                return Err(ValidationError::invalid(
                    format!("messages[{i}].content"),
                    ErrorCode::InvalidValue,
                    "content is required",
                ))
            }
            Some(Content::Text(t)) => vec![ContentPart::Text(t.clone())],
            Some(Content::Parts(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match part {
                        Part::Text { text } => out.push(ContentPart::Text(text.clone())),
                        Part::ImageUrl { image_url } => {
                            let param = format!("messages[{i}].content[{j}].image_url.url");
                            if images.len() == limits.max_images {
                                return Err(ValidationError::invalid(
                                    "messages",
                                    ErrorCode::TooManyImages,
                                    format!("at most {} images per request", limits.max_images),
                                ));
                            }
                            images.push(images::parse_url(&image_url.url, param, limits)?);
                            out.push(ContentPart::Image);
                        }
                    }
                }
                out
            }
        };
        messages.push(ChatMessage { role: role.to_string(), content });
    }
    Ok((messages, images))
}

#[cfg(test)]
mod tests;
