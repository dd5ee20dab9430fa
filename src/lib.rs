//! fitprune: LLaVA inference with FitPrune visual-token pruning (Ye et al., AAAI 2025).

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod eval;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod pruning;
pub mod server;
pub mod store;
pub mod validation;

pub use api::{build_app, AppState};
