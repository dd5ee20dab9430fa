//! Evaluation jobs (`POST /admin/evaluations`): one job at a time on a runner thread that drives
//! the shared evaluation loop ([`crate::eval::evaluate`], the one `fitprune eval` runs) while
//! every forward pass — each prefill and each decode step — runs on the engine thread as
//! background work ([`EnginePasses`]), only in engine steps with no chat work. So one thread runs
//! forward passes and a chat request waits at most for the one pass in flight when it arrived.
//!
//! Between passes the job checks its cancel flag. Progress and the outcome are written to the
//! store; the result rows land together with the success, and a cancelled job stores none. When
//! the server shuts down mid-job the engine stops running its passes and the job is recorded as
//! failed ("interrupted") before the process exits, as calibration jobs are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::{CancelFlags, JobQueue, JobRequest};
use image::DynamicImage;
use sqlx::SqlitePool;
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::engine::background::EngineLayers;
use crate::engine::{Engine, EngineState, LoadedModel};
use crate::eval::recipes::{fit_recipes, match_budgets};
use crate::eval::run::prepare_sample;
use crate::eval::{evaluate, EvalError, EvalObserver, EvalPlan, EvalSample, Passes};
use crate::metrics::Metrics;
use crate::model::LlavaModel;
use crate::pruning::calibrate::CalibrationObserver;
use crate::pruning::PruneError;
use crate::store::evaluations;
use crate::store::jobs::{JobStatus, Progress};

/// Samples with their images decoded.
#[derive(Debug, Clone)]
pub struct SampleSet {
    /// Questions, labels and answer kinds (`image` paths are unused: images come decoded).
    pub samples: Vec<EvalSample>,
    /// `images[i]` is sample i's decoded image.
    pub images: Vec<DynamicImage>,
}

/// An evaluation ready to run (its row already exists as `queued`).
#[derive(Debug, Clone)]
pub struct EvaluationRequest {
    /// Job id (row in `evaluation_jobs`).
    pub job_id: String,
    /// What to evaluate on.
    pub samples: SampleSet,
    /// Fit the budgets' recipes on these first (FitPrune calibration; labels ignored); then the
    /// plan's budgets carry no recipes yet.
    pub calibration: Option<SampleSet>,
    /// Methods, budgets with their recipes, answer length, seeds.
    pub plan: EvalPlan,
}

/// Handle to the evaluation thread.
pub type EvaluationJobs = JobQueue<EvaluationRequest>;

impl JobRequest for EvaluationRequest {
    fn job_id(&self) -> &str {
        &self.job_id
    }
}

/// What the thread needs.
struct Runner {
    pool: SqlitePool,
    engine: Engine,
    metrics: Metrics,
    rt: Handle,
    cancels: CancelFlags,
}

impl JobQueue<EvaluationRequest> {
    /// Starts the evaluation thread (call inside the tokio runtime that runs the store queries).
    pub fn start(pool: SqlitePool, engine: Engine, metrics: Metrics) -> std::io::Result<Self> {
        let rt = Handle::current();
        Self::spawn("evaluation", move |rx, cancels| Runner { pool, engine, metrics, rt, cancels }.run(rx))
    }
}

/// The evaluation's forward passes on the engine thread, as background work.
pub struct EnginePasses {
    engine: Engine,
    loaded: Arc<LoadedModel>,
    cancel: Arc<AtomicBool>,
}

impl Passes for EnginePasses {
    fn model(&self) -> &LlavaModel {
        &self.loaded.model
    }

    fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce(&LlavaModel) -> Result<T, EvalError> + Send + 'static,
    ) -> Result<T, EvalError> {
        self.engine.run_background(task).map_err(|e| EvalError::Interrupted(e.to_string()))?
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Progress to the store, at most a few writes a second; the cancel flag for calibration.
struct Observer<'a> {
    runner: &'a Runner,
    job_id: &'a str,
    cancel: Arc<AtomicBool>,
    last_write: Instant,
}

impl Observer<'_> {
    fn write(&mut self, done: usize, total: usize, phase: String) {
        // The final state is written with the outcome.
        if self.last_write.elapsed() < Duration::from_millis(200) && done < total {
            return;
        }
        self.last_write = Instant::now();
        let p = Progress { done: done as u64, total: total as u64, phase };
        if let Err(e) = self.runner.rt.block_on(evaluations::progress(&self.runner.pool, self.job_id, &p)) {
            warn!(job = self.job_id, error = %e, "recording evaluation progress failed");
        }
    }
}

impl EvalObserver for Observer<'_> {
    fn progress(&mut self, done: usize, total: usize) {
        self.write(done, total, "evaluating".into());
    }
}

impl CalibrationObserver for Observer<'_> {
    fn progress(&mut self, done: usize, total: usize, phase: &str) {
        self.write(done, total, format!("calibrating: {phase}"));
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

const INTERRUPTED: &str = "interrupted: the server shut down";

impl Runner {
    fn run(self, rx: Receiver<EvaluationRequest>) {
        while let Ok(req) = rx.recv() {
            let started = Instant::now();
            let status = self.run_job(&req);
            self.metrics.evaluation_jobs.with_label_values(&[status.as_str()]).inc();
            self.metrics.evaluation_duration.observe(started.elapsed().as_secs_f64());
            self.cancels.remove(&req.job_id);
        }
    }

    fn finish(&self, id: &str, status: JobStatus, error: Option<&str>) -> JobStatus {
        if let Err(e) = self.rt.block_on(evaluations::finish(&self.pool, id, status, error, &crate::store::now())) {
            warn!(job = id, error = %e, "recording the end of an evaluation job failed");
        }
        status
    }

    fn run_job(&self, req: &EvaluationRequest) -> JobStatus {
        let id = req.job_id.as_str();
        let cancel = self.cancels.flag(id);
        if cancel.load(Ordering::SeqCst) {
            return self.finish(id, JobStatus::Cancelled, None);
        }
        let Some(loaded) = self.wait_for_model() else {
            return self.finish(id, JobStatus::Failed, Some("the model is not loaded"));
        };
        match self.rt.block_on(evaluations::start(&self.pool, id, &crate::store::now())) {
            Ok(true) => {}
            Ok(false) => return JobStatus::Cancelled, // cancelled while queued; already final
            Err(e) => return self.finish(id, JobStatus::Failed, Some(&e.to_string())),
        }
        info!(job = id, samples = req.samples.samples.len(), budgets = req.plan.budgets.len(), "evaluation started");
        let mut observer = Observer { runner: self, job_id: id, cancel: cancel.clone(), last_write: Instant::now() };
        let plan = match &req.calibration {
            None => req.plan.clone(),
            Some(set) => match self.fit(&req.plan, set, &loaded, &mut observer) {
                Ok(plan) => plan,
                Err(e) => return self.failure(id, e),
            },
        };
        let passes = EnginePasses { engine: self.engine.clone(), loaded, cancel };
        let report = match evaluate(&passes, &req.samples.samples, &req.samples.images, &plan, &mut observer) {
            Ok(report) => report,
            Err(e) => return self.failure(id, e),
        };
        // Recipes fitted on the spot are not stored, so their rows name no recipe id.
        let per_budget: Vec<Option<String>> =
            plan.budgets.iter().map(|(_, r)| r.as_ref().map(|r| r.id.clone()).filter(|id| !id.is_empty())).collect();
        let row_recipes: Vec<Option<String>> =
            per_budget.iter().flat_map(|r| std::iter::repeat_n(r.clone(), plan.methods.len())).collect();
        let at = crate::store::now();
        match self.rt.block_on(evaluations::succeed(&self.pool, id, &report, &row_recipes, &at)) {
            Ok(true) => {
                info!(job = id, rows = report.rows.len(), "evaluation succeeded");
                JobStatus::Succeeded
            }
            // No longer running: cancelled as it finished; that answer stands.
            Ok(false) => JobStatus::Cancelled,
            Err(e) => self.finish(id, JobStatus::Failed, Some(&format!("storing results: {e}"))),
        }
    }

    /// Records why a job stopped: cancelled on request, interrupted by shutdown, or failed.
    fn failure(&self, id: &str, e: EvalError) -> JobStatus {
        match e {
            EvalError::Cancelled | EvalError::Prune(PruneError::Cancelled) if self.engine.is_draining() => {
                self.finish(id, JobStatus::Failed, Some(INTERRUPTED))
            }
            EvalError::Cancelled | EvalError::Prune(PruneError::Cancelled) => {
                self.finish(id, JobStatus::Cancelled, None)
            }
            EvalError::Interrupted(why) | EvalError::Prune(PruneError::Interrupted(why)) => {
                warn!(job = id, %why, "evaluation interrupted");
                self.finish(id, JobStatus::Failed, Some(INTERRUPTED))
            }
            e => self.finish(id, JobStatus::Failed, Some(&e.to_string())),
        }
    }

    /// Fits each positive budget's recipe on the calibration set, every layer evaluation on the
    /// engine thread (as calibration jobs do), and returns the plan with them.
    fn fit(
        &self,
        plan: &EvalPlan,
        set: &SampleSet,
        loaded: &Arc<LoadedModel>,
        observer: &mut Observer<'_>,
    ) -> Result<EvalPlan, EvalError> {
        let prompts = set
            .samples
            .iter()
            .zip(&set.images)
            .map(|(s, img)| prepare_sample(&loaded.model, s, img))
            .collect::<Result<Vec<_>, _>>()?;
        let layers = EngineLayers::new(self.engine.clone(), loaded.info.flops);
        let budgets: Vec<f64> = plan.budgets.iter().map(|(b, _)| *b).collect();
        let fitted = fit_recipes(&layers, &prompts, &budgets, &loaded.info.fingerprint, observer)?;
        let (planned, missing) = match_budgets(&budgets, &fitted);
        if !missing.is_empty() {
            return Err(EvalError::Dataset(format!(
                "budgets {missing:?} cannot be reached on the calibration set even at alpha = 1"
            )));
        }
        Ok(EvalPlan { budgets: planned, ..plan.clone() })
    }

    /// Waits (up to 10 minutes) for the engine to finish loading.
    fn wait_for_model(&self) -> Option<Arc<LoadedModel>> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match self.engine.state() {
                EngineState::Ready(m) => return Some(m),
                EngineState::Loading if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => return None,
            }
        }
    }
}
