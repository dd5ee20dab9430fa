//! Helpers shared by the integration tests: fixture paths and demo checkpoints.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fitprune::model::config::FeatureSelect;
use fitprune::model::demo::{write_demo_model, DemoBackbone, DemoFamily, DemoOptions};
use fitprune::model::llava::LoadOptions;
use fitprune::model::LlavaModel;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `demo-model` flags as the reference scripts record them.
#[derive(Debug, Clone, Deserialize)]
pub struct DemoSpec {
    pub seed: u64,
    pub kv_heads: Option<usize>,
    pub select_strategy: Option<String>,
    /// `--backbone mistral` (NeXT fixtures).
    pub backbone: Option<String>,
    pub sliding_window: Option<usize>,
}

/// Writes (once per `root`) and loads the NeXT demo checkpoint `spec`, checking its weights.
pub fn next_demo_model(root: &Path, spec: &DemoSpec, sha256: &str) -> (PathBuf, LlavaModel) {
    let dir = root.join(format!("next-seed{}-{:?}-{:?}", spec.seed, spec.backbone, spec.sliding_window));
    if !dir.exists() {
        let opts = DemoOptions {
            family: DemoFamily::Next,
            backbone: match spec.backbone.as_deref() {
                Some("mistral") => DemoBackbone::Mistral,
                _ => DemoBackbone::Llama,
            },
            sliding_window: spec.sliding_window,
            seed: spec.seed,
            ..Default::default()
        };
        write_demo_model(&dir, &opts).unwrap();
    }
    check_weights(&dir, sha256);
    let model = LlavaModel::load(&dir, LoadOptions::default()).unwrap();
    (dir, model)
}

fn check_weights(dir: &Path, sha256: &str) {
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let digest: String = Sha256::digest(&weights).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, sha256, "demo-model output changed; regenerate fixtures with tests/reference/*.py");
}

/// tests/fixtures/parity_next.
pub fn next_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_next")
}

/// tests/fixtures/parity.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

/// A parity input image by name.
pub fn fixture_image(name: &str) -> image::DynamicImage {
    image::open(fixtures().join(format!("{name}.png"))).unwrap()
}

/// Writes (once per `root`) and loads the demo checkpoint `spec`, checking its weights are the
/// ones the reference script saw.
pub fn demo_model(root: &Path, spec: &DemoSpec, sha256: &str) -> (PathBuf, LlavaModel) {
    let dir = root.join(format!("seed{}-kv{:?}-{:?}", spec.seed, spec.kv_heads, spec.select_strategy));
    if !dir.exists() {
        let opts = DemoOptions {
            seed: spec.seed,
            kv_heads: spec.kv_heads,
            select: match spec.select_strategy.as_deref() {
                Some("full") => FeatureSelect::Full,
                _ => FeatureSelect::Default,
            },
            ..Default::default()
        };
        write_demo_model(&dir, &opts).unwrap();
    }
    check_weights(&dir, sha256);
    let model = LlavaModel::load(&dir, LoadOptions::default()).unwrap();
    (dir, model)
}

/// A tiny PNG whose header declares `w` x `h` pixels (a decompression bomb): a 1x1 image with
/// IHDR's width, height and CRC patched.
pub fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::GrayImage::new(1, 1).write_to(&mut png, image::ImageFormat::Png).unwrap();
    let mut bomb = png.into_inner();
    bomb[16..20].copy_from_slice(&w.to_be_bytes());
    bomb[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    bomb
}

/// tests/fixtures/parity_hr.
pub fn hr_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_hr")
}

/// A copy (once per `root`) of the committed tiny LLaVA-HR checkpoint with `input_image_size`
/// set to `size`, as `tests/reference/hr_reference.py` ran it.
pub fn hr_model_dir(root: &Path, size: usize) -> PathBuf {
    let dir = root.join(format!("hr-{size}"));
    if !dir.exists() {
        copy_dir(&hr_fixtures().join("model"), &dir);
        let path = dir.join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["input_image_size"] = serde_json::json!(size);
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }
    dir
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
