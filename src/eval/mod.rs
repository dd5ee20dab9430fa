//! `fitprune eval`: what a FLOPs budget costs in answer quality — accuracy, agreement with the
//! unpruned answers, first-token KL and top-1 agreement, achieved FLOPs reduction and TTFT — for
//! FitPrune and two baselines at the same deletion counts (random, FastV-style).

pub mod answer;
pub mod baselines;
pub mod dataset;
pub mod passes;
pub mod recipes;
pub mod report;
pub mod run;

pub use answer::AnswerKind;
pub use dataset::{load_eval_dataset, parse_eval_dataset, EvalSample};
pub use passes::Passes;
pub use run::{evaluate, EvalObserver, EvalPlan, EvalReport, EvalRow, Method, Quiet};

/// Errors of the evaluation layer.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A dataset that cannot be used (the message names the line).
    #[error("dataset: {0}")]
    Dataset(String),
    /// The tokenizer failed to decode an answer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The plot could not be drawn or written.
    #[error("plot: {0}")]
    Plot(String),
    /// A recipe that does not fit the model.
    #[error(transparent)]
    Prune(#[from] crate::pruning::PruneError),
    /// A model error while running passes.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Stopped on request (between passes).
    #[error("cancelled")]
    Cancelled,
    /// The engine stopped running the passes (the server is shutting down).
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// A tensor error.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}
