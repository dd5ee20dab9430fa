//! Shared CLI input parsing: devices, dtypes, images from files or URLs.

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use image::DynamicImage;

use crate::validation::images::is_public;

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
///
/// URLs pass the server's address guard: hosts resolving to private, loopback or link-local
/// addresses are refused unless `allow_private` (`--allow-private-image-urls`, the server's
/// flag). The check runs in the resolver, so it covers every redirect hop and a hostname cannot
/// rebind between check and connect.
pub fn load_image(src: &str, allow_private: bool) -> anyhow::Result<DynamicImage> {
    let bytes = if src.starts_with("http://") || src.starts_with("https://") {
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(30))
            .redirects(3)
            .resolver(move |netloc: &str| guarded_resolve(netloc, allow_private))
            .build();
        let resp = agent.get(src).call().with_context(|| format!("fetching {src}"))?;
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

/// Resolves `host:port`, keeping only public addresses unless `allow_private`.
fn guarded_resolve(netloc: &str, allow_private: bool) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
    let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| allow_private || is_public(a.ip())).collect();
    if allowed.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{netloc} resolves only to private, loopback or link-local addresses \
                 (pass --allow-private-image-urls to allow them)"
            ),
        ));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        for netloc in ["127.0.0.1:80", "[::1]:443", "10.0.0.1:80", "169.254.169.254:80", "localhost:80"] {
            let e = guarded_resolve(netloc, false).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{netloc}");
            assert!(e.to_string().contains("--allow-private-image-urls"), "{e}");
        }
        assert_eq!(guarded_resolve("127.0.0.1:80", true).unwrap(), vec!["127.0.0.1:80".parse().unwrap()]);
        assert_eq!(guarded_resolve("8.8.8.8:80", false).unwrap(), vec!["8.8.8.8:80".parse().unwrap()]);
    }
}
