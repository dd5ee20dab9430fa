//! Where a model comes from: a local directory, a hub id (through hf-hub's cache), or the
//! built-in demo model (random weights, generated once into the cache directory).

use std::path::{Path, PathBuf};

use super::demo::{write_demo_model, DemoOptions};
use super::hr_config::is_hr_config;
use super::weights::read;
use super::{ModelError, Result};

/// Files a llava-hf model directory may hold; the first group is required.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json", "preprocessor_config.json"];
/// Files an LLaVA-HR repository may hold besides [`OPTIONAL`].
const HR_OPTIONAL: &[&str] = &["tokenizer.json", "tokenizer.model"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A resolved model location.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Directory holding config.json, tokenizer and weights.
    pub dir: PathBuf,
    /// Whether this is the built-in random-weight demo model.
    pub is_demo: bool,
    /// The name to announce (hub id, directory, or `fitprune-demo`).
    pub name: String,
}

/// Resolves `--model`: `None` is the demo model; an existing path is used as is; anything else
/// is a hub id looked up in hf-hub's cache first and downloaded only if missing.
pub fn resolve(model: Option<&str>) -> Result<ModelSource> {
    match model {
        None => {
            let dir = demo_model_dir()?;
            Ok(ModelSource { dir, is_demo: true, name: "fitprune-demo".into() })
        }
        Some(m) if Path::new(m).exists() => {
            Ok(ModelSource { dir: PathBuf::from(m), is_demo: false, name: m.to_string() })
        }
        Some(id) if id.split('/').count() == 2 && !id.starts_with('.') => {
            Ok(ModelSource { dir: from_hub(id)?, is_demo: false, name: id.to_string() })
        }
        Some(m) => Err(ModelError::MissingFile { path: PathBuf::from(m), what: "not a directory nor a hub id".into() }),
    }
}

/// The cache directory: `$FITPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/fitprune`, else `~/.cache/fitprune`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FITPRUNE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("fitprune");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("fitprune")
}

/// The built-in demo model (tiny preset, seed 0), written on first use.
pub fn demo_model_dir() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("demo-tiny-seed0-v{}", env!("CARGO_PKG_VERSION")));
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    // Write into a sibling and rename, so a crash never leaves a half-written model behind.
    let parent = cache_dir();
    std::fs::create_dir_all(&parent).map_err(|source| ModelError::Io { path: parent.clone(), source })?;
    // Unique per writer (process, thread and a counter), so concurrent first uses never share it.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tmp = parent.join(format!(".demo-{}-{n}", std::process::id()));
    write_demo_model(&tmp, &DemoOptions::default())?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another writer won the race: use its copy.
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(source) => Err(ModelError::Io { path: dir, source }),
    }
}

fn from_hub(id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(id.to_string());
    // A model whose config is cached is used from the cache alone (optional files that were never
    // downloaded stay absent); the hub is asked only for a model not cached yet, and never with
    // HF_HUB_OFFLINE=1.
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let online = !offline && cached.get("config.json").is_none();
    let api =
        hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).build().map_err(|e| ModelError::Hub(e.to_string()));
    let get = |file: &str, required: bool| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        let missing = || ModelError::Hub(format!("{id}/{file} is not in the hub cache and the hub is not consulted"));
        if !online {
            return if required { Err(missing()) } else { Ok(None) };
        }
        let api = match &api {
            Ok(api) => api,
            Err(e) if required => return Err(ModelError::Hub(format!("{id}/{file}: {e}"))),
            Err(_) => return Ok(None),
        };
        match api.model(id.to_string()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(e) if required => Err(ModelError::Hub(format!("{id}/{file}: {e}"))),
            Err(_) => Ok(None),
        }
    };
    let config = get("config.json", true)?.ok_or_else(|| ModelError::Hub(format!("{id}: no config.json")))?;
    let value: serde_json::Value = serde_json::from_str(&read(&config)?).map_err(|e| ModelError::Config {
        file: config.display().to_string(),
        field: "(document)".into(),
        message: e.to_string(),
    })?;
    // LLaVA-HR repositories (original-LLaVA layout) ship no processor files and `.bin` shards.
    let hr = is_hr_config(&value);
    for f in REQUIRED.iter().filter(|_| !hr) {
        get(f, true)?;
    }
    for f in OPTIONAL.iter().chain(if hr { HR_OPTIONAL } else { &[] }) {
        get(f, false)?;
    }
    if let Some(index) = get("model.safetensors.index.json", false)? {
        for shard in index_shards(&index)? {
            get(&shard, true)?;
        }
    } else if hr {
        if let Some(index) = get("pytorch_model.bin.index.json", false)? {
            for shard in index_shards(&index)? {
                get(&shard, true)?;
            }
        } else if get("pytorch_model.bin", false)?.is_none() {
            get("model.safetensors", true)?;
        }
    } else {
        get("model.safetensors", true)?;
    }
    if let Some(tower) = value.get("mm_vision_tower").and_then(|t| t.as_str()).filter(|_| hr) {
        // The CLIP config `mm_vision_tower` names, resolved later through the same cache.
        let clip = cache.model(tower.to_string());
        if clip.get("config.json").is_none() && online {
            if let Ok(api) = &api {
                api.model(tower.to_string())
                    .get("config.json")
                    .map_err(|e| ModelError::Hub(format!("{tower}/config.json: {e}")))?;
            }
        }
    }
    // hf-hub places every file of one revision in the same snapshot directory.
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::Hub(format!("{id}: cached config.json has no parent directory")))
}

/// The shard files a `*.index.json` names in its `weight_map`.
fn index_shards(index: &Path) -> Result<std::collections::BTreeSet<String>> {
    let json: serde_json::Value = serde_json::from_str(&read(index)?).map_err(|e| ModelError::Config {
        file: index.display().to_string(),
        field: "(document)".into(),
        message: e.to_string(),
    })?;
    Ok(json["weight_map"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}
