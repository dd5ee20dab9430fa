//! LLaVA-HR checkpoint files: `pytorch_model-*.bin` pickles (with or without
//! `pytorch_model.bin.index.json`, read with candle's pickle support) or safetensors, behind a
//! [`VarBuilder`] that records every tensor the model reads, so a checkpoint tensor that nothing
//! reads is an error instead of silently ignored weights.
//!
//! The published checkpoint also holds tensors the reference forward never runs: the ConvNeXt
//! classifier head (`slow_vision_tower.vision_tower.head.*`, timm's model keeps it), CLIP's
//! `post_layernorm` (the wrapper takes the last encoder layer's output) and, from older
//! transformers, CLIP's `position_ids` buffer. Those, and only those, may stay unread.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::weights::{read, safetensors_files};
use super::{ModelError, Result};

/// Checkpoint tensors that are present but that the reference forward never reads.
const UNREAD: &[&str] = &[
    "model.vision_tower.slow_vision_tower.vision_tower.head.",
    "model.vision_tower.fast_vision_tower.vision_tower.vision_model.post_layernorm.",
    "model.vision_tower.fast_vision_tower.vision_tower.vision_model.embeddings.position_ids",
];

/// All tensors of a checkpoint, with the names read so far.
struct Tracked {
    tensors: HashMap<String, Tensor>,
    read: Arc<Mutex<HashSet<String>>>,
}

impl Tracked {
    fn mark(&self, name: &str) {
        // A poisoned lock only means another load panicked; the set itself is still usable.
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        read.insert(name.to_string());
    }

    fn find(&self, name: &str) -> candle_core::Result<Tensor> {
        self.tensors.get(name).cloned().ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })
    }
}

impl SimpleBackend for Tracked {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.find(name)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        self.mark(name);
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.find(name)?;
        self.mark(name);
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// An opened HR checkpoint: a [`VarBuilder`] over its tensors and the audit of what was read.
pub(super) struct HrWeights {
    vb: VarBuilder<'static>,
    names: BTreeSet<String>,
    read: Arc<Mutex<HashSet<String>>>,
    dir: PathBuf,
}

impl HrWeights {
    /// Reads every tensor of the checkpoint in `dir` (pickle shards first, else safetensors).
    pub(super) fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        let pickles = pickle_files(dir)?;
        let loaded: Vec<(String, Tensor)> = if pickles.is_empty() {
            let mut all = Vec::new();
            for file in safetensors_files(dir)? {
                let map = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| bad(&file, e))?;
                all.extend(map);
            }
            all
        } else {
            let mut all = Vec::new();
            for file in &pickles {
                all.extend(candle_core::pickle::read_all(file).map_err(|e| bad(file, e))?);
            }
            all
        };
        for (name, t) in loaded {
            if tensors.insert(name.clone(), t).is_some() {
                return Err(ModelError::Weights(format!("{}: tensor `{name}` appears in two shards", dir.display())));
            }
        }
        let names = tensors.keys().cloned().collect();
        let read = Arc::new(Mutex::new(HashSet::new()));
        let backend = Tracked { tensors, read: read.clone() };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Ok(Self { vb, names, read, dir: dir.to_path_buf() })
    }

    /// The builder the model loads from (checkpoint names from the root).
    pub(super) fn vb(&self) -> &VarBuilder<'static> {
        &self.vb
    }

    /// Fails naming every checkpoint tensor that no module read (the known unread ones aside).
    pub(super) fn check_all_read(&self) -> Result<()> {
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let unread: Vec<&str> = self
            .names
            .iter()
            .filter(|n| !read.contains(*n) && !UNREAD.iter().any(|u| n.starts_with(u)))
            .map(String::as_str)
            .collect();
        if unread.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unread.iter().take(8).copied().collect();
        Err(ModelError::Weights(format!(
            "{}: {} unexpected tensor(s) that the LLaVA-HR model does not use: {}{}",
            self.dir.display(),
            unread.len(),
            shown.join(", "),
            if unread.len() > shown.len() { ", ..." } else { "" }
        )))
    }
}

fn bad(file: &Path, e: candle_core::Error) -> ModelError {
    ModelError::Weights(format!("{}: {e}", file.display()))
}

/// The pickle files of a directory: the shards `pytorch_model.bin.index.json` names, or a single
/// `pytorch_model.bin`; empty when there are none.
pub(super) fn pickle_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("pytorch_model.bin.index.json");
    if index.exists() {
        let json: serde_json::Value = serde_json::from_str(&read(&index)?).map_err(|e| ModelError::Config {
            file: index.display().to_string(),
            field: "(document)".into(),
            message: e.to_string(),
        })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
            file: index.display().to_string(),
            field: "weight_map".into(),
            message: "missing or not an object".into(),
        })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        if let Some(f) = files.iter().find(|f| !f.exists()) {
            return Err(ModelError::MissingFile { path: f.clone(), what: "shard named in the weight_map".into() });
        }
        return Ok(files);
    }
    let single = dir.join("pytorch_model.bin");
    Ok(if single.exists() { vec![single] } else { Vec::new() })
}
