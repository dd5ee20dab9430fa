//! fitprune: LLaVA inference with FitPrune visual-token pruning (Ye et al., AAAI 2025).

pub mod cli;
pub mod engine;
pub mod model;
pub mod pruning;
