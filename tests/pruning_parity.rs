//! Parity with the authors' FitPrune algorithm ported onto HF transformers
//! (`tests/reference/fitprune_reference.py` -> `tests/fixtures/parity/fitprune_expected.json`):
//! kept visual tokens per pruning layer, pruned first-step log-probabilities (1e-4), greedy
//! tokens, and calibrated recipes with their alpha.

mod common;

use fitprune::engine::generate::{generate, FinishReason, GenerationParams};
use fitprune::engine::sampling::{log_softmax, SamplingParams};
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::model::LlavaModel;
use fitprune::pruning::calibrate::{calibrate, CalibrateOptions, Silent};
use fitprune::pruning::PruneHook;
use serde::Deserialize;

use common::{demo_model, fixture_image, DemoSpec};

#[derive(Debug, Deserialize)]
struct Trace {
    layer: usize,
    kept_visual: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct RecipeCase {
    name: String,
    model: DemoSpec,
    images: Vec<String>,
    text: String,
    deletions: Vec<usize>,
    weights_sha256: String,
    input_ids: Vec<u32>,
    trace: Vec<Trace>,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f32>,
    greedy: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    image: String,
    text: String,
}

#[derive(Debug, Deserialize)]
struct BudgetResult {
    budget: f64,
    alpha: Option<f64>,
    deletions: Option<Vec<usize>>,
}

#[derive(Debug, Deserialize)]
struct CalibrationCase {
    model: DemoSpec,
    samples: Vec<Sample>,
    budgets: Vec<f64>,
    tolerance: f64,
    weights_sha256: String,
    results: Vec<BudgetResult>,
}

#[derive(Debug, Deserialize)]
struct Expected {
    recipes: Vec<RecipeCase>,
    calibration: CalibrationCase,
}

fn expected() -> Expected {
    let path = common::fixtures().join("fitprune_expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn user(images: usize, text: &str) -> Vec<ChatMessage> {
    let mut content: Vec<ContentPart> = (0..images).map(|_| ContentPart::Image).collect();
    content.push(ContentPart::Text(text.into()));
    vec![ChatMessage { role: "user".into(), content }]
}

#[test]
fn fixed_recipes_prune_like_the_authors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut worst = 0f32;
    for case in expected().recipes {
        let (dir, model) = demo_model(tmp.path(), &case.model, &case.weights_sha256);
        let images: Vec<_> = case.images.iter().map(|n| fixture_image(n)).collect();
        let prompt = model.prepare(&user(images.len(), &case.text), &images).unwrap();
        assert_eq!(prompt.input_ids, case.input_ids, "{}: prompt ids", case.name);

        let mut hook = PruneHook::new(case.deletions.clone(), &prompt);
        let prefill = model.prefill(&prompt, &mut model.new_cache(), &mut hook).unwrap();
        let got: Vec<(usize, &Vec<u32>)> = hook.trace().iter().map(|t| (t.layer, &t.kept_visual)).collect();
        let want: Vec<(usize, &Vec<u32>)> = case.trace.iter().map(|t| (t.layer, &t.kept_visual)).collect();
        assert_eq!(got, want, "{}: kept visual tokens per pruning layer", case.name);

        let logprobs = log_softmax(&prefill.logits.to_vec1::<f32>().unwrap());
        for (id, want) in case.top_ids.iter().zip(&case.top_logprobs) {
            let diff = (logprobs[*id as usize] - want).abs();
            worst = worst.max(diff);
            assert!(diff <= 1e-4, "{}: token {id}: {} vs {want}", case.name, logprobs[*id as usize]);
        }
        let params =
            GenerationParams { sampling: SamplingParams::default(), max_tokens: case.greedy.len(), stop: Vec::new() };
        let mut hook = PruneHook::new(case.deletions.clone(), &prompt);
        let out = generate(&model, &prompt, &params, &mut hook, &mut |_| true).unwrap();
        let mut ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
        if out.finish_reason == FinishReason::Stop {
            ids.extend(model.eos_ids().first());
        }
        assert_eq!(ids, case.greedy, "{}: greedy tokens after pruning", case.name);
        drop(dir);
    }
    eprintln!("worst pruned first-step logprob difference: {worst:.2e}");
}

#[test]
fn calibration_finds_the_authors_recipes_and_alphas() {
    let tmp = tempfile::tempdir().unwrap();
    let cal = expected().calibration;
    let (_, model): (_, LlavaModel) = demo_model(tmp.path(), &cal.model, &cal.weights_sha256);
    let prompts: Vec<_> =
        cal.samples.iter().map(|s| model.prepare(&user(1, &s.text), &[fixture_image(&s.image)]).unwrap()).collect();
    let opts = CalibrateOptions { budgets: cal.budgets.clone(), tolerance: cal.tolerance };
    let got = calibrate(&model, &prompts, &opts, &mut Silent).unwrap();
    for (g, want) in got.budgets.iter().zip(&cal.results) {
        assert_eq!(g.budget, want.budget);
        assert_eq!(g.alpha, want.alpha, "budget {}: alpha", g.budget);
        assert_eq!(Some(&g.deletions), want.deletions.as_ref(), "budget {}: deletions", g.budget);
    }
    let c = got.counts;
    eprintln!(
        "calibration: {:.0} layer evaluations vs {} naive ({:.1}x fewer), {} fits",
        c.layers(),
        c.naive_layers,
        c.naive_layers as f64 / c.layers(),
        c.fits
    );
    assert!(c.layers() < c.naive_layers as f64, "sharing must save work");
}
