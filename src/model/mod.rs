//! LLaVA on candle: config, weights, vision tower, projector, prunable decoder, prompts.
//!
//! Nothing here knows about tokio or HTTP; the engine drives these types from its own thread.

pub mod anyres;
mod attn_cpu;
pub mod config;
pub mod convnext;
mod cpu_gemm;
pub mod demo;
pub mod demo_hr;
pub mod demo_tokenizer;
mod dense;
pub mod fingerprint;
mod fused_attn;
mod gated_mlp;
mod hr;
pub mod hr_config;
pub mod hr_prompt;
mod hr_weights;
pub mod interp;
pub mod llama;
pub mod llama_batch;
pub mod llama_decode;
pub mod llava;
mod next;
pub mod preprocess;
pub mod projector;
pub mod prompt;
pub mod resample;
pub mod source;
mod visibility;
pub mod vision;
pub mod weights;

use std::path::PathBuf;

pub use llava::{LlavaModel, PreparedPrompt, TokenizedPrompt};

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model directory must contain is absent.
    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: String },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file has a missing, malformed or unsupported field.
    #[error("{file}: field `{field}`: {message}")]
    Config { file: String, field: String, message: String },
    /// The checkpoint lacks a tensor or has one of the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// The tokenizer could not be loaded or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Image preprocessing failed.
    #[error(transparent)]
    Preprocess(#[from] preprocess::PreprocessError),
    /// Chat template loading or rendering failed.
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    /// The request does not fit the model (image count mismatch, context too long...).
    #[error("{0}")]
    InvalidInput(String),
    /// A hub model id could not be resolved.
    #[error("hub: {0}")]
    Hub(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;

#[cfg(test)]
mod fused_attn_model_tests;
#[cfg(test)]
mod llama_tests;
