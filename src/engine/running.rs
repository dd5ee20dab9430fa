//! A request between prefill and its end, as the engine thread holds it: the sequence, the
//! client's channel, timings for the latency metrics, and the request's log span. Also the
//! prefill of a step's admitted requests (each with its own pruning hook).

use std::time::Instant;

use tokenizers::Tokenizer;
use tracing::{debug, info, info_span, Span};

use crate::metrics::{CancelReason, Metrics};
use crate::model::llama::{DecoderHook, NoHook};
use crate::model::{LlavaModel, ModelError};
use crate::pruning::PruneHook;

use super::kv::KvDemand;
use super::loaded::ModelInfo;
use super::queue::{EngineError, Event, FinishReport, PrefillReport, Queued};
use super::sequence::{decode_growth_for, FinishReason, Sequence, SequenceStart};

/// The log span of one request.
pub(super) fn request_span(q: &Queued) -> Span {
    info_span!("request", request_id = %q.job.request_id)
}

/// A request admitted to the scheduler but not started yet, with what admission derived from it.
pub(super) struct Waiting {
    pub(super) queued: Queued,
    /// Its KV memory, as charged to the scheduler.
    pub(super) demand: KvDemand,
    /// Per-layer deletions of its recipe scaled to its visual tokens (`None` = unpruned): the
    /// same counts the demand was computed from, so the caches hold what was charged.
    pub(super) deletions: Option<Vec<usize>>,
}

impl Waiting {
    /// Derives the request's deletions and KV demand for a decoder with these facts.
    pub(super) fn new(queued: Queued, info: &ModelInfo) -> Self {
        let job = &queued.job;
        let prompt_tokens = job.prompt.input_ids.len();
        let visual = job.prompt.visual_tokens();
        let deletions = job.recipe.as_ref().filter(|_| visual > 0).map(|r| r.deletions_for(visual));
        let growth = decode_growth_for(job.params.max_tokens, prompt_tokens, info.max_context);
        let demand = info.kv.demand(prompt_tokens, visual, deletions.as_deref(), growth);
        Self { queued, demand, deletions }
    }
}

/// Prefills `batch` in one pass (each request pruned by its own recipe) and returns each one's
/// sequence with the hook that pruned it.
pub(super) fn prefill(
    model: &LlavaModel,
    batch: &[&Waiting],
) -> Result<Vec<(Option<PruneHook>, Sequence)>, EngineError> {
    let mut prunes: Vec<Option<PruneHook>> =
        batch.iter().map(|w| w.deletions.clone().map(|d| PruneHook::new(d, &w.queued.job.prompt))).collect();
    let mut unpruned: Vec<NoHook> = batch.iter().map(|_| NoHook).collect();
    let mut starts: Vec<SequenceStart<'_>> = batch
        .iter()
        .zip(prunes.iter_mut().zip(unpruned.iter_mut()))
        .map(|(w, (prune, none))| SequenceStart {
            prompt: &w.queued.job.prompt,
            params: &w.queued.job.params,
            hook: match prune {
                Some(h) => h as &mut dyn DecoderHook,
                None => none,
            },
        })
        .collect();
    // A lone request takes the single-sequence path, as `fitprune generate` does.
    let seqs = match starts.as_mut_slice() {
        [one] => vec![Sequence::prefill(model, one.prompt, one.params, &mut *one.hook)?],
        all => Sequence::prefill_batch(model, all)?,
    };
    drop(starts);
    Ok(prunes.into_iter().zip(seqs).collect())
}

/// A sequence being decoded.
pub(super) struct Running {
    pub(super) seq: Sequence,
    pub(super) events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub(super) request_id: String,
    pub(super) admitted: Instant,
    pub(super) deadline: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
    tokens: usize,
    pub(super) span: Span,
}

impl Running {
    /// Reports a finished prefill to the client and the metrics; `None` if the client is gone.
    pub(super) fn start(
        q: Queued,
        prune: Option<PruneHook>,
        seq: Sequence,
        prefill_s: f64,
        info: &ModelInfo,
        metrics: &Metrics,
    ) -> Option<Self> {
        let span = request_span(&q);
        let entered = span.enter();
        let visual = q.job.prompt.visual_tokens();
        metrics
            .prefill_duration
            .with_label_values(&[if prune.is_some() { "true" } else { "false" }])
            .observe(prefill_s);
        metrics.tokens.prompt.inc_by(seq.prompt_tokens() as u64);
        metrics.tokens.image.inc_by(visual as u64);
        let report = match &prune {
            Some(h) => {
                let reduction = info.flops.reduction(h.visual_in() as u64, &h.applied_deletions());
                metrics.tokens.visual_in.inc_by(h.visual_in() as u64);
                metrics.tokens.visual_kept.inc_by(h.visual_kept() as u64);
                metrics.flops_reduction.observe(reduction);
                PrefillReport {
                    prompt_tokens: seq.prompt_tokens(),
                    visual_tokens: h.visual_in(),
                    visual_kept: h.visual_kept(),
                    flops_reduction: reduction,
                }
            }
            None => PrefillReport {
                prompt_tokens: seq.prompt_tokens(),
                visual_tokens: visual,
                visual_kept: visual,
                flops_reduction: 0.0,
            },
        };
        debug!(prompt_tokens = report.prompt_tokens, visual_kept = report.visual_kept, prefill_s, "prefilled");
        if q.events.send(Event::Prefilled(report)).is_err() {
            metrics.cancel(CancelReason::ClientGone);
            return None;
        }
        drop(entered);
        let Queued { events, admitted, deadline, job } = q;
        Some(Self {
            seq,
            events,
            request_id: job.request_id,
            admitted,
            deadline,
            first_token: None,
            last_token: Instant::now(),
            tokens: 0,
            span,
        })
    }

    /// Samples the next token and sends it; `false` once the sequence has ended (finished, or
    /// its client went away).
    pub(super) fn sample(&mut self, tokenizer: &Tokenizer, metrics: &Metrics) -> Result<bool, ModelError> {
        let Some(token) = self.seq.sample(tokenizer)? else {
            return Ok(false);
        };
        let now = Instant::now();
        if self.first_token.is_none() {
            self.first_token = Some(now);
            metrics.time_to_first_token.observe((now - self.admitted).as_secs_f64());
        }
        self.last_token = now;
        self.tokens += 1;
        if self.events.send(Event::Token(token)).is_err() {
            self.span.in_scope(|| debug!("client went away; cancelling"));
            metrics.cancel(CancelReason::ClientGone);
            self.seq.cancel();
            return Ok(false);
        }
        Ok(self.seq.finish_reason().is_none())
    }

    /// Reports a failure (its channel may already be closed).
    pub(super) fn fail(mut self, e: EngineError) {
        self.seq.cancel();
        let _ = self.events.send(Event::Failed(e));
    }

    /// Reports the end of a sequence (its channel may already be closed).
    pub(super) fn finish(mut self, metrics: &Metrics) {
        let tail = self.seq.take_held_text();
        let reason = self.seq.finish_reason().unwrap_or(FinishReason::Stop);
        let generation = self.seq.into_generation();
        metrics.tokens.generated.inc_by(generation.completion_tokens as u64);
        if let (Some(first), true) = (self.first_token, self.tokens > 1) {
            metrics.time_per_output_token.observe((self.last_token - first).as_secs_f64() / (self.tokens - 1) as f64);
        }
        self.span.in_scope(|| info!(completion_tokens = generation.completion_tokens, ?reason, "finished"));
        let _ = self.events.send(Event::Finished(FinishReport {
            reason,
            tail,
            prompt_tokens: generation.prompt_tokens,
            completion_tokens: generation.completion_tokens,
        }));
    }
}
