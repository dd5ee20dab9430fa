//! Calibration jobs: one job at a time on a runner thread that does the alpha search and the
//! store writes, while every forward pass (vision tower, each layer evaluation) runs on the
//! engine thread as background work (`engine::background::EngineLayers`), only in engine steps
//! with no chat work. So one thread runs forward passes and a chat request waits at most for the
//! one layer evaluation in flight when it arrived.
//!
//! Between layer evaluations the job checks its cancel flag. Progress, the outcome and the
//! fitted recipes are written to the store; a cancelled job stores nothing. When the server shuts
//! down mid-job the engine stops running its evaluations and the job is recorded as failed
//! ("interrupted") before the process exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::{CancelFlags, JobQueue, JobRequest};
use image::DynamicImage;
use sqlx::SqlitePool;
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::recipe_source::DbRecipes;
use crate::engine::background::EngineLayers;
use crate::engine::{Engine, EngineState, LoadedModel};
use crate::metrics::Metrics;
use crate::model::prompt::{ChatMessage, ContentPart};
use crate::pruning::calibrate::{calibrate, CalibrateOptions, CalibrationObserver};
use crate::pruning::{PruneError, Recipe};
use crate::store::jobs::{self, JobStatus, Progress};
use crate::store::{new_id, recipes};

/// One image + question to calibrate on.
#[derive(Debug, Clone)]
pub struct CalibrationSample {
    /// The decoded image.
    pub image: DynamicImage,
    /// The user's question.
    pub prompt: String,
}

/// A job ready to run (its row already exists as `queued`).
#[derive(Debug, Clone)]
pub struct CalibrationRequest {
    /// Job id (row in `calibration_jobs`).
    pub job_id: String,
    /// Name prefix for the recipes.
    pub name: Option<String>,
    /// FLOPs budgets.
    pub budgets: Vec<f64>,
    /// Alpha search tolerance.
    pub tolerance: f64,
    /// Samples.
    pub samples: Vec<CalibrationSample>,
}

/// Handle to the calibration thread.
pub type CalibrationJobs = JobQueue<CalibrationRequest>;

impl JobRequest for CalibrationRequest {
    fn job_id(&self) -> &str {
        &self.job_id
    }
}

/// What the thread needs.
struct Runner {
    pool: SqlitePool,
    engine: Engine,
    recipes: Arc<DbRecipes>,
    metrics: Metrics,
    rt: Handle,
    cancels: CancelFlags,
    /// Memo limit per job (`CalibrateOptions::cache_bytes`).
    cache_bytes: usize,
}

impl JobQueue<CalibrationRequest> {
    /// Starts the calibration thread (call inside the tokio runtime that runs the store queries).
    pub fn start(
        pool: SqlitePool,
        engine: Engine,
        recipes: Arc<DbRecipes>,
        metrics: Metrics,
        cache_bytes: usize,
    ) -> std::io::Result<Self> {
        let rt = Handle::current();
        Self::spawn("calibration", move |rx, cancels| {
            Runner { pool, engine, recipes, metrics, rt, cancels, cache_bytes }.run(rx)
        })
    }
}

/// Progress to the store, cancellation, and yielding to chat traffic.
struct Observer<'a> {
    runner: &'a Runner,
    job_id: &'a str,
    cancel: Arc<AtomicBool>,
    last_write: Instant,
}

impl CalibrationObserver for Observer<'_> {
    fn progress(&mut self, done: usize, total: usize, phase: &str) {
        // At most a few writes a second; the final state is written by `finish`.
        if self.last_write.elapsed() < Duration::from_millis(200) && done < total {
            return;
        }
        self.last_write = Instant::now();
        let p = Progress { done: done as u64, total: total as u64, phase: phase.to_string() };
        if let Err(e) = self.runner.rt.block_on(jobs::progress(&self.runner.pool, self.job_id, &p)) {
            warn!(job = self.job_id, error = %e, "recording calibration progress failed");
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

impl Runner {
    fn run(self, rx: Receiver<CalibrationRequest>) {
        while let Ok(req) = rx.recv() {
            let started = Instant::now();
            let status = self.run_job(&req);
            self.metrics.calibration_jobs.with_label_values(&[status.as_str()]).inc();
            self.metrics.calibration_duration.observe(started.elapsed().as_secs_f64());
            self.cancels.remove(&req.job_id);
        }
    }

    fn finish(&self, id: &str, status: JobStatus, error: Option<&str>, recipe_ids: &[String]) -> JobStatus {
        if let Err(e) = self.rt.block_on(jobs::finish(&self.pool, id, status, error, recipe_ids, &crate::store::now()))
        {
            warn!(job = id, error = %e, "recording the end of a calibration job failed");
        }
        status
    }

    fn run_job(&self, req: &CalibrationRequest) -> JobStatus {
        let id = req.job_id.as_str();
        let cancel = self.cancels.flag(id);
        if cancel.load(Ordering::SeqCst) {
            return self.finish(id, JobStatus::Cancelled, None, &[]);
        }
        let loaded = match self.wait_for_model() {
            Some(l) => l,
            None => return self.finish(id, JobStatus::Failed, Some("the model is not loaded"), &[]),
        };
        match self.rt.block_on(jobs::start(&self.pool, id, &crate::store::now())) {
            Ok(true) => {}
            Ok(false) => return JobStatus::Cancelled, // cancelled while queued; already final
            Err(e) => return self.finish(id, JobStatus::Failed, Some(&e.to_string()), &[]),
        }
        info!(job = id, samples = req.samples.len(), budgets = ?req.budgets, "calibration started");
        let mut observer = Observer { runner: self, job_id: id, cancel, last_write: Instant::now() };
        match self.calibrate(req, &loaded, &mut observer) {
            Ok(recipes) => {
                let ids: Vec<String> = recipes.iter().map(|r| r.id.clone()).collect();
                self.recipes.invalidate();
                self.refresh_recipe_gauge();
                info!(job = id, recipes = ?ids, "calibration succeeded");
                self.finish(id, JobStatus::Succeeded, None, &ids)
            }
            Err(PruneError::Cancelled) if self.engine.is_draining() => {
                self.finish(id, JobStatus::Failed, Some("interrupted: the server shut down"), &[])
            }
            Err(PruneError::Cancelled) => self.finish(id, JobStatus::Cancelled, None, &[]),
            Err(PruneError::Interrupted(why)) => {
                warn!(job = id, %why, "calibration interrupted");
                self.finish(id, JobStatus::Failed, Some("interrupted: the server shut down"), &[])
            }
            Err(e) => self.finish(id, JobStatus::Failed, Some(&e.to_string()), &[]),
        }
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

    fn calibrate(
        &self,
        req: &CalibrationRequest,
        loaded: &LoadedModel,
        observer: &mut Observer<'_>,
    ) -> Result<Vec<Recipe>, PruneError> {
        let model = &loaded.model;
        let prompts = req
            .samples
            .iter()
            .map(|s| {
                let msg = ChatMessage {
                    role: "user".into(),
                    content: vec![ContentPart::Image, ContentPart::Text(s.prompt.clone())],
                };
                model.prepare(&[msg], std::slice::from_ref(&s.image))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let opts =
            CalibrateOptions { budgets: req.budgets.clone(), tolerance: req.tolerance, cache_bytes: self.cache_bytes };
        let layers = EngineLayers::new(self.engine.clone(), loaded.info.flops);
        let result = calibrate(&layers, &prompts, &opts, observer)?;
        let unreachable: Vec<f64> = result.budgets.iter().filter(|b| b.alpha.is_none()).map(|b| b.budget).collect();
        if !unreachable.is_empty() {
            return Err(PruneError::InvalidInput(format!(
                "budgets {unreachable:?} cannot be reached even at alpha = 1"
            )));
        }
        let created_at = crate::store::now();
        let prefix = req.name.clone().unwrap_or_else(|| "fitprune".into());
        let fitted: Vec<Recipe> = result
            .budgets
            .iter()
            .map(|b| Recipe {
                id: new_id("rcp"),
                name: format!("{prefix}-{:.0}", b.budget * 100.0),
                model_fingerprint: loaded.info.fingerprint.clone(),
                budget: b.budget,
                achieved_reduction: b.achieved_reduction,
                deletions: b.deletions.clone(),
                alpha: b.alpha,
                visual_tokens: result.visual_tokens,
                samples: result.samples,
                created_at: created_at.clone(),
                job_id: Some(req.job_id.clone()),
            })
            .collect();
        // All recipes of a job land together or not at all.
        let stored: Result<(), crate::store::StoreError> = self.rt.block_on(async {
            let mut tx = self.pool.begin().await?;
            for r in &fitted {
                recipes::insert(&mut *tx, r).await?;
            }
            tx.commit().await?;
            Ok(())
        });
        stored.map_err(|e| PruneError::InvalidInput(format!("storing recipes: {e}")))?;
        Ok(fitted)
    }

    fn refresh_recipe_gauge(&self) {
        if let Ok(n) = self.rt.block_on(recipes::count(&self.pool)) {
            self.metrics.recipes_stored.set(n);
        }
    }
}
