//! One sequence as a step-wise state machine: prefill (optionally pruned by a hook), then one
//! token per [`Sequence::step`], so a scheduler can interleave many sequences fairly.
//!
//! A step samples from logits already computed and only then runs the decode that produces the
//! next logits (lazily, at the start of the following step), so a token is released as soon as
//! it exists and the time to first token is the prefill alone.

use std::time::{Duration, Instant};

use tokenizers::Tokenizer;

use crate::model::llama::{DecoderHook, KvCache};
use crate::model::llava::{Prefill, PrefillItem};
use crate::model::{LlavaModel, ModelError, PreparedPrompt};

use super::sampling::{Sampler, SamplingParams};
use super::stop::TextTracker;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string (or the caller stopped it).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// Limits and sampling for one generation.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Token selection.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; the text stops before them.
    pub stop: Vec<String>,
}

/// One generated token as reported to callers.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// Token id.
    pub id: u32,
    /// Text this step released (may be empty while bytes or a possible stop string are pending).
    pub text: String,
    /// Log-probability under the model.
    pub logprob: f32,
    /// Top alternatives with log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Wall-clock split of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Vision tower, projector and decoder prefill up to the first logits.
    pub prefill: Duration,
    /// All decode steps.
    pub decode: Duration,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens (EOS excluded).
    pub tokens: Vec<GeneratedToken>,
    /// The answer text (stop string excluded).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens, image tokens included.
    pub prompt_tokens: usize,
    /// Tokens the model produced, EOS included (what usage counts).
    pub completion_tokens: usize,
    /// Rows that reached the last decoder layer during prefill.
    pub prefill_rows_kept: usize,
    /// Timings.
    pub timings: Timings,
}

/// One prompt entering a batched prefill.
pub struct SequenceStart<'a> {
    /// The prompt.
    pub prompt: &'a PreparedPrompt,
    /// Its sampling and limits.
    pub params: &'a GenerationParams,
    /// Observes its attention; may prune it.
    pub hook: &'a mut dyn DecoderHook,
}

/// A sequence between prefill and finish.
pub struct Sequence {
    sampler: Sampler,
    cache: KvCache,
    stop: TextTracker,
    eos: Vec<u32>,
    logits: Option<Vec<f32>>,
    /// Token sampled last whose decode has not run yet.
    pending: Option<u32>,
    ids: Vec<u32>,
    /// Incremental detokenisation offsets (text before `read` is released).
    prefix: usize,
    read: usize,
    tokens: Vec<GeneratedToken>,
    prompt_tokens: usize,
    completion_tokens: usize,
    budget: usize,
    finished: Option<FinishReason>,
    prefill_rows_kept: usize,
    timings: Timings,
}

impl Sequence {
    /// Runs the prefill; `hook` may prune it. Fails if the prompt does not fit the context.
    pub fn prefill(
        model: &LlavaModel,
        prompt: &PreparedPrompt,
        params: &GenerationParams,
        hook: &mut dyn DecoderHook,
    ) -> Result<Self, ModelError> {
        Self::check_fits(model, prompt)?;
        let start = Instant::now();
        let mut cache = model.new_cache();
        let prefill = model.prefill(prompt, &mut cache, hook)?;
        Self::from_prefill(model, prompt, params, cache, &prefill, start.elapsed())
    }

    /// Prefills several prompts in one batched pass ([`LlavaModel::prefill_batch`]), each with its
    /// own hook and parameters. Each sequence then continues exactly as if prefilled alone; every
    /// one is charged the batch's prefill time.
    pub fn prefill_batch(model: &LlavaModel, starts: &mut [SequenceStart<'_>]) -> Result<Vec<Self>, ModelError> {
        for s in starts.iter() {
            Self::check_fits(model, s.prompt)?;
        }
        let start = Instant::now();
        let mut caches: Vec<KvCache> = starts.iter().map(|_| model.new_cache()).collect();
        let mut items: Vec<PrefillItem<'_>> = starts
            .iter_mut()
            .zip(caches.iter_mut())
            .map(|(s, cache)| PrefillItem { prompt: s.prompt, cache, hook: &mut *s.hook })
            .collect();
        let prefills = model.prefill_batch(&mut items)?;
        drop(items);
        let elapsed = start.elapsed();
        starts
            .iter()
            .zip(caches)
            .zip(&prefills)
            .map(|((s, cache), prefill)| Self::from_prefill(model, s.prompt, s.params, cache, prefill, elapsed))
            .collect()
    }

    /// Refuses a prompt that leaves no room in the context for a generated token.
    pub fn check_fits(model: &LlavaModel, prompt: &PreparedPrompt) -> Result<(), ModelError> {
        let prompt_tokens = prompt.input_ids.len();
        let max_pos = model.config().text_config.max_position_embeddings;
        if prompt_tokens >= max_pos {
            return Err(ModelError::InvalidInput(format!(
                "the prompt is {prompt_tokens} tokens (images included); the model's context is {max_pos}"
            )));
        }
        Ok(())
    }

    fn from_prefill(
        model: &LlavaModel,
        prompt: &PreparedPrompt,
        params: &GenerationParams,
        cache: KvCache,
        prefill: &Prefill,
        elapsed: Duration,
    ) -> Result<Self, ModelError> {
        let prompt_tokens = prompt.input_ids.len();
        let max_pos = model.config().text_config.max_position_embeddings;
        let logits = prefill.logits.to_vec1::<f32>()?;
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone()),
            cache,
            stop: TextTracker::new(params.stop.clone()),
            eos: model.eos_ids(),
            logits: Some(logits),
            pending: None,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            tokens: Vec::new(),
            prompt_tokens,
            completion_tokens: 0,
            budget: params.max_tokens.min(max_pos - prompt_tokens),
            finished: (params.max_tokens == 0).then_some(FinishReason::Length),
            prefill_rows_kept: prefill.output.positions.len(),
            timings: Timings { prefill: elapsed, decode: Duration::ZERO },
        })
    }

    /// Why the sequence ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Tokens in the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Produces the next token, or `None` once finished. When this step finishes the sequence
    /// with text still held back for a possible stop string, that text is released with it.
    pub fn step(&mut self, model: &LlavaModel) -> Result<Option<GeneratedToken>, ModelError> {
        if self.finished.is_some() {
            return Ok(None);
        }
        if let Some(token) = self.pending.take() {
            let t = Instant::now();
            let position = (self.prompt_tokens + self.completion_tokens - 1) as u32;
            self.logits = Some(model.decode(token, position, &mut self.cache)?.to_vec1::<f32>()?);
            self.timings.decode += t.elapsed();
        }
        let Some(logits) = self.logits.take() else {
            return Ok(None);
        };
        let choice = self.sampler.choose(&logits);
        self.completion_tokens += 1;
        if self.eos.contains(&choice.token) {
            self.finished = Some(FinishReason::Stop);
            return Ok(None);
        }
        let piece = self.detokenize(model.tokenizer(), choice.token)?;
        let (mut released, stopped) = self.stop.push(&piece);
        if stopped {
            self.finished = Some(FinishReason::Stop);
        } else if self.completion_tokens >= self.budget {
            self.finished = Some(FinishReason::Length);
            released.push_str(&self.stop.flush());
        } else {
            self.pending = Some(choice.token);
        }
        let token = GeneratedToken { id: choice.token, text: released, logprob: choice.logprob, top: choice.top };
        self.tokens.push(token.clone());
        Ok(Some(token))
    }

    /// Ends the sequence early (client gone, timeout, shutdown).
    pub fn cancel(&mut self) {
        self.finished.get_or_insert(FinishReason::Stop);
    }

    /// Text held back for a possible stop string when the sequence ended on EOS; streaming
    /// callers send it after the last token. (`into_generation` includes it either way.)
    pub fn take_held_text(&mut self) -> String {
        if self.finished.is_some() {
            let tail = self.stop.flush();
            if let Some(last) = self.tokens.last_mut() {
                last.text.push_str(&tail);
            }
            tail
        } else {
            String::new()
        }
    }

    /// Text newly completed by `token`: decode a window of recent ids and release what extends
    /// the previous decode, unless it ends in a possibly incomplete UTF-8 sequence (U+FFFD).
    fn detokenize(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, ModelError> {
        self.ids.push(token);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()));
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        // A UTF-8 character spans at most 4 byte tokens: past that a trailing U+FFFD is a real
        // invalid sequence, released as is rather than re-decoding an ever longer window.
        let incomplete = now.ends_with('\u{FFFD}') && self.ids.len() - self.read < 4;
        if now.len() > before.len() && !incomplete && now.starts_with(&before) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// The finished generation (call after `step` returned `None` or after `cancel`).
    pub fn into_generation(mut self) -> Generation {
        self.finished.get_or_insert(FinishReason::Stop);
        self.take_held_text();
        Generation {
            tokens: self.tokens,
            text: self.stop.into_text(),
            finish_reason: self.finished.unwrap_or(FinishReason::Stop),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            prefill_rows_kept: self.prefill_rows_kept,
            timings: self.timings,
        }
    }
}
