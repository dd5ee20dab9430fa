//! LLaVA-HR checkpoint loading: the published `.bin` layout and its safetensors conversion give
//! the same outputs; a missing or an unexpected tensor fails loudly, naming it; `demo-model
//! --family hr` writes a loadable, deterministic HR checkpoint.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use fitprune::model::demo::{write_demo_model, DemoFamily, DemoOptions};
use fitprune::model::llama::NoHook;
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::model::LlavaModel;

use common::{copy_dir, hr_fixtures, hr_model_dir};

fn first_logits(model: &LlavaModel) -> Vec<f32> {
    let img =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(90, 60, |x, y| image::Rgb([x as u8, y as u8, 7])));
    let msg = ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text("Hi".into())] };
    let prompt = model.prepare(&[msg], &[img]).unwrap();
    model.prefill(&prompt, &mut model.new_cache(), &mut NoHook).unwrap().logits.to_vec1().unwrap()
}

/// The committed checkpoint's tensors, read from its pickle shards.
fn fixture_tensors() -> HashMap<String, Tensor> {
    let dir = hr_fixtures().join("model");
    let mut all = HashMap::new();
    for shard in ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"] {
        all.extend(candle_core::pickle::read_all(dir.join(shard)).unwrap());
    }
    all
}

/// The fixture directory with `tensors` as one model.safetensors instead of the pickles.
fn as_safetensors(root: &Path, name: &str, tensors: HashMap<String, Tensor>) -> std::path::PathBuf {
    let dir = root.join(name);
    copy_dir(&hr_fixtures().join("model"), &dir);
    for f in ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match LlavaModel::load(dir, Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn pickle_shards_and_safetensors_load_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = LlavaModel::load(&hr_model_dir(tmp.path(), 128), Default::default()).unwrap();
    let st = LlavaModel::load(&as_safetensors(tmp.path(), "st", fixture_tensors()), Default::default()).unwrap();
    assert_eq!(first_logits(&bin), first_logits(&st));
    assert_eq!(bin.image_token_count(90, 60).unwrap(), 16);
}

#[test]
fn a_missing_tensor_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    // The ConvNeXt layer scale (a block's bare `weight`), the one easiest to skip silently.
    let scale = "model.vision_tower.slow_vision_tower.vision_tower.stages.2.blocks.1.weight";
    for name in [scale, "model.vision_tower.align_stages_latent.2.gate.2.bias", "model.mm_projector.2.weight"] {
        let mut tensors = fixture_tensors();
        assert!(tensors.remove(name).is_some(), "{name} is in the checkpoint");
        let e = load_err(&as_safetensors(tmp.path(), &name.replace('.', "_"), tensors));
        assert!(e.contains(name), "{e}");
    }
}

#[test]
fn an_unexpected_tensor_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        // A stray tensor inside a block, a second merge module, a fifth decoder layer.
        "model.vision_tower.slow_vision_tower.vision_tower.stages.3.blocks.0.gamma",
        "model.vision_tower.align_stages.1.fast_proj.weight",
        "model.layers.4.mlp.up_proj.weight",
    ];
    for name in extra {
        let mut tensors = fixture_tensors();
        tensors.insert(name.to_string(), Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
        let e = load_err(&as_safetensors(tmp.path(), &name.replace('.', "_"), tensors));
        assert!(e.contains("unexpected") && e.contains(name), "{e}");
    }
    // The tensors the reference never runs (timm's classifier head, CLIP's post_layernorm) are
    // in the fixture and load: the audit knows them by name, not by ignoring whole prefixes.
    let tensors = fixture_tensors();
    assert!(tensors.keys().any(|k| k.contains("slow_vision_tower.vision_tower.head.fc.weight")));
    assert!(tensors.keys().any(|k| k.contains("post_layernorm.weight")));
}

#[test]
fn demo_model_writes_a_deterministic_loadable_hr_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let opts = DemoOptions { family: DemoFamily::Hr, ..Default::default() };
    let summary = write_demo_model(&a, &opts).unwrap();
    write_demo_model(&b, &opts).unwrap();
    for f in ["model.safetensors", "config.json", "clip-demo/config.json", "tokenizer.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["is_multipath_encoder"].as_bool(), config["model_type"].as_str()), (Some(true), Some("llava")));
    let model = LlavaModel::load(&a, Default::default()).unwrap();
    assert_eq!(model.config().model_type, fitprune::model::config::ModelType::LlavaHr);
    assert_eq!(model.image_token_count(300, 200).unwrap(), summary.image_tokens);
    assert_eq!(summary.image_tokens, 64);
    let logits = first_logits(&model);
    assert!(logits.iter().all(|v| v.is_finite()));
    // The image reaches the answer: another picture changes the first-step logits.
    let other = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(90, 60, |x, _| image::Rgb([200, x as u8, 0])));
    let msg = ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text("Hi".into())] };
    let prompt = model.prepare(&[msg], &[other]).unwrap();
    let moved: Vec<f32> =
        model.prefill(&prompt, &mut model.new_cache(), &mut NoHook).unwrap().logits.to_vec1().unwrap();
    assert_ne!(logits, moved);
}

#[test]
fn pickle_checkpoints_have_a_fingerprint() {
    // Recipes are keyed by it: a `.bin`-only directory must get one, distinct per config.
    let tmp = tempfile::tempdir().unwrap();
    let fp = |dir: &Path| fitprune::model::fingerprint::fingerprint(dir).unwrap();
    let (a, b) = (hr_model_dir(tmp.path(), 128), hr_model_dir(tmp.path(), 256));
    assert_eq!(fp(&a).len(), 32);
    assert_eq!(fp(&a), fp(&a));
    assert_ne!(fp(&a), fp(&b), "input_image_size is part of the model");
}
