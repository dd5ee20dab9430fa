//! Running the model: sampling, stop strings, step-wise sequences, the generation loop, and the
//! server's engine — a queue in front of one thread that owns the model and schedules sequences.

pub mod calibration;
pub mod generate;
pub mod loaded;
pub mod queue;
pub mod recipes;
pub mod sampling;
pub mod sequence;
pub mod stop;
pub mod token_bytes;
mod worker;

pub use loaded::{LoadedModel, ModelInfo};
pub use queue::{
    BackgroundWork, ChatJob, Engine, EngineConfig, EngineError, EngineState, Event, FinishReport, PrefillReport,
    RoundHook,
};
