//! Parity with the authors' FitPrune algorithm ported onto HF transformers
//! (`tests/reference/fitprune_reference.py` -> `tests/fixtures/parity/fitprune_expected.json`):
//! kept visual tokens per pruning layer, pruned first-step log-probabilities (1e-4), greedy
//! tokens, and calibrated recipes with their alpha.

mod common;

use fitprune::engine::generate::{generate, FinishReason, GenerationParams, Sequence};
use fitprune::engine::sampling::{log_softmax, SamplingParams};
use fitprune::engine::sequence::SequenceStart;
use fitprune::model::llama::{DecoderHook, NoHook};
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

/// The same cases prefilled as batches (one per demo checkpoint, each with an unpruned text-only
/// prompt riding along): every sequence must still match the authors' reference alone.
#[test]
fn fixed_recipes_prune_like_the_authors_in_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = expected().recipes;
    let mut models: Vec<(String, &DemoSpec, &String)> = Vec::new();
    for c in &cases {
        let key = format!("{:?}", c.model);
        if !models.iter().any(|(k, _, _)| *k == key) {
            models.push((key, &c.model, &c.weights_sha256));
        }
    }
    let mut batched = 0;
    for (key, spec, sha) in models {
        let (_dir, model) = demo_model(tmp.path(), spec, sha);
        let group: Vec<&RecipeCase> = cases.iter().filter(|c| format!("{:?}", c.model) == key).collect();
        let prompts: Vec<_> = group
            .iter()
            .map(|c| {
                let images: Vec<_> = c.images.iter().map(|n| fixture_image(n)).collect();
                model.prepare(&user(images.len(), &c.text), &images).unwrap()
            })
            .collect();
        let text_only = model.prepare(&user(0, "Say something."), &[]).unwrap();
        let mut hooks: Vec<PruneHook> =
            group.iter().zip(&prompts).map(|(c, p)| PruneHook::new(c.deletions.clone(), p)).collect();
        // Every token's logprob is reported, so the first step can be compared with the fixture.
        let all = SamplingParams { top_logprobs: model.config().text_config.vocab_size, ..Default::default() };
        let params: Vec<GenerationParams> = group
            .iter()
            .map(|c| GenerationParams { sampling: all.clone(), max_tokens: c.greedy.len(), stop: Vec::new() })
            .chain([GenerationParams { sampling: SamplingParams::default(), max_tokens: 8, stop: Vec::new() }])
            .collect();
        let mut none = NoHook;
        let mut starts: Vec<SequenceStart> = prompts
            .iter()
            .zip(hooks.iter_mut())
            .zip(&params)
            .map(|((prompt, hook), params)| SequenceStart { prompt, params, hook: hook as &mut dyn DecoderHook })
            .chain([SequenceStart { prompt: &text_only, params: &params[group.len()], hook: &mut none }])
            .collect();
        let seqs = Sequence::prefill_batch(&model, &mut starts).unwrap();
        drop(starts);
        batched += seqs.len();
        let mut seqs = seqs.into_iter();
        for ((case, hook), mut seq) in group.iter().zip(&hooks).zip(seqs.by_ref()) {
            let got: Vec<(usize, &Vec<u32>)> = hook.trace().iter().map(|t| (t.layer, &t.kept_visual)).collect();
            let want: Vec<(usize, &Vec<u32>)> = case.trace.iter().map(|t| (t.layer, &t.kept_visual)).collect();
            assert_eq!(got, want, "{} (batched): kept visual tokens per pruning layer", case.name);
            let mut ids = Vec::new();
            let mut first = true;
            while let Some(token) = seq.step(&model).unwrap() {
                if first {
                    let top: std::collections::HashMap<u32, f32> = token.top.iter().copied().collect();
                    for (id, want) in case.top_ids.iter().zip(&case.top_logprobs) {
                        let got = top[id];
                        assert!((got - want).abs() <= 1e-4, "{} (batched): token {id}: {got} vs {want}", case.name);
                    }
                    first = false;
                }
                ids.push(token.id);
            }
            if seq.finish_reason() == Some(FinishReason::Stop) {
                ids.extend(model.eos_ids().first());
            }
            assert_eq!(ids, case.greedy, "{} (batched): greedy tokens after pruning", case.name);
        }
        // The unpruned passenger equals its own single-sequence generation.
        let mut passenger = seqs.next().unwrap();
        let mut ids = Vec::new();
        while let Some(token) = passenger.step(&model).unwrap() {
            ids.push(token.id);
        }
        let alone = generate(&model, &text_only, &params[group.len()], &mut NoHook, &mut |_| true).unwrap();
        assert_eq!(ids, alone.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), "{key}: unpruned passenger");
    }
    assert_eq!(batched, cases.len() + 3, "every case ran in a batch");
}

#[test]
fn calibration_finds_the_authors_recipes_and_alphas() {
    let tmp = tempfile::tempdir().unwrap();
    let cal = expected().calibration;
    let (_, model): (_, LlavaModel) = demo_model(tmp.path(), &cal.model, &cal.weights_sha256);
    let prompts: Vec<_> =
        cal.samples.iter().map(|s| model.prepare(&user(1, &s.text), &[fixture_image(&s.image)]).unwrap()).collect();
    let opts = CalibrateOptions { budgets: cal.budgets.clone(), tolerance: cal.tolerance, ..Default::default() };
    let got = calibrate(&model, &prompts, &opts, &mut Silent).unwrap();
    for (g, want) in got.budgets.iter().zip(&cal.results) {
        assert_eq!(g.budget, want.budget);
        assert_eq!(g.alpha, want.alpha, "budget {}: alpha", g.budget);
        assert_eq!(Some(&g.deletions), want.deletions.as_ref(), "budget {}: deletions", g.budget);
    }
    // A memo too small to hold anything (every state recomputed from the sample's embeddings
    // when needed again) changes the work, never the result.
    let starved = calibrate(&model, &prompts, &CalibrateOptions { cache_bytes: 1, ..opts }, &mut Silent).unwrap();
    for (g, want) in starved.budgets.iter().zip(&got.budgets) {
        assert_eq!((g.alpha, &g.deletions), (want.alpha, &want.deletions), "budget {} with a starved memo", g.budget);
    }
    assert!(starved.counts.layers() > got.counts.layers(), "recomputation is counted");
    eprintln!("starved memo: {:.0} layer evaluations", starved.counts.layers());
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
