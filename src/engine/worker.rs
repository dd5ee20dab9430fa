//! The engine thread: loads the model, then runs engine steps until shut down. One step is
//! schedule -> execute -> update (vLLM's `EngineCore.step`):
//! - **schedule**: requests whose client left or whose deadline passed are dropped, then the
//!   [`Scheduler`] picks which waiting requests start and which running ones advance;
//! - **execute**: one batched prefill of the newly admitted requests and one batched decode pass
//!   of every running sequence (sequences prefilled in this step decode from the next one on);
//! - **update**: each sequence samples from its row of the logits, tokens go to the clients,
//!   finished sequences leave and free their KV memory.
//!
//! A failed batched pass is retried one sequence at a time (after undoing what it appended to the
//! caches), so only the sequence that fails alone is failed. Background work (calibration layer
//! evaluations) gets one slice in a step with no chat work at all.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tracing::{error, info, warn};

use crate::metrics::CancelReason;
use crate::model::{LlavaModel, ModelError};

use super::device_pick::{pick_rows, Need, Picked};
use super::fidelity::Monitor;
use super::queue::{BackgroundWork, Command, EngineError, EngineState, Event, Loader, Phase, Queued, Shared};
use super::running::{Running, Waiting};
use super::scheduler::{Demand, Scheduler, SchedulerLimits, SeqId};
use super::sequence::Sequence;

pub use super::loaded::LoadedModel;

/// KV-cache capacity when `--kv-cache-mib` is not given on a CPU: 2 GiB.
pub const CPU_DEFAULT_KV_BYTES: u64 = 2 << 30;

/// Fraction of the device memory free after loading that CUDA gives the KV cache by default
/// (the rest is left for prefill activations: a pruning layer's probabilities alone are
/// heads × rows² × 4 bytes).
pub const CUDA_KV_FRACTION: f64 = 0.7;

/// The KV-cache capacity for `device` when none is configured.
pub fn default_kv_capacity(device: &candle_core::Device) -> u64 {
    match device {
        candle_core::Device::Cpu => CPU_DEFAULT_KV_BYTES,
        _ => cuda_free_bytes().map_or(CPU_DEFAULT_KV_BYTES, |free| (free as f64 * CUDA_KV_FRACTION) as u64),
    }
}

#[cfg(feature = "cuda")]
fn cuda_free_bytes() -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    match mem_get_info() {
        Ok((free, _total)) => Some(free as u64),
        Err(e) => {
            warn!(error = %e, "cannot query free device memory; pass --kv-cache-mib");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_free_bytes() -> Option<u64> {
    None
}

struct Worker {
    loaded: Arc<LoadedModel>,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    scheduler: Scheduler,
    waiting: HashMap<SeqId, Waiting>,
    running: HashMap<SeqId, Running>,
    background: VecDeque<Box<dyn BackgroundWork>>,
    /// Unpruned passes comparing pruned answers, also background work.
    fidelity: Monitor,
    /// Idle steps alternate between calibration slices and fidelity slices.
    fidelity_turn: bool,
    next_id: SeqId,
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
    let config = &shared.config;
    let capacity = config.kv_cache_bytes.unwrap_or_else(|| default_kv_capacity(&loaded.model.options().device));
    info!(model = %info.name, device = %info.device, dtype = %info.dtype, kv_cache_mib = capacity >> 20,
        seconds = start.elapsed().as_secs_f64(), "model loaded");
    shared.metrics.set_model_info(&info.name, &info.device, &info.dtype);
    shared.metrics.engine.kv_cache_bytes.with_label_values(&["capacity"]).set(capacity as i64);
    shared.set_state(EngineState::Ready(loaded.clone()));
    let limits = SchedulerLimits {
        max_running: config.max_running,
        max_batch_prefill_tokens: config.max_batch_prefill_tokens,
        kv_capacity_bytes: capacity,
    };
    let mut worker = Worker {
        loaded,
        shared: shared.clone(),
        rx,
        scheduler: Scheduler::new(limits),
        waiting: HashMap::new(),
        running: HashMap::new(),
        background: VecDeque::new(),
        fidelity: Monitor::new(config.fidelity),
        fidelity_turn: false,
        next_id: 0,
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
            let idle = self.scheduler.is_idle() && self.background.is_empty() && !self.fidelity.has_work();
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
            // it sent in the next step.
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
            self.step();
        }
    }

    /// Takes one command; `false` means exit now.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Chat(q) => self.enqueue(*q),
            Command::Background(w) => self.background.push_back(w),
            Command::Shutdown => {
                self.cancel_all();
                return false;
            }
        }
        true
    }

    /// Computes a request's KV demand and hands it to the scheduler (or refuses it at once if it
    /// could never fit).
    fn enqueue(&mut self, queued: Queued) {
        let waiting = Waiting::new(queued, &self.loaded.info);
        let demand =
            Demand { prompt_tokens: waiting.queued.job.prompt.input_ids.len(), kv_bytes: waiting.demand.bytes };
        let id = self.next_id;
        self.next_id += 1;
        match self.scheduler.enqueue(id, demand) {
            Ok(()) => {
                self.waiting.insert(id, waiting);
            }
            Err(e) => {
                self.shared.left_queue();
                let _ = waiting.queued.events.send(Event::Failed(EngineError::Schedule(e)));
            }
        }
    }

    /// One engine step.
    fn step(&mut self) {
        self.drop_abandoned();
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            self.background_slice();
            return;
        }
        if !plan.prefill.is_empty() {
            let started = Instant::now();
            let batch: Vec<(SeqId, Waiting)> =
                plan.prefill.iter().filter_map(|&id| self.waiting.remove(&id).map(|w| (id, w))).collect();
            self.prefill(batch);
            self.observe_step("prefill", started);
        }
        let decode: Vec<SeqId> = plan.decode.into_iter().filter(|id| self.running.contains_key(id)).collect();
        if !decode.is_empty() {
            let started = Instant::now();
            self.shared.metrics.engine.decode_batch_size.observe(decode.len() as f64);
            self.decode(&decode);
            self.observe_step("decode", started);
        }
        self.publish_gauges();
    }

    /// One slice of background work in a step with no chat work: calibration and fidelity
    /// probes take turns when both wait.
    fn background_slice(&mut self) {
        self.fidelity_turn = !self.fidelity_turn;
        let fidelity_first = self.fidelity_turn || self.background.is_empty();
        if fidelity_first && self.fidelity.has_work() {
            self.fidelity.step(&self.loaded.model, &self.shared.metrics);
        } else if let Some(work) = self.background.front_mut() {
            if !work.step(&self.loaded.model) {
                self.background.pop_front();
            }
        }
    }

    fn observe_step(&self, phase: &str, started: Instant) {
        self.shared.metrics.engine.step_duration.with_label_values(&[phase]).observe(started.elapsed().as_secs_f64());
    }

    fn publish_gauges(&self) {
        let metrics = &self.shared.metrics;
        metrics.running.set(self.scheduler.running_len() as i64);
        metrics.engine.kv_cache_bytes.with_label_values(&["used"]).set(self.scheduler.kv_used() as i64);
    }

    /// Ends requests whose client went away or whose deadline passed, waiting or running.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let metrics = self.shared.metrics.clone();
        let waiting: Vec<SeqId> = self.scheduler.waiting().collect();
        for id in waiting {
            let Some(w) = self.waiting.get(&id) else { continue };
            let reason = if w.queued.events.is_closed() {
                CancelReason::ClientGone
            } else if now >= w.queued.deadline {
                CancelReason::Timeout
            } else {
                continue;
            };
            self.scheduler.remove(id);
            self.shared.left_queue();
            metrics.cancel(reason);
            if let Some(w) = self.waiting.remove(&id) {
                if reason == CancelReason::Timeout {
                    let _ =
                        w.queued.events.send(Event::Failed(EngineError::Timeout(self.shared.config.request_timeout)));
                }
            }
        }
        let running: Vec<SeqId> = self.scheduler.running().collect();
        for id in running {
            let Some(r) = self.running.get(&id) else { continue };
            let reason = if r.events.is_closed() {
                CancelReason::ClientGone
            } else if now >= r.deadline {
                CancelReason::Timeout
            } else {
                continue;
            };
            metrics.cancel(reason);
            let timeout = EngineError::Timeout(self.shared.config.request_timeout);
            self.end(id, (reason == CancelReason::Timeout).then_some(timeout));
        }
    }

    /// Removes a running sequence: reports its end (`Some` error: as a failure) and frees its
    /// memory.
    fn end(&mut self, id: SeqId, failure: Option<EngineError>) {
        self.scheduler.remove(id);
        if let Some(r) = self.running.remove(&id) {
            self.publish_gauges();
            match failure {
                Some(e) => r.fail(e),
                None => r.finish(&self.shared.metrics),
            }
        }
    }

    /// Executes a step's prefill: one batched pass (a lone request runs alone); if it fails,
    /// each request is retried alone so only the faulty one fails.
    fn prefill(&mut self, batch: Vec<(SeqId, Waiting)>) {
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        for (_, w) in &batch {
            self.shared.left_queue();
            metrics.queue_wait.observe((now - w.queued.admitted).as_secs_f64());
        }
        if batch.len() > 1 {
            match self.prefill_pass(&batch) {
                Ok(seqs) => {
                    self.shared.metrics.prefill_batch_size.observe(batch.len() as f64);
                    let elapsed = now.elapsed().as_secs_f64();
                    for ((id, w), (prune, seq)) in batch.into_iter().zip(seqs) {
                        self.started(id, w, prune, seq, elapsed);
                    }
                    return;
                }
                Err(e) => warn!(error = %e, requests = batch.len(), "batched prefill failed; prefilling one at a time"),
            }
        }
        for one in batch {
            let started = Instant::now();
            let single = std::slice::from_ref(&one);
            match self.prefill_pass(single) {
                Ok(mut seqs) => {
                    self.shared.metrics.prefill_batch_size.observe(1.0);
                    let (id, w) = one;
                    if let Some((prune, seq)) = seqs.pop() {
                        self.started(id, w, prune, seq, started.elapsed().as_secs_f64());
                    }
                }
                Err(e) => {
                    let (id, w) = one;
                    super::running::request_span(&w.queued).in_scope(|| warn!(error = %e, "prefill failed"));
                    self.scheduler.remove(id);
                    let _ = w.queued.events.send(Event::Failed(e));
                }
            }
        }
    }

    /// One prefill pass over `batch`.
    fn prefill_pass(
        &self,
        batch: &[(SeqId, Waiting)],
    ) -> Result<Vec<(Option<crate::pruning::PruneHook>, Sequence)>, EngineError> {
        let waiting: Vec<&Waiting> = batch.iter().map(|(_, w)| w).collect();
        let names: Vec<&str> = waiting.iter().map(|w| w.queued.job.request_id.as_str()).collect();
        self.inject(Phase::Prefill, &names)?;
        super::running::prefill(&self.loaded.model, &waiting)
    }

    /// Fails the pass over these requests if the test fault injector asks for it.
    fn inject(&self, phase: Phase, request_ids: &[&str]) -> Result<(), EngineError> {
        match &self.shared.config.fault {
            Some(fault) if (fault.0)(phase, request_ids) => {
                let e = candle_core::Error::Msg(format!("injected {phase:?} fault"));
                Err(EngineError::Model(ModelError::Candle(e)))
            }
            _ => Ok(()),
        }
    }

    /// Reports a finished prefill, adds the sequence to the running set and samples its first
    /// token from the prefill's logits.
    fn started(
        &mut self,
        id: SeqId,
        w: Waiting,
        prune: Option<crate::pruning::PruneHook>,
        seq: Sequence,
        prefill_s: f64,
    ) {
        let metrics = &self.shared.metrics;
        metrics.engine.kv_tokens_saved.inc_by(w.demand.tokens_saved);
        if let (Some(_), Some(recipe), Some(logits)) = (&prune, &w.queued.job.recipe, seq.pending_logits()) {
            self.fidelity.offer(&recipe.id, &w.queued.job.prompt, logits, metrics);
        }
        match Running::start(w.queued, prune, seq, prefill_s, &self.loaded.info, metrics) {
            Some(r) => {
                self.running.insert(id, r);
                self.sample(id);
            }
            None => {
                self.scheduler.remove(id);
            }
        }
    }

    /// Executes a step's decode: one batched pass over `ids`; if it fails, the caches are
    /// restored and each sequence is retried alone.
    fn decode(&mut self, ids: &[SeqId]) {
        match self.decode_pass(ids) {
            Ok(()) => ids.iter().for_each(|&id| self.sample(id)),
            Err(e) if ids.len() > 1 => {
                warn!(error = %e, sequences = ids.len(), "batched decode failed; decoding one at a time");
                for &id in ids {
                    match self.decode_pass(&[id]) {
                        Ok(()) => self.sample(id),
                        Err(e) => self.fail_decode(id, e),
                    }
                }
            }
            Err(e) => self.fail_decode(ids[0], e),
        }
    }

    /// Ends a sequence whose decode failed on its own.
    fn fail_decode(&mut self, id: SeqId, e: EngineError) {
        if let Some(r) = self.running.get(&id) {
            r.span.in_scope(|| warn!(error = %e, "decode step failed"));
        }
        self.end(id, Some(e));
    }

    /// One decode pass over `ids`, handing each sequence its logits. On failure every cache is
    /// as it was before the pass.
    fn decode_pass(&mut self, ids: &[SeqId]) -> Result<(), EngineError> {
        let started = Instant::now();
        let names: Vec<&str> =
            ids.iter().filter_map(|id| self.running.get(id)).map(|r| r.request_id.as_str()).collect();
        self.inject(Phase::Decode, &names)?;
        let mut seqs: Vec<&mut Running> = Vec::with_capacity(ids.len());
        // Disjoint mutable borrows of the map's values, in `ids` order.
        let mut by_id: HashMap<SeqId, &mut Running> = self.running.iter_mut().map(|(id, r)| (*id, r)).collect();
        for id in ids {
            if let Some(r) = by_id.remove(id) {
                seqs.push(r);
            }
        }
        let mut tokens = Vec::with_capacity(seqs.len());
        let mut positions = Vec::with_capacity(seqs.len());
        for r in &seqs {
            let (t, p) = r
                .seq
                .decode_input()
                .ok_or_else(|| EngineError::Internal("a running sequence has no token to decode".into()))?;
            tokens.push(t);
            positions.push(p);
        }
        let lengths: Vec<Vec<usize>> = seqs.iter().map(|r| r.seq.cache().lengths()).collect();
        let needs: Vec<Need> = seqs.iter().map(|r| r.seq.need()).collect();
        let picked = {
            let mut caches: Vec<&mut crate::model::llama::KvCache> =
                seqs.iter_mut().map(|r| r.seq.cache_mut()).collect();
            decode_rows(&self.loaded.model, &tokens, &positions, &mut caches, &needs)
        };
        match picked {
            Ok(rows) => {
                let elapsed = started.elapsed();
                for (r, row) in seqs.into_iter().zip(rows) {
                    r.seq.set_next(row, elapsed);
                }
                Ok(())
            }
            Err(e) => {
                for (r, lengths) in seqs.into_iter().zip(lengths) {
                    r.seq.cache_mut().truncate(&lengths);
                }
                Err(EngineError::Model(e))
            }
        }
    }

    /// Samples sequence `id`'s next token from the logits it holds and sends it; ends the
    /// sequence if that finished it (or its client is gone).
    fn sample(&mut self, id: SeqId) {
        let Some(r) = self.running.get_mut(&id) else { return };
        match r.sample(self.loaded.model.tokenizer(), &self.shared.metrics) {
            Ok(true) => {}
            Ok(false) => self.end(id, None),
            Err(e) => {
                r.span.in_scope(|| warn!(error = %e, "sampling failed"));
                self.end(id, Some(EngineError::Model(e)));
            }
        }
    }

    fn cancel_all(&mut self) {
        let metrics = &self.shared.metrics;
        for (id, w) in self.waiting.drain() {
            self.scheduler.remove(id);
            self.shared.left_queue();
            metrics.cancel(CancelReason::Shutdown);
            let _ = w.queued.events.send(Event::Failed(EngineError::ShuttingDown));
        }
        for (id, r) in self.running.drain() {
            self.scheduler.remove(id);
            metrics.cancel(CancelReason::Shutdown);
            r.fail(EngineError::ShuttingDown);
        }
        for mut w in self.background.drain(..) {
            w.cancel();
        }
        // Requests still in the channel are refused too; background work there is cancelled.
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Chat(q) => {
                    self.shared.left_queue();
                    metrics.cancel(CancelReason::Shutdown);
                    let _ = q.events.send(Event::Failed(EngineError::ShuttingDown));
                }
                Command::Background(mut w) => w.cancel(),
                Command::Shutdown => {}
            }
        }
        metrics.running.set(0);
        metrics.engine.kv_cache_bytes.with_label_values(&["used"]).set(0);
    }
}

/// One batched decode pass; each row's token is picked on the logits' device, so the host
/// receives only what the responses need (`device_pick`).
fn decode_rows(
    model: &LlavaModel,
    tokens: &[u32],
    positions: &[u32],
    caches: &mut [&mut crate::model::llama::KvCache],
    needs: &[Need],
) -> Result<Vec<Picked>, ModelError> {
    pick_rows(&model.decode_batch(tokens, positions, caches)?, needs)
}
