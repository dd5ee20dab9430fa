//! Running the model: sampling, stop strings, step-wise sequences, the generation loop, and the
//! server's engine — a queue in front of one thread that owns the model and runs engine steps
//! (schedule -> one batched prefill and/or one batched decode pass -> update) that a
//! model-free [`scheduler::Scheduler`] plans.

pub mod background;
pub mod device_pick;
pub mod fidelity;
pub mod generate;
pub mod kv;
pub mod loaded;
pub mod queue;
pub mod recipes;
mod running;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod token_bytes;
mod worker;

pub use loaded::{LoadedModel, ModelInfo};
pub use queue::{
    BackgroundWork, ChatJob, Engine, EngineConfig, EngineError, EngineState, Event, FaultInjector, FinishReport, Phase,
    PrefillReport, RoundHook,
};
