//! `POST /v1/chat/completions`: the request as OpenAI clients send it (plus the `pruning` and
//! vLLM `return_tokens_as_token_ids` extensions) and the non-streaming response.
//!
//! Unknown fields are ignored, as OpenAI's own server does with fields it does not know; fields
//! we know but do not implement are kept so validation can refuse them by name.

use std::fmt;

use serde::de::{self, value::SeqAccessDeserializer, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The request body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatRequest {
    /// Must name the served model when given.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Legacy name of `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// 0 = greedy; up to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Number of choices (only 1 is served).
    #[serde(default)]
    pub n: Option<i64>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Report log-probabilities of the chosen tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token, 0..=20 (needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// vLLM extension: report tokens as `token_id:N`.
    #[serde(default)]
    pub return_tokens_as_token_ids: Option<bool>,
    /// fitprune extension: which pruning recipe to use.
    #[serde(default)]
    pub pruning: Option<PruningField>,
    /// Not implemented; refused unless 0.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Not implemented; refused unless 0.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Not implemented; refused unless empty.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Not implemented; refused unless empty.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Not implemented; refused unless `{"type": "text"}`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
}

/// One conversation turn.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What they say: a string or content parts.
    #[serde(default)]
    pub content: Option<Content>,
}

/// Roles the chat template can render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions (rendered as the template's system turn).
    System,
    /// OpenAI's newer name for `system`.
    Developer,
    /// The human.
    User,
    /// The model.
    Assistant,
}

/// Message content: a plain string or a list of parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// `"content": "..."`.
    Text(String),
    /// `"content": [{"type": "text", ...}, {"type": "image_url", ...}]`.
    Parts(Vec<Part>),
}

/// One content part (`{"type": "text", ...}` or `{"type": "image_url", ...}`).
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image by URL (`data:` or http(s)).
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
}

/// `{"url": ..., "detail": ...}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageUrl {
    /// A `data:image/...;base64,` URL or an http(s) URL.
    pub url: String,
    /// `auto`, `low` or `high`: without a `pruning` field, `low` prunes with `--detail-low-budget`,
    /// `high` runs unpruned, `auto` takes the server default.
    #[serde(default)]
    pub detail: Option<String>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq)]
pub struct StopField(pub Vec<String>);

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `pruning`: `"off"`, `{"budget": 0.5}` or `{"recipe_id": "..."}`.
#[derive(Debug, Clone, PartialEq)]
pub enum PruningField {
    /// `"off"`.
    Off,
    /// The object form; validation checks exactly one field is set.
    Select(PruningSelect),
}

/// The object form of `pruning`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct PruningSelect {
    /// Fraction of visual-token FLOPs to remove, in [0, 1).
    #[serde(default)]
    pub budget: Option<f64>,
    /// A recipe by id.
    #[serde(default)]
    pub recipe_id: Option<String>,
}

/// The non-streaming response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The served model name.
    pub model: String,
    /// Exactly one choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// What pruning did (fitprune extension).
    pub pruning: PruningInfo,
}

/// The one choice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// Per-token log-probabilities when requested.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// The generated message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// `logprobs` of a choice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
}

/// A token with its log-probability, raw bytes and alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (`token_id:N` with `return_tokens_as_token_ids`).
    pub token: String,
    /// Natural-log probability under the model.
    pub logprob: f32,
    /// The token's raw bytes (a byte-fallback token like `<0xE2>` is the byte 0xE2).
    pub bytes: Vec<u8>,
    /// The most likely alternatives, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural-log probability.
    pub logprob: f32,
    /// Raw bytes.
    pub bytes: Vec<u8>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, one per visual token included.
    pub prompt_tokens: usize,
    /// Generated tokens (EOS included).
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
}

/// The `pruning` report of a response (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningInfo {
    /// The recipe applied, if any.
    pub recipe_id: Option<String>,
    /// That recipe's budget.
    pub budget: Option<f64>,
    /// Visual tokens in the prompt.
    pub visual_tokens: usize,
    /// Visual tokens left after the last pruning layer.
    pub visual_tokens_kept: usize,
    /// Fraction of visual-token FLOPs removed under the FLOPs model.
    pub flops_reduction: f64,
    /// Why nothing was pruned, when nothing was (`off`, `no recipe applies`, `no images`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Content, E> {
                Ok(Content::Text(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Content, A::Error> {
                Vec::<Part>::deserialize(SeqAccessDeserializer::new(seq)).map(Content::Parts)
            }
        }
        d.deserialize_any(V)
    }
}

/// A content part as written; read through a plain struct (not serde's internally tagged enum,
/// which buffers its input and loses the field path of errors inside it).
#[derive(Deserialize)]
struct RawPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    image_url: Option<ImageUrl>,
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawPart::deserialize(d)?;
        match raw.kind.as_str() {
            "text" => raw.text.map(|text| Part::Text { text }).ok_or_else(|| de::Error::missing_field("text")),
            "image_url" => raw
                .image_url
                .map(|image_url| Part::ImageUrl { image_url })
                .ok_or_else(|| de::Error::missing_field("image_url")),
            other => Err(de::Error::unknown_variant(other, &["text", "image_url"])),
        }
    }
}

impl<'de> Deserialize<'de> for StopField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StopField, E> {
                Ok(StopField(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StopField, A::Error> {
                Vec::<String>::deserialize(SeqAccessDeserializer::new(seq)).map(StopField)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PruningField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PruningField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""off", {"budget": number} or {"recipe_id": string}"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PruningField, E> {
                match s {
                    "off" => Ok(PruningField::Off),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<PruningField, A::Error> {
                PruningSelect::deserialize(de::value::MapAccessDeserializer::new(map)).map(PruningField::Select)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_string_or_parts_and_unknown_fields_ignored() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [
                {"role": "system", "content": "be brief", "name": "x"},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}]}],
               "stop": "END", "pruning": {"budget": 0.5}, "whatever": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].content, Some(Content::Text("be brief".into())));
        let Some(Content::Parts(parts)) = &r.messages[1].content else { panic!("parts") };
        assert_eq!(parts.len(), 2);
        assert!(matches!(&parts[1], Part::ImageUrl { image_url } if image_url.detail.as_deref() == Some("low")));
        assert_eq!(r.stop, Some(StopField(vec!["END".into()])));
        assert_eq!(r.pruning, Some(PruningField::Select(PruningSelect { budget: Some(0.5), recipe_id: None })));
    }

    #[test]
    fn pruning_off_and_bad_forms() {
        let p: PruningField = serde_json::from_str(r#""off""#).unwrap();
        assert_eq!(p, PruningField::Off);
        assert!(serde_json::from_str::<PruningField>(r#""on""#).is_err());
        assert!(serde_json::from_str::<PruningField>("3").is_err());
        let s: StopField = serde_json::from_str(r#"["a", "b"]"#).unwrap();
        assert_eq!(s.0, vec!["a", "b"]);
    }

    #[test]
    fn content_part_errors_keep_their_path() {
        let json = r#"{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#;
        let de = &mut serde_json::Deserializer::from_str(json);
        let err = serde_path_to_error::deserialize::<_, ChatRequest>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "messages[0].content[0]");
        assert!(err.inner().to_string().contains("input_audio"), "{}", err.inner());
        let json = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]}"#;
        let de = &mut serde_json::Deserializer::from_str(json);
        let err = serde_path_to_error::deserialize::<_, ChatRequest>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "messages[0].content[0].image_url.url");
    }
}
