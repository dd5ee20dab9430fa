//! The engine's public face: [`Engine`] admits requests (an immediate 429-style refusal when the
//! waiting queue is full), hands them to the worker thread that owns the model, and gives each
//! request its own channel of [`Event`]s. Dropping that channel cancels the request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::metrics::Metrics;
use crate::model::{LlavaModel, ModelError, PreparedPrompt};
use crate::pruning::Recipe;

use super::fidelity::FidelityConfig;
use super::scheduler::ScheduleError;
use super::sequence::{FinishReason, GeneratedToken, GenerationParams};
use super::worker::{self, LoadedModel};

/// Queue sizes and deadlines.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for a running slot; one more is refused.
    pub max_waiting: usize,
    /// Most sequences running at once (each advances one token per engine step).
    pub max_running: usize,
    /// Deadline per request, queue wait included.
    pub request_timeout: Duration,
    /// Waiting requests are prefilled together while their prompt tokens (summed) stay within
    /// this many; one request is always admitted, so 1 disables batching.
    pub max_batch_prefill_tokens: usize,
    /// KV-cache bytes all running sequences may hold; `None` = the device default
    /// (`engine::worker::default_kv_capacity`).
    pub kv_cache_bytes: Option<u64>,
    /// The live fidelity monitor (off by default).
    pub fidelity: FidelityConfig,
    /// Called before every engine step (not set by the CLI).
    pub round_hook: Option<RoundHook>,
    /// Makes chosen passes fail, to test the fault paths (not set by the CLI).
    pub fault: Option<FaultInjector>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_waiting: 64,
            max_running: 8,
            request_timeout: Duration::from_secs(600),
            max_batch_prefill_tokens: 4096,
            kv_cache_bytes: None,
            fidelity: FidelityConfig::default(),
            round_hook: None,
            fault: None,
        }
    }
}

/// A callback the engine thread runs before each engine step (schedule, one batched prefill
/// and/or one batched decode pass, update). Tests block in it to single-step the engine, so
/// "mid-stream" states are deterministic; blocking in it blocks the whole engine.
#[derive(Clone)]
pub struct RoundHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for RoundHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoundHook")
    }
}

/// Which pass of an engine step a [`FaultInjector`] is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A (batched) prefill.
    Prefill,
    /// A (batched) decode.
    Decode,
}

/// Decides whether a pass of `Phase` over these request ids fails.
pub type FaultRule = dyn Fn(Phase, &[&str]) -> bool + Send + Sync;

/// A test seam: called with the phase and the request ids of every pass before it runs;
/// answering `true` makes that pass fail as a device error would.
#[derive(Clone)]
pub struct FaultInjector(pub Arc<FaultRule>);

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultInjector")
    }
}

/// Why the engine could not take or finish a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full.
    #[error("the server is busy: {max_waiting} requests are already waiting; retry shortly")]
    QueueFull { max_waiting: usize },
    /// The model is still loading.
    #[error("the model is still loading")]
    Loading,
    /// The model failed to load.
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request ran past its deadline.
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    /// The worker thread is gone.
    #[error("the engine has stopped")]
    Stopped,
    /// The request can never be scheduled (it needs more KV cache than there is).
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The model rejected the input or failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A broken engine invariant (a bug, not the client's fault).
    #[error("internal engine error: {0}")]
    Internal(String),
}

/// A validated, tokenized request.
#[derive(Debug)]
pub struct ChatJob {
    /// For log lines.
    pub request_id: String,
    /// Tokens and pixels.
    pub prompt: PreparedPrompt,
    /// Sampling and limits.
    pub params: GenerationParams,
    /// The pruning recipe to apply (already chosen), if any.
    pub recipe: Option<Arc<Recipe>>,
}

/// What prefill did, sent before the first token.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillReport {
    /// Prompt tokens, image tokens included.
    pub prompt_tokens: usize,
    /// Visual tokens in the prompt.
    pub visual_tokens: usize,
    /// Visual tokens after the last pruning layer.
    pub visual_kept: usize,
    /// FLOPs reduction of the deletions actually applied.
    pub flops_reduction: f64,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishReport {
    /// `stop` or `length`.
    pub reason: FinishReason,
    /// Text held back for a possible stop string and released at the end.
    pub tail: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens, EOS included.
    pub completion_tokens: usize,
}

/// The stream of one request, in order: `Prefilled`, `Token`*, then `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// Prefill is done.
    Prefilled(PrefillReport),
    /// One token.
    Token(GeneratedToken),
    /// The end.
    Finished(FinishReport),
    /// The request failed (after `Prefilled`, only for timeouts, shutdown or model errors).
    Failed(EngineError),
}

/// Low-priority work (a calibration job's layer evaluations): one bounded slice per engine step,
/// run only in steps with no chat work waiting or running, so a chat request waits at most for
/// the one slice in flight when it arrived.
pub trait BackgroundWork: Send {
    /// Runs one slice (e.g. one calibration forward pass); `false` when the work is done.
    fn step(&mut self, model: &LlavaModel) -> bool;
    /// The engine is shutting down; no more steps follow.
    fn cancel(&mut self) {}
}

/// Lifecycle of the engine.
#[derive(Clone)]
pub enum EngineState {
    /// The worker is loading the model.
    Loading,
    /// Serving.
    Ready(Arc<LoadedModel>),
    /// Loading failed (the message).
    Failed(String),
    /// The worker has exited.
    Stopped,
}

pub(super) enum Command {
    Chat(Box<Queued>),
    Background(Box<dyn BackgroundWork>),
    /// Cancel everything and exit.
    Shutdown,
}

/// A chat job with its reply channel and admission time.
pub(super) struct Queued {
    pub(super) job: ChatJob,
    pub(super) events: UnboundedSender<Event>,
    pub(super) admitted: Instant,
    pub(super) deadline: Instant,
}

/// State shared by handles and the worker.
pub(super) struct Shared {
    pub(super) state: RwLock<EngineState>,
    pub(super) waiting: AtomicUsize,
    pub(super) draining: AtomicBool,
    pub(super) config: EngineConfig,
    pub(super) metrics: Metrics,
}

impl Shared {
    pub(super) fn set_state(&self, state: EngineState) {
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
    }

    /// One request left the waiting queue.
    pub(super) fn left_queue(&self) {
        let before = self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.waiting.set(before.saturating_sub(1) as i64);
    }
}

/// A cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
}

/// Loads the model on the worker thread.
pub type Loader = Box<dyn FnOnce() -> Result<LoadedModel, ModelError> + Send>;

impl Engine {
    /// Starts the worker thread; it runs `loader` first (the engine reports `Loading` meanwhile).
    pub fn start(loader: Loader, config: EngineConfig, metrics: Metrics) -> std::io::Result<(Self, JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            state: RwLock::new(EngineState::Loading),
            waiting: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            config,
            metrics,
        });
        let (tx, rx) = mpsc::channel();
        let worker_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fitprune-engine".into())
            .spawn(move || worker::run(loader, worker_shared, rx))?;
        Ok((Self { shared, tx }, thread))
    }

    /// The current lifecycle state.
    pub fn state(&self) -> EngineState {
        match self.shared.state.read() {
            Ok(s) => s.clone(),
            Err(_) => EngineState::Failed("engine state lock poisoned".into()),
        }
    }

    /// The loaded model, or why there is none.
    pub fn ready(&self) -> Result<Arc<LoadedModel>, EngineError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        match self.state() {
            EngineState::Ready(m) => Ok(m),
            EngineState::Loading => Err(EngineError::Loading),
            EngineState::Failed(e) => Err(EngineError::LoadFailed(e)),
            EngineState::Stopped => Err(EngineError::Stopped),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Admits a request or refuses it at once (queue full, loading, shutting down).
    pub fn submit(&self, job: ChatJob) -> Result<UnboundedReceiver<Event>, EngineError> {
        self.ready()?;
        let max = self.shared.config.max_waiting;
        self.shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w < max).then_some(w + 1))
            .map_err(|_| EngineError::QueueFull { max_waiting: max })?;
        self.shared.metrics.waiting.set(self.shared.waiting.load(Ordering::SeqCst) as i64);
        let (events, rx) = unbounded_channel();
        let admitted = Instant::now();
        let deadline = admitted + self.shared.config.request_timeout;
        let queued = Box::new(Queued { job, events, admitted, deadline });
        if self.tx.send(Command::Chat(queued)).is_err() {
            self.shared.left_queue();
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }

    /// Queues low-priority work (the calibration seam).
    pub fn submit_background(&self, work: Box<dyn BackgroundWork>) -> Result<(), EngineError> {
        self.ready()?;
        self.tx.send(Command::Background(work)).map_err(|_| EngineError::Stopped)
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Stops admitting; requests in flight continue.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Cancels everything in flight and stops the worker.
    pub fn shutdown(&self) {
        self.begin_drain();
        let _ = self.tx.send(Command::Shutdown);
    }
}
