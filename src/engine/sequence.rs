//! One sequence as a step-wise state machine: prefill (optionally pruned by a hook), then one
//! token per [`Sequence::step`], so a scheduler can interleave many sequences fairly.
//!
//! A step samples from logits already computed and only then runs the decode that produces the
//! next logits (lazily, at the start of the following step), so a token is released as soon as
//! it exists and the time to first token is the prefill alone.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::model::llama::{DecoderHook, KvCache};
use crate::model::llava::{Prefill, PrefillItem};
use crate::model::{LlavaModel, ModelError, PreparedPrompt};

use super::device_pick::{pick_rows, Need, Picked};
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

/// Tokens a sequence can generate: `max_tokens`, capped by the context left after the prompt.
pub fn token_budget(max_tokens: usize, prompt_tokens: usize, max_context: usize) -> usize {
    max_tokens.min(max_context.saturating_sub(prompt_tokens))
}

/// Decode tokens a sequence's caches must hold beyond its prefill rows: every generated token
/// but the last is fed back through one decode pass.
pub fn decode_growth_for(max_tokens: usize, prompt_tokens: usize, max_context: usize) -> usize {
    token_budget(max_tokens, prompt_tokens, max_context).saturating_sub(1)
}

fn decode_growth(model: &LlavaModel, prompt: &PreparedPrompt, params: &GenerationParams) -> usize {
    let max_pos = model.config().text_config.max_position_embeddings;
    decode_growth_for(params.max_tokens, prompt.input_ids.len(), max_pos)
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
    /// What the next sample uses: the prefill's logits (the first-token distribution, which the
    /// fidelity monitor may need), then each decode pass's pick.
    next: Option<Picked>,
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
        let mut cache = model.new_cache_with_growth(decode_growth(model, prompt, params));
        let prefill = model.prefill(prompt, &mut cache, hook)?;
        let logits = prefill.logits.to_vec1::<f32>()?;
        Self::from_prefill(model, prompt, params, cache, &prefill, logits, start.elapsed())
    }

    /// Prefills several prompts in one batched pass ([`LlavaModel::prefill_batch`]), each with its
    /// own hook and parameters. Each sequence then continues exactly as if prefilled alone; every
    /// one is charged the batch's prefill time.
    pub fn prefill_batch(model: &LlavaModel, starts: &mut [SequenceStart<'_>]) -> Result<Vec<Self>, ModelError> {
        for s in starts.iter() {
            Self::check_fits(model, s.prompt)?;
        }
        let start = Instant::now();
        let mut caches: Vec<KvCache> =
            starts.iter().map(|s| model.new_cache_with_growth(decode_growth(model, s.prompt, s.params))).collect();
        let mut items: Vec<PrefillItem<'_>> = starts
            .iter_mut()
            .zip(caches.iter_mut())
            .map(|(s, cache)| PrefillItem { prompt: s.prompt, cache, hook: &mut *s.hook })
            .collect();
        let prefills = model.prefill_batch(&mut items)?;
        drop(items);
        // One device-to-host copy for the whole batch's logits.
        let rows: Vec<&Tensor> = prefills.iter().map(|p| &p.logits).collect();
        let logits = if rows.is_empty() { Vec::new() } else { Tensor::stack(&rows, 0)?.to_vec2::<f32>()? };
        let elapsed = start.elapsed();
        starts
            .iter()
            .zip(caches)
            .zip(prefills.iter().zip(logits))
            .map(|((s, cache), (prefill, logits))| {
                Self::from_prefill(model, s.prompt, s.params, cache, prefill, logits, elapsed)
            })
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
        logits: Vec<f32>,
        elapsed: Duration,
    ) -> Result<Self, ModelError> {
        let prompt_tokens = prompt.input_ids.len();
        let max_pos = model.config().text_config.max_position_embeddings;
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone()),
            cache,
            stop: TextTracker::new(params.stop.clone()),
            eos: model.eos_ids(),
            next: Some(Picked::Row(logits)),
            pending: None,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            tokens: Vec::new(),
            prompt_tokens,
            completion_tokens: 0,
            budget: token_budget(params.max_tokens, prompt_tokens, max_pos),
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

    /// Produces the next token, or `None` once finished: runs the pending decode alone (a batch
    /// of one), then samples. A scheduler batches [`Self::decode_input`]s instead.
    pub fn step(&mut self, model: &LlavaModel) -> Result<Option<GeneratedToken>, ModelError> {
        if let Some((token, position)) = self.decode_input() {
            let t = Instant::now();
            let logits = model.decode_batch(&[token], &[position], &mut [&mut self.cache])?;
            let picked = pick_rows(&logits, &[self.need()])?.pop();
            let picked = picked.ok_or_else(|| ModelError::InvalidInput("decode returned no row".into()))?;
            self.set_next(picked, t.elapsed());
        }
        self.sample(model.tokenizer())
    }

    /// The token the next decode pass must run and its position, if the sequence needs one
    /// (it does after every sampled token except the last).
    pub fn decode_input(&self) -> Option<(u32, u32)> {
        let token = self.pending.filter(|_| self.finished.is_none())?;
        Some((token, (self.prompt_tokens + self.completion_tokens - 1) as u32))
    }

    /// The logits the next sample will use, when it holds them whole (right after prefill: the
    /// first-token distribution).
    pub fn pending_logits(&self) -> Option<&[f32]> {
        match &self.next {
            Some(Picked::Row(logits)) => Some(logits),
            _ => None,
        }
    }

    /// What the next decode pass must hand back for this sequence.
    pub fn need(&self) -> Need {
        self.sampler.need()
    }

    /// The sequence's KV cache (a decode pass appends to it).
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The sequence's KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Hands over what the decode of [`Self::decode_input`] produced for [`Self::need`]
    /// (`decode` is this sequence's share of the pass's time).
    pub fn set_next(&mut self, picked: Picked, decode: Duration) {
        self.pending = None;
        self.next = Some(picked);
        self.timings.decode += decode;
    }

    /// Samples the next token from the logits at hand, or `None` once finished (or while a
    /// decode is still pending). When this finishes the sequence with text still held back for
    /// a possible stop string, that text is released with it.
    pub fn sample(&mut self, tokenizer: &Tokenizer) -> Result<Option<GeneratedToken>, ModelError> {
        if self.finished.is_some() {
            return Ok(None);
        }
        let Some(picked) = self.next.take() else {
            return Ok(None);
        };
        let choice = self.sampler.take(picked);
        self.completion_tokens += 1;
        if self.eos.contains(&choice.token) {
            self.finished = Some(FinishReason::Stop);
            return Ok(None);
        }
        let piece = self.detokenize(tokenizer, choice.token)?;
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
