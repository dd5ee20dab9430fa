//! Streaming response chunks (`chat.completion.chunk`), sent as server-sent events.

use serde::{Deserialize, Serialize};

use super::chat::{ChoiceLogprobs, PruningInfo, Usage};

/// One `data:` event of a streamed completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a completion.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds (same on every chunk).
    pub created: i64,
    /// The served model name.
    pub model: String,
    /// One choice, or none on the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only on the final chunk, with `stream_options.include_usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Only on the chunk that carries `finish_reason` (fitprune extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruningInfo>,
}

/// The choice of a chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// New text (and the role on the first chunk).
    pub delta: Delta,
    /// Log-probabilities of the tokens behind this delta, when requested.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set on the last chunk with choices.
    pub finish_reason: Option<String>,
}

/// The incremental message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant`, on the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text released by this chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}
