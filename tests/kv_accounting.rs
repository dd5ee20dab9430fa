//! The scheduler's KV accounting (`engine::kv`) is what sequences really allocate: for pruned
//! and unpruned prompts of several sizes, the caches a prefill creates occupy exactly the bytes
//! the engine charged at admission, and decoding to the end never reallocates them.

use fitprune::engine::sampling::SamplingParams;
use fitprune::engine::sequence::{decode_growth_for, GenerationParams, Sequence};
use fitprune::engine::LoadedModel;
use fitprune::model::demo::{write_demo_model, DemoOptions};
use fitprune::model::llama::{DecoderHook, NoHook};
use fitprune::model::llava::LoadOptions;
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::model::LlavaModel;
use fitprune::pruning::{PruneHook, Recipe};

fn image(w: u32, h: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 77])))
}

#[test]
fn prefill_allocates_exactly_the_admitted_kv_bytes_and_decode_stays_within_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    write_demo_model(&dir, &DemoOptions::default()).unwrap();
    let model = LlavaModel::load(&dir, LoadOptions::default()).unwrap();
    let loaded =
        LoadedModel::new(LlavaModel::load(&dir, LoadOptions::default()).unwrap(), "m".into(), true, "cpu".into())
            .unwrap();
    let info = &loaded.info;
    let recipe: Recipe = serde_json::from_str(r#"{"deletions": [40, 30, 10, 0], "visual_tokens": 144}"#).unwrap();
    let mut checked = 0;
    for images in [0usize, 1, 2] {
        let mut content: Vec<ContentPart> = (0..images).map(|_| ContentPart::Image).collect();
        content.push(ContentPart::Text("Describe it.".into()));
        let pixels: Vec<_> = (0..images).map(|i| image(40 + 10 * i as u32, 30)).collect();
        let prompt = model.prepare(&[ChatMessage { role: "user".into(), content }], &pixels).unwrap();
        let visual = prompt.visual_tokens();
        for pruned in [false, true] {
            for max_tokens in [1usize, 6] {
                let deletions = (pruned && visual > 0).then(|| recipe.deletions_for(visual));
                let params = GenerationParams {
                    sampling: SamplingParams { seed: Some(1), ..Default::default() },
                    max_tokens,
                    stop: Vec::new(),
                };
                let mut prune = deletions.clone().map(|d| PruneHook::new(d, &prompt));
                let hook: &mut dyn DecoderHook = match prune.as_mut() {
                    Some(h) => h,
                    None => &mut NoHook,
                };
                let mut seq = Sequence::prefill(&model, &prompt, &params, hook).unwrap();
                let tokens = prompt.input_ids.len();
                let growth = decode_growth_for(max_tokens, tokens, info.max_context);
                let demand = info.kv.demand(tokens, visual, deletions.as_deref(), growth);
                let allocated = seq.cache().allocated_bytes() as u64;
                assert_eq!(allocated, demand.bytes, "{images} images, pruned {pruned}, max_tokens {max_tokens}");
                assert_eq!(demand.tokens_saved > 0, deletions.is_some());
                while seq.step(&model).unwrap().is_some() {}
                assert_eq!(seq.cache().allocated_bytes() as u64, allocated, "decode reallocated");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12);
}
