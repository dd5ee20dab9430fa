//! FitPrune (Ye et al., AAAI 2025; reference code ywh187/FitPrune): FLOPs model, token scores,
//! recipes, pruned prefill and the calibration that fits recipes to FLOPs budgets.

pub mod apply;
pub mod calibrate;
pub mod dataset;
pub mod flops;
pub mod layers;
pub mod recipe;
pub mod score;

pub use apply::PruneHook;
pub use flops::FlopsModel;
pub use recipe::Recipe;

/// Errors of the pruning layer.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// A recipe that cannot apply to the model.
    #[error("invalid recipe: {0}")]
    InvalidRecipe(String),
    /// Calibration input that cannot be used.
    #[error("invalid calibration input: {0}")]
    InvalidInput(String),
    /// The job was cancelled between layers.
    #[error("calibration cancelled")]
    Cancelled,
    /// The engine that runs the layer evaluations stopped (the server is shutting down).
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// A model error while running passes.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A tensor error while scoring.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}
