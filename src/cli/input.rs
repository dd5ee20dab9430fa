//! Shared CLI input parsing: devices, dtypes, images from files or URLs.

use std::io::Read;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use image::DynamicImage;

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n)?,
            _ => bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
        },
    })
}

/// `f32`, `f16` or `bf16`; half precision only on CUDA (candle's CPU kernels are f32-first).
pub fn parse_dtype(s: &str, device: &Device) -> anyhow::Result<DType> {
    let dtype = match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype {other:?}: use f32, f16 or bf16"),
    };
    if device.is_cpu() && dtype != DType::F32 {
        bail!("--dtype {s} needs a CUDA device; the CPU backend runs f32");
    }
    Ok(dtype)
}

/// Reads an image from a local path or an http(s) URL (at most 32 MiB, 40 megapixels).
pub fn load_image(src: &str) -> anyhow::Result<DynamicImage> {
    let bytes = if src.starts_with("http://") || src.starts_with("https://") {
        let resp = ureq::get(src)
            .timeout(std::time::Duration::from_secs(30))
            .call()
            .with_context(|| format!("fetching {src}"))?;
        let mut buf = Vec::new();
        resp.into_reader().take(32 << 20).read_to_end(&mut buf).with_context(|| format!("reading {src}"))?;
        buf
    } else {
        std::fs::read(src).with_context(|| format!("reading {src}"))?
    };
    // The server's decoder: format check and the default pixel limit, read from the header
    // before anything is allocated, so a tiny file declaring a huge canvas is refused.
    crate::validation::images::decode(&bytes, src, &crate::validation::ImageLimits::default())
        .map_err(|e| anyhow::anyhow!("{src}: {e}"))
}
