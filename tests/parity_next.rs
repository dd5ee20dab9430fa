//! Parity of the LLaVA-NeXT family with HF transformers: NeXT demo checkpoints (Llama and
//! Mistral backbones, with and without a sliding window) must give the prompt ids, per-image
//! visual-token counts, first-step log-probabilities and greedy tokens that
//! `tests/reference/next_reference.py` recorded from `LlavaNextForConditionalGeneration` in
//! `tests/fixtures/parity_next/expected.json`.

mod common;

use fitprune::engine::generate::{generate, FinishReason, GenerationParams};
use fitprune::engine::sampling::{log_softmax, SamplingParams};
use fitprune::model::llama::NoHook;
use fitprune::model::prompt::{ChatMessage, ContentPart};
use serde::Deserialize;

use common::{next_demo_model, next_fixtures, DemoSpec};

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    model: DemoSpec,
    images: Vec<String>,
    text: String,
    system: Option<String>,
    resampled: bool,
    weights_sha256: String,
    prompt: String,
    input_ids: Vec<u32>,
    image_tokens: Vec<usize>,
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
fn next_demo_checkpoints_match_transformers() {
    let text = std::fs::read_to_string(next_fixtures().join("expected.json")).unwrap();
    let expected: Expected = serde_json::from_str(&text).unwrap();
    assert!(expected.cases.len() >= 6);
    let tmp = tempfile::tempdir().unwrap();
    let (mut worst_exact, mut worst_resampled) = (0f32, 0f32);
    for case in &expected.cases {
        let (_, model) = next_demo_model(tmp.path(), &case.model, &case.weights_sha256);
        let images: Vec<_> =
            case.images.iter().map(|n| image::open(next_fixtures().join(format!("{n}.png"))).unwrap()).collect();
        let prompt = model.prepare(&messages(case), &images).unwrap();
        assert_eq!(prompt.text, case.prompt, "{}: rendered prompt", case.name);
        assert_eq!(prompt.input_ids, case.input_ids, "{}: prompt token ids", case.name);
        let spans: Vec<usize> = prompt.image_spans.iter().map(|s| s.len()).collect();
        assert_eq!(spans, case.image_tokens, "{}: visual tokens per image", case.name);

        let mut cache = model.new_cache();
        let prefill = model.prefill(&prompt, &mut cache, &mut NoHook).unwrap();
        let logprobs = log_softmax(&prefill.logits.to_vec1::<f32>().unwrap());
        for (id, want) in case.top_ids.iter().zip(&case.top_logprobs) {
            let diff = (logprobs[*id as usize] - want).abs();
            let worst = if case.resampled { &mut worst_resampled } else { &mut worst_exact };
            *worst = worst.max(diff);
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
    eprintln!(
        "worst first-step logprob difference: {worst_exact:.2e} (tile-sized images), \
         {worst_resampled:.2e} (resampled images), {} cases",
        expected.cases.len()
    );
}

/// The prompt side (placeholder expansion) and the model side (packed features) agree on every
/// image's count, for many sizes and aspect ratios, 1xN and Nx1 extremes and several images in
/// one prompt: `prefill` refuses any mismatch, and the spans must be the anyres counts.
#[test]
fn prompt_and_model_counts_agree_for_any_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("next");
    let opts =
        fitprune::model::demo::DemoOptions { family: fitprune::model::demo::DemoFamily::Next, ..Default::default() };
    fitprune::model::demo::write_demo_model(&dir, &opts).unwrap();
    let model = fitprune::model::LlavaModel::load(&dir, Default::default()).unwrap();
    let img = |w: u32, h: u32| {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9])))
    };
    let sizes = [
        (32, 32),
        (64, 64),
        (96, 32),
        (32, 96),
        (64, 48),
        (48, 64),
        (1, 1),
        (1, 300),
        (300, 1),
        (2, 97),
        (97, 2),
        (200, 6),
        (6, 200),
        (33, 31),
        (65, 17),
        (17, 65),
        (100, 75),
        (1000, 999),
        (31, 200),
    ];
    let mut counts = std::collections::BTreeSet::new();
    for group in sizes.chunks(3) {
        let images: Vec<_> = group.iter().map(|&(w, h)| img(w, h)).collect();
        let mut content: Vec<ContentPart> = images.iter().map(|_| ContentPart::Image).collect();
        content.push(ContentPart::Text("Compare.".into()));
        let prompt = model.prepare(&[ChatMessage { role: "user".into(), content }], &images).unwrap();
        for (span, &(w, h)) in prompt.image_spans.iter().zip(group) {
            assert_eq!(span.len(), model.image_token_count(w, h).unwrap(), "{w}x{h}");
            counts.insert(span.len());
        }
        let prefill = model.prefill(&prompt, &mut model.new_cache(), &mut NoHook).unwrap();
        assert_eq!(prefill.output.positions.len(), prompt.input_ids.len());
    }
    // The sizes really exercise different grids and unpadding (16 = base tile only).
    assert!(counts.len() >= 6 && counts.contains(&16), "{counts:?}");
}

fn next_dir(root: &std::path::Path, name: &str, opts: fitprune::model::demo::DemoOptions) -> std::path::PathBuf {
    let dir = root.join(name);
    fitprune::model::demo::write_demo_model(&dir, &opts).unwrap();
    dir
}

fn next_opts() -> fitprune::model::demo::DemoOptions {
    fitprune::model::demo::DemoOptions { family: fitprune::model::demo::DemoFamily::Next, ..Default::default() }
}

fn photo() -> image::DynamicImage {
    image::open(next_fixtures().join("photo.png")).unwrap()
}

/// transformers ≥ 4.52 names NeXT tensors `model.image_newline`, `model.language_model.*`,
/// `lm_head.*`: both layouts give the same logits, and a checkpoint without `image_newline` is
/// refused by name.
#[test]
fn next_checkpoints_load_in_both_layouts() {
    use fitprune::model::weights::TensorLayout;
    let tmp = tempfile::tempdir().unwrap();
    let hub = next_dir(tmp.path(), "hub", next_opts());
    let nested = next_dir(
        tmp.path(),
        "nested",
        fitprune::model::demo::DemoOptions { layout: TensorLayout::Nested, ..next_opts() },
    );
    let logits = |dir: &std::path::Path| {
        let model = fitprune::model::LlavaModel::load(dir, Default::default()).unwrap();
        let content = vec![ContentPart::Image, ContentPart::Text("Hi".into())];
        let prompt = model.prepare(&[ChatMessage { role: "user".into(), content }], &[photo()]).unwrap();
        model.prefill(&prompt, &mut model.new_cache(), &mut NoHook).unwrap().logits.to_vec1::<f32>().unwrap()
    };
    assert_eq!(logits(&hub), logits(&nested));

    // A 1.5 checkpoint relabelled as NeXT lacks the newline parameter.
    let v15 = next_dir(tmp.path(), "v15", Default::default());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v15.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "llava_next".into();
    cfg["image_grid_pinpoints"] = serde_json::json!([[96, 192]]);
    std::fs::write(v15.join("config.json"), cfg.to_string()).unwrap();
    let err = fitprune::model::LlavaModel::load(&v15, Default::default()).err().expect("must fail").to_string();
    assert!(err.contains("image_newline"), "{err}");
}

/// FitPrune on NeXT: the visual set is every image's whole packed span, recipes scale by
/// floor(d * n / N), and a batched prefill mixing image sizes matches each prompt alone.
#[test]
fn fitprune_prunes_whole_packed_spans_and_batches_mixed_sizes() {
    use fitprune::model::llava::PrefillItem;
    use fitprune::pruning::apply::PruneHook;
    let tmp = tempfile::tempdir().unwrap();
    let dir = next_dir(tmp.path(), "next", next_opts());
    let model = fitprune::model::LlavaModel::load(&dir, Default::default()).unwrap();
    let user = |n: usize, text: &str| {
        let mut content: Vec<ContentPart> = (0..n).map(|_| ContentPart::Image).collect();
        content.push(ContentPart::Text(text.into()));
        vec![ChatMessage { role: "user".into(), content }]
    };
    let tall = image::open(next_fixtures().join("tall.png")).unwrap();
    let two = model.prepare(&user(2, "Compare them."), &[photo(), tall.clone()]).unwrap();
    let one = model.prepare(&user(1, "What is it?"), &[tall]).unwrap();
    assert_eq!(two.image_spans.iter().map(|s| s.len()).collect::<Vec<_>>(), [70, 28]);

    let deletions = vec![0, 20, 10, 0];
    let mut hook = PruneHook::new(deletions.clone(), &two);
    model.prefill(&two, &mut model.new_cache(), &mut hook).unwrap();
    assert_eq!((hook.visual_in(), hook.visual_kept()), (98, 98 - 30));

    // Alone, then batched with another image size: same logits, same kept tokens.
    let alone: Vec<(Vec<f32>, usize)> = [&two, &one]
        .iter()
        .map(|p| {
            let mut hook = PruneHook::new(deletions.clone(), p);
            let out = model.prefill(p, &mut model.new_cache(), &mut hook).unwrap();
            (out.logits.to_vec1::<f32>().unwrap(), hook.visual_kept())
        })
        .collect();
    let (mut c1, mut c2) = (model.new_cache(), model.new_cache());
    let (mut h1, mut h2) = (PruneHook::new(deletions.clone(), &two), PruneHook::new(deletions.clone(), &one));
    let mut items = [
        PrefillItem { prompt: &two, cache: &mut c1, hook: &mut h1 },
        PrefillItem { prompt: &one, cache: &mut c2, hook: &mut h2 },
    ];
    let batched = model.prefill_batch(&mut items).unwrap();
    for (i, (b, (want, kept))) in batched.iter().zip(&alone).enumerate() {
        let got = b.logits.to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "prompt {i}: batched logits differ by {worst}");
        let kept_batched = if i == 0 { h1.visual_kept() } else { h2.visual_kept() };
        assert_eq!(kept_batched, *kept, "prompt {i}");
    }
}

/// Calibration takes NeXT samples of different sizes: each sample keeps its own visual count and
/// FLOPs, and the recipe's N is the samples' mean count, rounded.
#[test]
fn calibration_accepts_samples_of_different_sizes() {
    use fitprune::pruning::calibrate::{calibrate, CalibrateOptions, Silent};
    let tmp = tempfile::tempdir().unwrap();
    let dir = next_dir(tmp.path(), "next", next_opts());
    let model = fitprune::model::LlavaModel::load(&dir, Default::default()).unwrap();
    let prompts: Vec<_> = [("photo", "What is in the image?"), ("tile", "Describe it."), ("tall", "Which colours?")]
        .iter()
        .map(|(name, text)| {
            let img = image::open(next_fixtures().join(format!("{name}.png"))).unwrap();
            let content = vec![ContentPart::Image, ContentPart::Text(text.to_string())];
            model.prepare(&[ChatMessage { role: "user".into(), content }], &[img]).unwrap()
        })
        .collect();
    let counts: Vec<usize> = prompts.iter().map(|p| p.visual_tokens()).collect();
    assert_eq!(counts, [70, 36, 28]);
    let opts = CalibrateOptions { budgets: vec![0.3], ..Default::default() };
    let result = calibrate(&model, &prompts, &opts, &mut Silent).unwrap();
    // (70 + 36 + 28) / 3 = 44.67 -> 45.
    assert_eq!(result.visual_tokens, 45);
    let fitted = &result.budgets[0];
    assert!(fitted.alpha.is_some(), "{fitted:?}");
    assert_eq!(fitted.deletions.len(), 4);
    assert!(fitted.deletions.iter().sum::<usize>() <= 45 && fitted.achieved_reduction > 0.0, "{fitted:?}");
}
