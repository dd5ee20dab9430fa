//! Model fingerprints: which model a recipe was fitted for, without hashing gigabytes of weights.
//!
//! The fingerprint is SHA-256 over `config.json` and the JSON header of every safetensors file
//! (tensor names, dtypes, shapes and offsets). A re-saved or re-sharded copy with other weights
//! of the same shapes would collide; different architectures or sizes never do. Checkpoints in
//! PyTorch pickles (LLaVA-HR's `pytorch_model-*.bin`) have no cheap header: their shard names and
//! byte sizes stand in, with the index's `weight_map` when there is one.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::hr_weights::pickle_files;
use super::weights::{read, safetensors_files};
use super::{ModelError, Result};

/// Hex SHA-256 fingerprint of a model directory (first 16 bytes, 32 hex digits).
pub fn fingerprint(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(read(&dir.join("config.json"))?.as_bytes());
    let pickles = pickle_files(dir)?;
    if pickles.is_empty() {
        for file in safetensors_files(dir)? {
            h.update(safetensors_header(&file)?);
        }
    } else {
        let index = dir.join("pytorch_model.bin.index.json");
        if index.exists() {
            h.update(read(&index)?.as_bytes());
        }
        for file in pickles {
            let len = std::fs::metadata(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?.len();
            h.update(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
            h.update(len.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

fn safetensors_header(path: &Path) -> Result<Vec<u8>> {
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(ModelError::Weights(format!("{}: header of {n} bytes is implausible", path.display())));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    Ok(header)
}
