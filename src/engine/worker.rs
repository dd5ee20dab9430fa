//! The engine thread: loads the model, then loops over rounds. Each round takes new commands,
//! prefills waiting requests into free running slots (several in one batched pass, within a
//! token budget), and gives every running sequence exactly one decode step, so a long generation
//! cannot starve the others.
//!
//! Decode is round-robin over single-sequence steps, not batched: each step is its own forward
//! pass. Background work (calibration) gets a slice only when no chat work exists.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, error, info, info_span, warn, Span};

use crate::metrics::CancelReason;
use crate::model::llama::{DecoderHook, NoHook};
use crate::pruning::PruneHook;

use super::queue::{
    BackgroundWork, Command, EngineError, EngineState, Event, FinishReport, Loader, PrefillReport, Queued, Shared,
};
use super::sequence::{FinishReason, Sequence, SequenceStart};

pub use super::loaded::LoadedModel;

/// A sequence being decoded.
struct Running {
    seq: Sequence,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    admitted: Instant,
    deadline: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
    tokens: usize,
    span: Span,
}

struct Worker {
    loaded: Arc<LoadedModel>,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    waiting: VecDeque<Box<Queued>>,
    running: Vec<Running>,
    background: VecDeque<Box<dyn BackgroundWork>>,
    /// All handles are gone: finish what is in flight, then exit.
    disconnected: bool,
}

/// The thread body.
pub(super) fn run(loader: Loader, shared: Arc<Shared>, rx: Receiver<Command>) {
    let start = Instant::now();
    let loaded = match loader() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            error!(error = %e, "model failed to load");
            shared.set_state(EngineState::Failed(e.to_string()));
            return;
        }
    };
    let info = &loaded.info;
    info!(model = %info.name, device = %info.device, dtype = %info.dtype, seconds = start.elapsed().as_secs_f64(), "model loaded");
    shared.metrics.set_model_info(&info.name, &info.device, &info.dtype);
    shared.set_state(EngineState::Ready(loaded.clone()));
    let mut worker = Worker {
        loaded,
        shared: shared.clone(),
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        background: VecDeque::new(),
        disconnected: false,
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
    if outcome.is_err() {
        error!("engine thread panicked; no further requests can be served");
    }
    shared.metrics.running.set(0);
    shared.set_state(EngineState::Stopped);
}

impl Worker {
    fn run(&mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty() && self.background.is_empty();
            if idle && self.disconnected {
                return;
            }
            if idle {
                match self.rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            // Before taking what arrived, so a test that holds the engine here sees every request
            // it sent in the next round.
            if let Some(hook) = &self.shared.config.round_hook {
                (hook.0)();
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.disconnected = true;
                        break;
                    }
                }
            }
            self.round();
        }
    }

    /// Takes one command; `false` means exit now.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Chat(q) => self.waiting.push_back(q),
            Command::Background(w) => self.background.push_back(w),
            Command::Shutdown => {
                self.cancel_all();
                return false;
            }
        }
        true
    }

    fn round(&mut self) {
        let free = self.shared.config.max_running.saturating_sub(self.running.len());
        if free > 0 && !self.waiting.is_empty() {
            let batch = self.next_prefill_batch(free);
            self.start(batch);
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.step(i) {
                i += 1;
            } else {
                let done = self.running.swap_remove(i);
                // Update the gauge before the client hears the end, so the two never disagree.
                self.shared.metrics.running.set(self.running.len() as i64);
                self.finish(done);
            }
        }
        self.shared.metrics.running.set(self.running.len() as i64);
        if self.running.is_empty() && self.waiting.is_empty() {
            if let Some(work) = self.background.front_mut() {
                if !work.step(&self.loaded.model) {
                    self.background.pop_front();
                }
            }
        }
    }

    /// Waiting requests to prefill together, in arrival order: at most `free`, and while count ×
    /// longest prompt (a bound on the batch's tokens) stays within the prefill token budget. Requests whose
    /// client left or whose deadline passed are ended here instead.
    fn next_prefill_batch(&mut self, free: usize) -> Vec<Queued> {
        let limit = self.shared.config.max_batch_prefill_tokens;
        let mut batch: Vec<Queued> = Vec::new();
        let mut longest = 0;
        while batch.len() < free {
            let Some(front) = self.waiting.front() else { break };
            let len = front.job.prompt.input_ids.len();
            if !batch.is_empty() && (batch.len() + 1) * longest.max(len) > limit {
                break;
            }
            let Some(q) = self.waiting.pop_front() else { break };
            self.shared.left_queue();
            if let Some(q) = self.admit(*q) {
                longest = longest.max(len);
                batch.push(q);
            }
        }
        batch
    }

    /// Ends a request that can no longer start (client gone, deadline passed); else records its
    /// queue wait and hands it back.
    fn admit(&self, q: Queued) -> Option<Queued> {
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        if q.events.is_closed() {
            metrics.cancel(CancelReason::ClientGone);
            info_span!("request", request_id = %q.job.request_id).in_scope(|| debug!("client went away while waiting"));
            return None;
        }
        if now >= q.deadline {
            metrics.cancel(CancelReason::Timeout);
            let _ = q.events.send(Event::Failed(EngineError::Timeout(self.shared.config.request_timeout)));
            return None;
        }
        metrics.queue_wait.observe((now - q.admitted).as_secs_f64());
        Some(q)
    }

    /// The pruning hook a request's recipe asks for (none without a recipe or visual tokens).
    fn prune_hook(q: &Queued) -> Option<PruneHook> {
        let visual = q.job.prompt.visual_tokens();
        match &q.job.recipe {
            Some(r) if visual > 0 => Some(PruneHook::new(r.deletions_for(visual), &q.job.prompt)),
            _ => None,
        }
    }

    /// Prefills `batch` (one batched pass when it holds several) and starts decoding it. If a
    /// batched pass fails, each request is retried alone so only the faulty one fails.
    fn start(&mut self, batch: Vec<Queued>) {
        if batch.len() <= 1 {
            batch.into_iter().for_each(|q| self.start_one(q));
            return;
        }
        let started = Instant::now();
        let mut prunes: Vec<Option<PruneHook>> = batch.iter().map(Self::prune_hook).collect();
        let mut unpruned: Vec<NoHook> = batch.iter().map(|_| NoHook).collect();
        let mut starts: Vec<SequenceStart<'_>> = batch
            .iter()
            .zip(prunes.iter_mut().zip(unpruned.iter_mut()))
            .map(|(q, (prune, none))| SequenceStart {
                prompt: &q.job.prompt,
                params: &q.job.params,
                hook: match prune {
                    Some(h) => h,
                    None => none,
                },
            })
            .collect();
        let result = Sequence::prefill_batch(&self.loaded.model, &mut starts);
        drop(starts);
        match result {
            Ok(seqs) => {
                let prefill_s = started.elapsed().as_secs_f64();
                self.shared.metrics.prefill_batch_size.observe(batch.len() as f64);
                for ((q, prune), seq) in batch.into_iter().zip(prunes).zip(seqs) {
                    self.started(q, prune, seq, prefill_s);
                }
            }
            Err(e) => {
                warn!(error = %e, requests = batch.len(), "batched prefill failed; prefilling one at a time");
                batch.into_iter().for_each(|q| self.start_one(q));
            }
        }
    }

    /// Prefills one request alone.
    fn start_one(&mut self, q: Queued) {
        let started = Instant::now();
        let mut prune = Self::prune_hook(&q);
        let hook: &mut dyn DecoderHook = match prune.as_mut() {
            Some(h) => h,
            None => &mut NoHook,
        };
        match Sequence::prefill(&self.loaded.model, &q.job.prompt, &q.job.params, hook) {
            Ok(seq) => {
                self.shared.metrics.prefill_batch_size.observe(1.0);
                self.started(q, prune, seq, started.elapsed().as_secs_f64());
            }
            Err(e) => {
                info_span!("request", request_id = %q.job.request_id).in_scope(|| warn!(error = %e, "prefill failed"));
                let _ = q.events.send(Event::Failed(EngineError::Model(e)));
            }
        }
    }

    /// Reports a finished prefill to its client and metrics, and adds it to the running set.
    fn started(&mut self, q: Queued, prune: Option<PruneHook>, seq: Sequence, prefill_s: f64) {
        let span = info_span!("request", request_id = %q.job.request_id);
        let _entered = span.enter();
        let metrics = &self.shared.metrics;
        let visual = q.job.prompt.visual_tokens();
        let pruned = prune.is_some();
        metrics.prefill_duration.with_label_values(&[if pruned { "true" } else { "false" }]).observe(prefill_s);
        metrics.tokens.prompt.inc_by(seq.prompt_tokens() as u64);
        metrics.tokens.image.inc_by(visual as u64);
        let report = match &prune {
            Some(h) => {
                let reduction = self.loaded.info.flops.reduction(h.visual_in() as u64, &h.applied_deletions());
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
            return;
        }
        drop(_entered);
        let Queued { events, admitted, deadline, .. } = q;
        let now = Instant::now();
        self.running.push(Running {
            seq,
            events,
            admitted,
            deadline,
            first_token: None,
            last_token: now,
            tokens: 0,
            span,
        });
    }

    /// One decode step for running sequence `i`; `false` once it has ended.
    fn step(&mut self, i: usize) -> bool {
        let r = &mut self.running[i];
        let metrics = &self.shared.metrics;
        if r.events.is_closed() {
            r.span.in_scope(|| debug!("client went away; cancelling"));
            metrics.cancel(CancelReason::ClientGone);
            r.seq.cancel();
            return false;
        }
        if Instant::now() >= r.deadline {
            metrics.cancel(CancelReason::Timeout);
            r.seq.cancel();
            let _ = r.events.send(Event::Failed(EngineError::Timeout(self.shared.config.request_timeout)));
            return false;
        }
        match r.seq.step(&self.loaded.model) {
            Ok(Some(token)) => {
                let now = Instant::now();
                if r.first_token.is_none() {
                    r.first_token = Some(now);
                    metrics.time_to_first_token.observe((now - r.admitted).as_secs_f64());
                }
                r.last_token = now;
                r.tokens += 1;
                if r.events.send(Event::Token(token)).is_err() {
                    metrics.cancel(CancelReason::ClientGone);
                    r.seq.cancel();
                    return false;
                }
                r.seq.finish_reason().is_none()
            }
            Ok(None) => false,
            Err(e) => {
                r.span.in_scope(|| warn!(error = %e, "decode step failed"));
                r.seq.cancel();
                let _ = r.events.send(Event::Failed(EngineError::Model(e)));
                false
            }
        }
    }

    /// Reports the end of a sequence (its channel may already be closed).
    fn finish(&self, mut r: Running) {
        let tail = r.seq.take_held_text();
        let reason = r.seq.finish_reason().unwrap_or(FinishReason::Stop);
        let generation = r.seq.into_generation();
        let metrics = &self.shared.metrics;
        metrics.tokens.generated.inc_by(generation.completion_tokens as u64);
        if let (Some(first), true) = (r.first_token, r.tokens > 1) {
            metrics.time_per_output_token.observe((r.last_token - first).as_secs_f64() / (r.tokens - 1) as f64);
        }
        r.span.in_scope(|| info!(completion_tokens = generation.completion_tokens, ?reason, "finished"));
        let _ = r.events.send(Event::Finished(FinishReport {
            reason,
            tail,
            prompt_tokens: generation.prompt_tokens,
            completion_tokens: generation.completion_tokens,
        }));
    }

    fn cancel_all(&mut self) {
        let metrics = &self.shared.metrics;
        for q in self.waiting.drain(..) {
            self.shared.left_queue();
            metrics.cancel(CancelReason::Shutdown);
            let _ = q.events.send(Event::Failed(EngineError::ShuttingDown));
        }
        for mut r in self.running.drain(..) {
            metrics.cancel(CancelReason::Shutdown);
            r.seq.cancel();
            let _ = r.events.send(Event::Failed(EngineError::ShuttingDown));
        }
        for mut w in self.background.drain(..) {
            w.cancel();
        }
        // Requests still in the channel are refused too.
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Chat(q) = cmd {
                self.shared.left_queue();
                metrics.cancel(CancelReason::Shutdown);
                let _ = q.events.send(Event::Failed(EngineError::ShuttingDown));
            }
        }
        metrics.running.set(0);
    }
}
