//! Where an evaluation's forward passes run, and one greedy answer as a chain of passes.
//!
//! [`Passes`] hides whether the passes run on the caller's thread (`fitprune eval`, which owns
//! the model) or on the server's engine thread as background work (admin evaluation jobs, so one
//! thread runs every forward pass and chat work goes first). An answer is one task for the
//! prefill and one per decode step, so a chat request that arrives mid-answer waits at most for
//! one pass. Each task owns what it touches (prompt, cache, hook) and hands it back, which is
//! what running it on another thread needs.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::model::llama::{log_softmax, DecoderHook, KvCache};
use crate::model::{LlavaModel, PreparedPrompt};
use crate::pruning::PruneHook;

use super::baselines::{FastVHook, RandomHook};
use super::EvalError;

/// Runs an evaluation's forward passes.
pub trait Passes {
    /// The model, for tokenizing, preparing prompts and reading its config (no passes).
    fn model(&self) -> &LlavaModel;

    /// Runs one forward-pass task and returns its result.
    fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce(&LlavaModel) -> Result<T, EvalError> + Send + 'static,
    ) -> Result<T, EvalError>;

    /// Checked between passes: `true` stops the evaluation with [`EvalError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// The CLI's case: passes run right here.
impl Passes for LlavaModel {
    fn model(&self) -> &LlavaModel {
        self
    }

    fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce(&LlavaModel) -> Result<T, EvalError> + Send + 'static,
    ) -> Result<T, EvalError> {
        task(self)
    }
}

/// The hook of one method, owned so it can travel with its task.
pub enum MethodHook {
    /// Deletes nothing.
    Unpruned,
    /// FitPrune's scores.
    Fitprune(PruneHook),
    /// Seeded random deletion (boxed: its RNG state is most of the enum's size).
    Random(Box<RandomHook>),
    /// FastV-style deletion at one layer.
    Fastv(FastVHook),
}

impl MethodHook {
    /// Deletions applied per layer by the pass that ran (`layers` zeros when unpruned).
    fn applied(&self, layers: usize) -> Vec<usize> {
        match self {
            Self::Unpruned => vec![0; layers],
            Self::Fitprune(h) => h.applied_deletions(),
            Self::Random(h) => h.applied_deletions().to_vec(),
            Self::Fastv(h) => h.applied_deletions().to_vec(),
        }
    }
}

impl DecoderHook for MethodHook {
    fn wants_attention(&self, layer: usize) -> bool {
        match self {
            Self::Unpruned => false,
            Self::Fitprune(h) => h.wants_attention(layer),
            Self::Random(h) => h.wants_attention(layer),
            Self::Fastv(h) => h.wants_attention(layer),
        }
    }

    fn on_attention(
        &mut self,
        layer: usize,
        probs: &Tensor,
        positions: &[u32],
    ) -> crate::model::Result<Option<Vec<u32>>> {
        match self {
            Self::Unpruned => Ok(None),
            Self::Fitprune(h) => h.on_attention(layer, probs, positions),
            Self::Random(h) => h.on_attention(layer, probs, positions),
            Self::Fastv(h) => h.on_attention(layer, probs, positions),
        }
    }
}

/// One greedy answer with what the metrics need.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The decoded answer, trimmed.
    pub text: String,
    /// Log-probabilities of the first generated token, (vocab,).
    pub first: Vec<f32>,
    /// Vision tower + prefill time (not the wait for the engine).
    pub ttft: Duration,
    /// Deletions applied per layer.
    pub applied: Vec<usize>,
}

/// Greedy generation up to `max_tokens` or an end-of-sequence token: one task for the prefill
/// (timed as the time to first token), one per decode step, the cancel flag checked between.
pub fn answer<P: Passes + ?Sized>(
    passes: &P,
    prompt: &PreparedPrompt,
    hook: MethodHook,
    max_tokens: usize,
) -> Result<Answer, EvalError> {
    let model = passes.model();
    let max_pos = model.config().text_config.max_position_embeddings;
    if prompt.input_ids.len() + max_tokens > max_pos {
        return Err(EvalError::Dataset(format!(
            "a prompt of {} tokens plus {max_tokens} answer tokens exceeds the context of {max_pos}",
            prompt.input_ids.len()
        )));
    }
    if passes.cancelled() {
        return Err(EvalError::Cancelled);
    }
    let layers = model.llama().num_layers();
    let eos = model.eos_ids();
    let owned = prompt.clone();
    let (mut cache, first, ttft, hook) = passes.run(move |model| {
        let mut hook = hook;
        let mut cache = model.new_cache_with_growth(max_tokens);
        let start = Instant::now();
        let prefill = model.prefill(&owned, &mut cache, &mut hook)?;
        let first = log_softmax(&prefill.logits)?.to_vec1::<f32>()?;
        Ok((cache, first, start.elapsed(), hook))
    })?;
    let mut ids = Vec::new();
    let mut next = argmax(&first);
    let mut position = prompt.input_ids.len() as u32;
    while ids.len() < max_tokens && !eos.contains(&next) {
        ids.push(next);
        if ids.len() == max_tokens {
            break;
        }
        if passes.cancelled() {
            return Err(EvalError::Cancelled);
        }
        let (back, token) = passes.run(move |model| decode_step(model, cache, next, position))?;
        cache = back;
        next = token;
        position += 1;
    }
    let text = model.tokenizer().decode(&ids, true).map_err(|e| EvalError::Tokenizer(e.to_string()))?;
    Ok(Answer { text: text.trim().to_string(), first, ttft, applied: hook.applied(layers) })
}

/// One decode pass: the next greedy token after `token` at `position`.
fn decode_step(model: &LlavaModel, mut cache: KvCache, token: u32, position: u32) -> Result<(KvCache, u32), EvalError> {
    let logits = model.decode_batch(&[token], &[position], &mut [&mut cache])?;
    let next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    Ok((cache, next))
}

/// Index of the largest value (the first on ties, as greedy sampling picks).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}
