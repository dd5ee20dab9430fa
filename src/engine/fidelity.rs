//! Live fidelity monitor: for a sampled fraction of pruned chat requests, the engine later runs
//! the same prompt unpruned as background work and compares the first-token distributions —
//! KL(pruned ‖ unpruned) and whether the top-1 tokens agree — per recipe, so an operator sees
//! what a recipe costs on production traffic.
//!
//! The unpruned pass runs one slice per idle engine step (the embeddings, then one decoder layer
//! per slice, then the LM head), so a chat request that arrives waits at most for one layer.
//! Probes wait in a bounded backlog; when it is full new probes are dropped and counted.

use std::collections::VecDeque;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::metrics::Metrics;
use crate::model::{LlavaModel, PreparedPrompt};
use crate::pruning::layers::LayerRunner;
use crate::pruning::PruneError;

use super::sampling::{argmax, log_softmax};

/// How often and how much to probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FidelityConfig {
    /// Fraction of pruned requests to probe, in [0, 1]; 0 disables the monitor.
    pub sample_rate: f64,
    /// Probes that may wait; more are dropped (and counted).
    pub backlog: usize,
}

impl Default for FidelityConfig {
    fn default() -> Self {
        Self { sample_rate: 0.0, backlog: 32 }
    }
}

/// Where a probe's unpruned pass stands.
enum Stage {
    /// Nothing run yet.
    Embed,
    /// The input of decoder layer `layer`, (1, rows, hidden).
    Layer { layer: usize, x: Tensor },
}

/// One pruned request waiting for its unpruned counterpart.
struct Probe {
    recipe: String,
    prompt: PreparedPrompt,
    /// The pruned prefill's first-token logits.
    pruned: Vec<f32>,
    stage: Stage,
}

/// How far two first-token distributions are apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Divergence {
    /// KL(pruned ‖ unpruned) in nats.
    pub kl: f64,
    /// Whether the most likely tokens are the same.
    pub top1_agree: bool,
}

/// Compares a pruned first-token distribution with the unpruned one (both as logits).
pub fn divergence(pruned: &[f32], unpruned: &[f32]) -> Divergence {
    let (lp, lq) = (log_softmax(pruned), log_softmax(unpruned));
    let kl = lp.iter().zip(&lq).map(|(&p, &q)| f64::from(p).exp() * (f64::from(p) - f64::from(q))).sum::<f64>();
    Divergence { kl: kl.max(0.0), top1_agree: argmax(pruned) == argmax(unpruned) }
}

/// The monitor's backlog and the probe in flight.
pub(super) struct Monitor {
    config: FidelityConfig,
    rng: ChaCha8Rng,
    backlog: VecDeque<Probe>,
}

impl Monitor {
    pub(super) fn new(config: FidelityConfig) -> Self {
        Self { config, rng: ChaCha8Rng::from_os_rng(), backlog: VecDeque::new() }
    }

    /// Whether a probe is waiting or running.
    pub(super) fn has_work(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Considers a pruned request for probing (by the sample rate); drops it if the backlog is
    /// full.
    pub(super) fn offer(&mut self, recipe: &str, prompt: &PreparedPrompt, pruned: &[f32], metrics: &Metrics) {
        let rate = self.config.sample_rate;
        if rate <= 0.0 || (rate < 1.0 && self.rng.random::<f64>() >= rate) {
            return;
        }
        if self.backlog.len() >= self.config.backlog {
            metrics.fidelity.dropped.inc();
            return;
        }
        self.backlog.push_back(Probe {
            recipe: recipe.to_string(),
            prompt: prompt.clone(),
            pruned: pruned.to_vec(),
            stage: Stage::Embed,
        });
        metrics.fidelity.backlog.set(self.backlog.len() as i64);
    }

    /// Runs one slice of the oldest probe; records its result when it completes. A probe that
    /// fails is dropped (and counted), never retried.
    pub(super) fn step(&mut self, model: &LlavaModel, metrics: &Metrics) {
        let Some(probe) = self.backlog.front_mut() else { return };
        match advance(model, probe) {
            Ok(None) => return,
            Ok(Some(unpruned)) => {
                let d = divergence(&probe.pruned, &unpruned);
                metrics.fidelity.kl.with_label_values(&[&probe.recipe]).observe(d.kl);
                let agree = if d.top1_agree { "true" } else { "false" };
                metrics.fidelity.top1_agreement.with_label_values(&[&probe.recipe, agree]).inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, recipe = %probe.recipe, "fidelity probe failed; dropped");
                metrics.fidelity.dropped.inc();
            }
        }
        self.backlog.pop_front();
        metrics.fidelity.backlog.set(self.backlog.len() as i64);
    }
}

/// One slice of `probe`'s unpruned pass: `Some(logits)` once the last layer has run.
fn advance(model: &LlavaModel, probe: &mut Probe) -> Result<Option<Vec<f32>>, PruneError> {
    let layers = model.llama().num_layers();
    let positions: Vec<u32> = (0..probe.prompt.input_ids.len() as u32).collect();
    let next = match &probe.stage {
        Stage::Embed => Stage::Layer { layer: 0, x: LayerRunner::input_embeds(model, &probe.prompt)? },
        Stage::Layer { layer, x } => {
            let (attn, _) = LayerRunner::layer_attention(model, *layer, x, &positions, None)?;
            let x = LayerRunner::layer_finish(model, *layer, x, &attn, None)?;
            if layer + 1 == layers {
                let logits = model.llama().final_logits(&x)?.squeeze(0)?.to_vec1::<f32>()?;
                return Ok(Some(logits));
            }
            Stage::Layer { layer: layer + 1, x }
        }
    };
    probe.stage = next;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_is_zero_for_equal_distributions_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        let same = divergence(&a, &a);
        assert!(same.kl.abs() < 1e-9 && same.top1_agree);
        let b = [3.0f32, 2.0, 1.0];
        let d = divergence(&a, &b);
        assert!(!d.top1_agree);
        // Hand-computed: p = softmax(a), q = softmax(b) = reversed p; KL = sum p (log p - log q).
        let p: Vec<f64> = {
            let z: f64 = a.iter().map(|&x| f64::from(x).exp()).sum();
            a.iter().map(|&x| f64::from(x).exp() / z).collect()
        };
        let want: f64 = (0..3).map(|i| p[i] * (p[i].ln() - p[2 - i].ln())).sum();
        assert!((d.kl - want).abs() < 1e-5, "{} vs {want}", d.kl);
    }

    #[test]
    fn the_layer_by_layer_unpruned_pass_equals_a_plain_prefill() {
        use crate::model::llama::NoHook;
        use crate::model::prompt::{ChatMessage, ContentPart};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("demo");
        crate::model::demo::write_demo_model(&dir, &Default::default()).unwrap();
        let model = LlavaModel::load(&dir, Default::default()).unwrap();
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(50, 40, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
        }));
        let msg =
            ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text("Hi?".into())] };
        let prompt = model.prepare(&[msg], &[img]).unwrap();
        let want =
            model.prefill(&prompt, &mut model.new_cache(), &mut NoHook).unwrap().logits.to_vec1::<f32>().unwrap();
        let mut probe = Probe { recipe: "r".into(), prompt, pruned: Vec::new(), stage: Stage::Embed };
        let mut slices = 0;
        let got = loop {
            slices += 1;
            if let Some(logits) = advance(&model, &mut probe).unwrap() {
                break logits;
            }
        };
        // The embeddings, then one slice per decoder layer.
        assert_eq!(slices, 1 + model.llama().num_layers());
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "worst logit difference {worst}");
    }

    #[test]
    fn the_backlog_is_bounded_and_drops_are_counted() {
        let metrics = Metrics::new().unwrap();
        let mut m = Monitor::new(FidelityConfig { sample_rate: 1.0, backlog: 2 });
        let prompt = PreparedPrompt {
            text: String::new(),
            input_ids: vec![1, 2],
            pixel_values: None,
            image_spans: Vec::new(),
            image_sizes: Vec::new(),
        };
        for _ in 0..5 {
            m.offer("r", &prompt, &[0.0, 1.0], &metrics);
        }
        assert_eq!(m.backlog.len(), 2);
        assert_eq!(metrics.fidelity.dropped.get(), 3);
        let mut off = Monitor::new(FidelityConfig { sample_rate: 0.0, backlog: 2 });
        off.offer("r", &prompt, &[0.0, 1.0], &metrics);
        assert!(!off.has_work());
    }
}
