//! Background work on the engine thread: [`Engine::run_background`] runs a closure there as one
//! slice of low-priority work (only in a step with no chat work) and waits for its result, and
//! [`EngineLayers`] uses it so a calibration job's every layer evaluation runs on the engine
//! thread — one thread owns all forward passes, and a chat request waits at most for the one
//! layer evaluation in flight when it arrived. The job's own logic (the alpha search) runs on
//! the caller's thread.

use std::sync::mpsc::sync_channel;

use candle_core::Tensor;

use crate::model::{LlavaModel, PreparedPrompt};
use crate::pruning::layers::LayerRunner;
use crate::pruning::score::{RowRoles, VisualScores};
use crate::pruning::{FlopsModel, PruneError};

use super::queue::{BackgroundWork, Engine, EngineError};

type Task = Box<dyn FnOnce(&LlavaModel) + Send>;

/// One closure, run once.
struct OneShot(Option<Task>);

impl BackgroundWork for OneShot {
    fn step(&mut self, model: &LlavaModel) -> bool {
        if let Some(task) = self.0.take() {
            task(model);
        }
        false
    }
}

impl Engine {
    /// Runs `task` on the engine thread as one slice of background work and waits (blocking the
    /// calling thread, which must not be a runtime worker) for its result. Fails if the engine is
    /// not serving or shuts down before running it.
    pub fn run_background<T: Send + 'static>(
        &self,
        task: impl FnOnce(&LlavaModel) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = sync_channel(1);
        self.submit_background(Box::new(OneShot(Some(Box::new(move |model| {
            let _ = tx.send(task(model));
        })))))?;
        // The task is dropped unrun when the engine shuts down, which closes the channel.
        rx.recv().map_err(|_| EngineError::ShuttingDown)
    }
}

/// Calibration's layer evaluations, run on the engine thread.
pub struct EngineLayers {
    engine: Engine,
    flops: FlopsModel,
}

impl EngineLayers {
    /// Layer evaluations through `engine`, whose model has the FLOPs model `flops`.
    pub fn new(engine: Engine, flops: FlopsModel) -> Self {
        Self { engine, flops }
    }

    fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce(&LlavaModel) -> Result<T, PruneError> + Send + 'static,
    ) -> Result<T, PruneError> {
        self.engine.run_background(task).map_err(|e| PruneError::Interrupted(e.to_string()))?
    }
}

impl LayerRunner for EngineLayers {
    fn flops(&self) -> FlopsModel {
        self.flops
    }

    fn input_embeds(&self, prompt: &PreparedPrompt) -> Result<Tensor, PruneError> {
        let prompt = prompt.clone();
        self.run(move |model| LayerRunner::input_embeds(model, &prompt))
    }

    fn layer_attention(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &[u32],
        roles: Option<&RowRoles>,
    ) -> Result<(Tensor, Option<VisualScores>), PruneError> {
        let (x, positions, roles) = (x.clone(), positions.to_vec(), roles.cloned());
        self.run(move |model| LayerRunner::layer_attention(model, layer, &x, &positions, roles.as_ref()))
    }

    fn layer_finish(
        &self,
        layer: usize,
        x: &Tensor,
        attn: &Tensor,
        keep: Option<&[u32]>,
    ) -> Result<Tensor, PruneError> {
        let (x, attn, keep) = (x.clone(), attn.clone(), keep.map(<[u32]>::to_vec));
        self.run(move |model| LayerRunner::layer_finish(model, layer, &x, &attn, keep.as_deref()))
    }
}
