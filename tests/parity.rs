//! Parity with HF transformers: demo checkpoints must give the prompt ids, first-step
//! log-probabilities (1e-4) and greedy tokens that `tests/reference/model_reference.py`
//! recorded from `LlavaForConditionalGeneration` in `tests/fixtures/parity/expected.json`.

mod common;

use fitprune::engine::generate::{generate, FinishReason, GenerationParams};
use fitprune::engine::sampling::{log_softmax, SamplingParams};
use fitprune::model::llama::NoHook;
use fitprune::model::prompt::{ChatMessage, ContentPart};
use serde::Deserialize;

use common::{demo_model, fixture_image, DemoSpec};

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    model: DemoSpec,
    images: Vec<String>,
    text: String,
    system: Option<String>,
    weights_sha256: String,
    prompt: String,
    input_ids: Vec<u32>,
    image_tokens: usize,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f32>,
    greedy: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

fn messages(case: &Case) -> Vec<ChatMessage> {
    let mut m = Vec::new();
    if let Some(s) = &case.system {
        m.push(ChatMessage { role: "system".into(), content: vec![ContentPart::Text(s.clone())] });
    }
    let mut content: Vec<ContentPart> = case.images.iter().map(|_| ContentPart::Image).collect();
    content.push(ContentPart::Text(case.text.clone()));
    m.push(ChatMessage { role: "user".into(), content });
    m
}

#[test]
fn demo_checkpoints_match_transformers() {
    let text = std::fs::read_to_string(common::fixtures().join("expected.json")).unwrap();
    let expected: Expected = serde_json::from_str(&text).unwrap();
    assert!(expected.cases.len() >= 6);
    let tmp = tempfile::tempdir().unwrap();
    let mut worst = 0f32;
    for case in &expected.cases {
        let (_, model) = demo_model(tmp.path(), &case.model, &case.weights_sha256);
        let images: Vec<_> = case.images.iter().map(|n| fixture_image(n)).collect();
        let prompt = model.prepare(&messages(case), &images).unwrap();
        assert_eq!(prompt.text, case.prompt, "{}: rendered prompt", case.name);
        assert_eq!(prompt.input_ids, case.input_ids, "{}: prompt token ids", case.name);
        assert_eq!(prompt.visual_tokens(), case.image_tokens, "{}: image tokens", case.name);

        let mut cache = model.new_cache();
        let prefill = model.prefill(&prompt, &mut cache, &mut NoHook).unwrap();
        let logprobs = log_softmax(&prefill.logits.to_vec1::<f32>().unwrap());
        for (id, want) in case.top_ids.iter().zip(&case.top_logprobs) {
            let diff = (logprobs[*id as usize] - want).abs();
            worst = worst.max(diff);
            assert!(diff <= 1e-4, "{}: logprob of token {id}: {} vs {want}", case.name, logprobs[*id as usize]);
        }

        let params =
            GenerationParams { sampling: SamplingParams::default(), max_tokens: case.greedy.len(), stop: Vec::new() };
        let out = generate(&model, &prompt, &params, &mut NoHook, &mut |_| true).unwrap();
        let mut ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
        if out.finish_reason == FinishReason::Stop {
            ids.extend(model.eos_ids().first());
        }
        assert_eq!(ids, case.greedy, "{}: greedy tokens", case.name);
    }
    eprintln!("worst first-step logprob difference over all cases: {worst:.2e}");
}
