//! Checkpoint loading: both tensor layouts and sharded indexes give identical outputs, and broken
//! model directories fail with errors that name the file and field.

use std::path::Path;

use fitprune::model::demo::{write_demo_model, DemoOptions};
use fitprune::model::llama::NoHook;
use fitprune::model::llava::LoadOptions;
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::model::weights::TensorLayout;
use fitprune::model::LlavaModel;

fn first_logits(dir: &Path) -> Vec<f32> {
    let model = LlavaModel::load(dir, LoadOptions::default()).unwrap();
    let img =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(120, 90, |x, y| image::Rgb([x as u8, y as u8, 77])));
    let msg = ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text("Hi".into())] };
    let prompt = model.prepare(&[msg], &[img]).unwrap();
    let out = model.prefill(&prompt, &mut model.new_cache(), &mut NoHook).unwrap();
    out.logits.to_vec1().unwrap()
}

#[test]
fn nested_layout_and_shards_load_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let nested = tmp.path().join("nested");
    let sharded = tmp.path().join("sharded");
    write_demo_model(&hub, &DemoOptions::default()).unwrap();
    write_demo_model(&nested, &DemoOptions { layout: TensorLayout::Nested, ..Default::default() }).unwrap();
    write_demo_model(&sharded, &DemoOptions { shards: 3, ..Default::default() }).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(!sharded.join("model.safetensors").exists());

    let a = first_logits(&hub);
    assert_eq!(a, first_logits(&nested));
    assert_eq!(a, first_logits(&sharded));
    let m = LlavaModel::load(&nested, LoadOptions::default()).unwrap();
    assert_eq!(m.layout(), TensorLayout::Nested);
}

#[test]
fn demo_model_is_deterministic_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    write_demo_model(&a, &DemoOptions::default()).unwrap();
    write_demo_model(&b, &DemoOptions::default()).unwrap();
    write_demo_model(&c, &DemoOptions { seed: 9, ..Default::default() }).unwrap();
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    assert_ne!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(c.join("model.safetensors")).unwrap()
    );
}

fn load_err(dir: &Path) -> String {
    match LlavaModel::load(dir, LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_directories_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_demo_model(&dir, &DemoOptions::default()).unwrap();

    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("\"hidden_act\": \"silu\"", "\"hidden_act\": 7")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("text_config.hidden_act"), "{e}");
    std::fs::write(dir.join("config.json"), &cfg).unwrap();

    let pre = std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap();
    std::fs::write(dir.join("preprocessor_config.json"), pre.replace("\"resample\": 3", "\"resample\": \"x\""))
        .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("resample"), "{e}");
    std::fs::write(dir.join("preprocessor_config.json"), &pre).unwrap();

    std::fs::rename(dir.join("tokenizer.json"), dir.join("t.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::rename(dir.join("t.json"), dir.join("tokenizer.json")).unwrap();

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn a_checkpoint_missing_a_tensor_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_demo_model(&dir, &DemoOptions::default()).unwrap();
    // Rewrite the weights without one projector tensor.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "multi_modal_projector.linear_2.weight").collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("multi_modal_projector.linear_2.weight"), "{e}");
}

#[test]
fn a_hub_id_resolves_offline_from_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    // The layout hf-hub (and huggingface_hub) use: hub/models--org--name/{refs/main,snapshots/REV/*}.
    let repo = tmp.path().join("hub").join("models--acme--tiny-llava");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(rev);
    write_demo_model(&snapshot, &DemoOptions::default()).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), rev).unwrap();
    // Only this test reads HF_HOME; other tests in this binary never touch the hub.
    std::env::set_var("HF_HOME", tmp.path());
    let src = fitprune::model::source::resolve(Some("acme/tiny-llava")).unwrap();
    assert_eq!(src.dir, snapshot);
    assert!(!src.is_demo);
    assert_eq!(src.name, "acme/tiny-llava");
    let model = LlavaModel::load(&src.dir, LoadOptions::default()).unwrap();
    assert_eq!(model.config().image_feature_count(), 144);
    // A hub id that is not cached is an error naming it, with HF_HUB_OFFLINE=1 (no network).
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = fitprune::model::source::resolve(Some("acme/not-cached")).unwrap_err().to_string();
    assert!(err.contains("acme/not-cached/config.json"), "{err}");
}
