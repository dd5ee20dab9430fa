//! The evaluation loop: every sample unpruned (the reference), then once per budget and method
//! with that method's hook, accumulating accuracy, agreement with the reference, first-token KL
//! and top-1 agreement, achieved FLOPs reduction and time to first token.

use std::time::Duration;

use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::model::prompt::{ChatMessage, ContentPart};
use crate::model::{LlavaModel, PreparedPrompt};
use crate::pruning::{FlopsModel, PruneHook, Recipe};

use super::answer::{canonical, is_correct};
use super::baselines::{FastVHook, RandomHook};
use super::dataset::EvalSample;
use super::passes::{answer, argmax, Answer, MethodHook, Passes};
use super::EvalError;

/// How visual tokens are chosen for deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// FitPrune's `cross × self` score at the recipe's layers and counts.
    Fitprune,
    /// Uniformly random visual tokens at the recipe's layers and counts (seeded).
    Random,
    /// The recipe's total deletions at one early layer, by attention from the last prompt token.
    Fastv,
}

impl Method {
    /// The lowercase name used in tables, JSON and the plot legend.
    pub fn name(self) -> &'static str {
        match self {
            Method::Fitprune => "fitprune",
            Method::Random => "random",
            Method::Fastv => "fastv",
        }
    }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    /// Methods, in report order.
    pub methods: Vec<Method>,
    /// One entry per budget, ascending as given: the budget and the recipe that realises it
    /// (`None` = unpruned, e.g. budget 0).
    pub budgets: Vec<(f64, Option<Recipe>)>,
    /// Most tokens to generate per answer (greedy).
    pub max_tokens: usize,
    /// Seed of the random baseline.
    pub seed: u64,
    /// Layer the FastV baseline prunes at.
    pub fastv_layer: usize,
}

/// One row of the report: a method at a budget, averaged over samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalRow {
    /// Deletion method.
    pub method: Method,
    /// Requested FLOPs budget.
    pub budget: f64,
    /// Name of the recipe used (`None` = unpruned).
    pub recipe: Option<String>,
    /// Share of labelled samples answered correctly; `None` without labels.
    pub accuracy: Option<f64>,
    /// Share of samples whose answer (in comparable form) equals the unpruned answer.
    pub agreement: f64,
    /// Mean KL(pruned ‖ unpruned) of the first generated token's distribution, in nats.
    pub kl_mean: f64,
    /// Share of samples whose most likely first token equals the unpruned one.
    pub top1_agreement: f64,
    /// Mean FLOPs reduction actually applied (FitPrune's FLOPs model, visual tokens).
    pub flops_reduction: f64,
    /// Mean visual tokens left after the last pruning layer.
    pub visual_tokens_kept: f64,
    /// Mean time to first token (vision tower + prefill), milliseconds.
    pub ttft_ms: f64,
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Samples evaluated.
    pub samples: usize,
    /// Samples with labels.
    pub labelled: usize,
    /// Visual tokens per sample (mean).
    pub visual_tokens: f64,
    /// Rows, budget-major then method in plan order.
    pub rows: Vec<EvalRow>,
}

/// Receives progress.
pub trait EvalObserver {
    /// `done` of `total` samples finished.
    fn progress(&mut self, done: usize, total: usize);
}

/// An observer that ignores progress.
pub struct Quiet;

impl EvalObserver for Quiet {
    fn progress(&mut self, _: usize, _: usize) {}
}

#[derive(Default, Clone)]
struct Acc {
    correct: usize,
    agree: usize,
    top1: usize,
    kl: f64,
    flops: f64,
    kept: f64,
    ttft: Duration,
}

/// The user turn every sample becomes: the image, then the question (LLaVA's eval prompts).
pub fn prepare_sample(
    model: &LlavaModel,
    sample: &EvalSample,
    image: &DynamicImage,
) -> Result<PreparedPrompt, EvalError> {
    let msg =
        ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text(sample.text.clone())] };
    Ok(model.prepare(&[msg], std::slice::from_ref(image))?)
}

/// Runs the plan over `samples` (`images[i]` is sample i's decoded image), every forward pass
/// through `passes`; stops with [`EvalError::Cancelled`] when `passes` says so.
pub fn evaluate<P: Passes + ?Sized>(
    passes: &P,
    samples: &[EvalSample],
    images: &[DynamicImage],
    plan: &EvalPlan,
    observer: &mut dyn EvalObserver,
) -> Result<EvalReport, EvalError> {
    let model = passes.model();
    if samples.len() != images.len() || samples.is_empty() {
        return Err(EvalError::Dataset(format!("{} samples but {} images", samples.len(), images.len())));
    }
    let layers = model.llama().num_layers();
    for (_, r) in &plan.budgets {
        if let Some(r) = r {
            r.validate(layers)?;
        }
    }
    let flops = FlopsModel::from_config(&model.config().text_config);
    let cells = plan.budgets.len() * plan.methods.len();
    let mut acc = vec![Acc::default(); cells];
    let (mut labelled, mut visual_sum) = (0usize, 0usize);
    for (i, (sample, image)) in samples.iter().zip(images).enumerate() {
        let prompt = prepare_sample(model, sample, image)?;
        let n = prompt.visual_tokens();
        visual_sum += n;
        labelled += usize::from(!sample.labels.is_empty());
        let reference = answer(passes, &prompt, MethodHook::Unpruned, plan.max_tokens)?;
        let ref_canon = canonical(sample.kind, &reference.text);
        let ref_top1 = argmax(&reference.first);
        for (b, (_, recipe)) in plan.budgets.iter().enumerate() {
            // An unpruned budget runs once for all methods: every method deletes nothing there.
            // (A second pass, not the reference itself: budget 0 agreeing with the reference checks
            // that passes are deterministic.)
            let shared = match recipe {
                None => Some(answer(passes, &prompt, MethodHook::Unpruned, plan.max_tokens)?),
                Some(_) => None,
            };
            for (m, &method) in plan.methods.iter().enumerate() {
                let got = match recipe {
                    Some(r) => {
                        let seed = plan.seed ^ ((i as u64) << 16) ^ (b as u64);
                        run_method(passes, &prompt, method, &r.deletions_for(n), plan, seed)?
                    }
                    None => shared.clone().ok_or_else(|| EvalError::Dataset("internal: no unpruned answer".into()))?,
                };
                let a = &mut acc[b * plan.methods.len() + m];
                a.correct += usize::from(is_correct(sample.kind, &got.text, &sample.labels));
                a.agree += usize::from(canonical(sample.kind, &got.text) == ref_canon);
                a.top1 += usize::from(argmax(&got.first) == ref_top1);
                a.kl += kl(&got.first, &reference.first);
                a.flops += flops.reduction(n as u64, &got.applied);
                a.kept += flops.kept(n as u64, &got.applied) as f64;
                a.ttft += got.ttft;
            }
        }
        observer.progress(i + 1, samples.len());
    }
    let count = samples.len() as f64;
    let mut rows = Vec::with_capacity(cells);
    for (b, (budget, recipe)) in plan.budgets.iter().enumerate() {
        for (m, &method) in plan.methods.iter().enumerate() {
            let a = &acc[b * plan.methods.len() + m];
            rows.push(EvalRow {
                method,
                budget: *budget,
                recipe: recipe.as_ref().map(|r| r.name.clone()),
                accuracy: (labelled > 0).then(|| a.correct as f64 / labelled as f64),
                agreement: a.agree as f64 / count,
                kl_mean: a.kl / count,
                top1_agreement: a.top1 as f64 / count,
                flops_reduction: a.flops / count,
                visual_tokens_kept: a.kept / count,
                ttft_ms: a.ttft.as_secs_f64() * 1000.0 / count,
            });
        }
    }
    Ok(EvalReport { samples: samples.len(), labelled, visual_tokens: visual_sum as f64 / count, rows })
}

/// One pruned answer with `method` at the recipe's per-layer counts `deletions`.
fn run_method<P: Passes + ?Sized>(
    passes: &P,
    prompt: &PreparedPrompt,
    method: Method,
    deletions: &[usize],
    plan: &EvalPlan,
    seed: u64,
) -> Result<Answer, EvalError> {
    let hook = match method {
        Method::Fitprune => MethodHook::Fitprune(PruneHook::new(deletions.to_vec(), prompt)),
        Method::Random => MethodHook::Random(Box::new(RandomHook::new(deletions.to_vec(), prompt, seed))),
        Method::Fastv => {
            let total = deletions.iter().sum();
            MethodHook::Fastv(FastVHook::new(plan.fastv_layer, total, deletions.len(), prompt))
        }
    };
    answer(passes, prompt, hook, plan.max_tokens)
}

/// KL(p ‖ q) in nats from log-probabilities, in f64.
pub fn kl(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = f64::from(lp).exp();
            if p == 0.0 {
                0.0
            } else {
                p * (f64::from(lp) - f64::from(lq))
            }
        })
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let p = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let q = [0.2f32.ln(), 0.7f32.ln(), 0.1f32.ln()];
        assert_eq!(kl(&p, &p), 0.0);
        let want = 0.7 * (0.7f64 / 0.2).ln() + 0.2 * (0.2f64 / 0.7).ln();
        assert!((kl(&p, &q) - want).abs() < 1e-6);
        assert_eq!(argmax(&p), 0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
