//! FitPrune on LLaVA-NeXT against the authors' algorithm ported onto transformers'
//! `LlavaNextForConditionalGeneration` (`tests/reference/fitprune_next_reference.py`,
//! `tests/fixtures/parity_next/fitprune_expected.json`): recipes fitted for N tokens applied to
//! prompts with other counts (floor(d * n / N)) keep the same visual tokens and give the same
//! logprobs and greedy tokens, and calibration on samples of different sizes finds the same
//! recipes and alphas.

mod common;

use fitprune::engine::generate::{generate, FinishReason, GenerationParams};
use fitprune::engine::sampling::{log_softmax, SamplingParams};
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::pruning::calibrate::{calibrate, CalibrateOptions, Silent};
use fitprune::pruning::{PruneHook, Recipe};
use serde::Deserialize;

use common::{next_demo_model, next_fixtures, DemoSpec};

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
    recipe: Recipe,
    visual_tokens: usize,
    scaled_deletions: Vec<usize>,
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
    weights_sha256: String,
    samples: Vec<Sample>,
    budgets: Vec<f64>,
    tolerance: f64,
    visual_tokens: Vec<usize>,
    results: Vec<BudgetResult>,
}

#[derive(Debug, Deserialize)]
struct Expected {
    recipes: Vec<RecipeCase>,
    calibration: CalibrationCase,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(next_fixtures().join("fitprune_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn image(name: &str) -> image::DynamicImage {
    image::open(next_fixtures().join(format!("{name}.png"))).unwrap()
}

fn user(images: usize, text: &str) -> Vec<ChatMessage> {
    let mut content: Vec<ContentPart> = (0..images).map(|_| ContentPart::Image).collect();
    content.push(ContentPart::Text(text.into()));
    vec![ChatMessage { role: "user".into(), content }]
}

#[test]
fn scaled_recipes_prune_next_prompts_like_the_authors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut worst = 0f32;
    for case in expected().recipes {
        let (_, model) = next_demo_model(tmp.path(), &case.model, &case.weights_sha256);
        let images: Vec<_> = case.images.iter().map(|n| image(n)).collect();
        let prompt = model.prepare(&user(images.len(), &case.text), &images).unwrap();
        assert_eq!(prompt.input_ids, case.input_ids, "{}: prompt ids", case.name);
        assert_eq!(prompt.visual_tokens(), case.visual_tokens, "{}: visual set", case.name);
        let deletions = case.recipe.deletions_for(prompt.visual_tokens());
        assert_eq!(deletions, case.scaled_deletions, "{}: floor(d * n / N)", case.name);

        let mut hook = PruneHook::new(deletions.clone(), &prompt);
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
        let mut hook = PruneHook::new(deletions, &prompt);
        let out = generate(&model, &prompt, &params, &mut hook, &mut |_| true).unwrap();
        let mut ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
        if out.finish_reason == FinishReason::Stop {
            ids.extend(model.eos_ids().first());
        }
        assert_eq!(ids, case.greedy, "{}: greedy tokens after pruning", case.name);
    }
    eprintln!("worst pruned NeXT first-step logprob difference: {worst:.2e}");
}

#[test]
fn calibration_on_mixed_sizes_finds_the_authors_recipes_and_alphas() {
    let tmp = tempfile::tempdir().unwrap();
    let cal = expected().calibration;
    let (_, model) = next_demo_model(tmp.path(), &cal.model, &cal.weights_sha256);
    let prompts: Vec<_> =
        cal.samples.iter().map(|s| model.prepare(&user(1, &s.text), &[image(&s.image)]).unwrap()).collect();
    let counts: Vec<usize> = prompts.iter().map(|p| p.visual_tokens()).collect();
    assert_eq!(counts, cal.visual_tokens, "per-sample visual counts");
    let opts = CalibrateOptions { budgets: cal.budgets.clone(), tolerance: cal.tolerance, ..Default::default() };
    let got = calibrate(&model, &prompts, &opts, &mut Silent).unwrap();
    let sum: usize = counts.iter().sum();
    assert_eq!(got.visual_tokens, (sum + counts.len() / 2) / counts.len(), "N is the mean count, rounded");
    for (g, want) in got.budgets.iter().zip(&cal.results) {
        assert_eq!(g.budget, want.budget);
        assert_eq!(g.alpha, want.alpha, "budget {}: alpha", g.budget);
        assert_eq!(Some(&g.deletions), want.deletions.as_ref(), "budget {}: deletions", g.budget);
    }
}
