//! Running one sequence to completion (the CLI, tests and benchmarks; the server schedules
//! [`Sequence`]s itself).

use crate::model::llama::DecoderHook;
use crate::model::{LlavaModel, ModelError, PreparedPrompt};

pub use super::sequence::{FinishReason, GeneratedToken, Generation, GenerationParams, Sequence, Timings};

/// Runs one generation. `on_token` sees each token as it is produced and may return `false`
/// to stop early (client went away); the result then ends with `FinishReason::Stop`.
pub fn generate(
    model: &LlavaModel,
    prompt: &PreparedPrompt,
    params: &GenerationParams,
    hook: &mut dyn DecoderHook,
    on_token: &mut dyn FnMut(&GeneratedToken) -> bool,
) -> Result<Generation, ModelError> {
    let mut seq = Sequence::prefill(model, prompt, params, hook)?;
    while let Some(token) = seq.step(model)? {
        if !on_token(&token) {
            seq.cancel();
            break;
        }
    }
    Ok(seq.into_generation())
}
