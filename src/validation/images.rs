//! Image inputs: `data:` URLs and http(s) URLs, with limits on bytes, pixels, time and redirects.
//!
//! The pixel count is read from the image header before anything is decoded, so a
//! decompression bomb (a small file declaring a huge canvas) is refused without allocating.
//! http(s) URLs resolving to private, loopback or link-local addresses are refused unless
//! allowed; the check runs in the DNS resolver (so a hostname cannot rebind to a private address
//! after the check) and on every redirect.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
use base64::Engine as _;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::ValidationError;
use crate::protocol::ErrorCode;

pub use super::decode::{decode, inspect, DecodeBudget, Header};

/// Limits on image inputs.
#[derive(Debug, Clone)]
pub struct ImageLimits {
    /// Images per request.
    pub max_images: usize,
    /// Encoded bytes per image.
    pub max_bytes: usize,
    /// Width × height per image.
    pub max_pixels: u64,
    /// Whole fetch of one URL, body included.
    pub fetch_timeout: Duration,
    /// Redirects followed per URL.
    pub max_redirects: usize,
    /// Allow URLs that resolve to private/loopback/link-local addresses.
    pub allow_private: bool,
    /// Images are padded to a square before resizing (`--pad-to-square`): the square, not the
    /// image, counts against `max_pixels`, so a 20000x1 strip cannot become a 20000² canvas.
    pub pad_to_square: bool,
    /// Decoded image bytes all chat requests together may hold while decoding (a
    /// [`DecodeBudget`]); a request waits until its images fit.
    pub max_decoded_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_images: 8,
            max_bytes: 16 << 20,
            max_pixels: 40_000_000,
            fetch_timeout: Duration::from_secs(10),
            max_redirects: 3,
            allow_private: false,
            pad_to_square: false,
            max_decoded_bytes: 2 << 30,
        }
    }
}

/// An image part, checked for syntax but not yet fetched or decoded.
#[derive(Debug, Clone)]
pub struct ImageRef {
    /// Its field path, for errors.
    pub param: String,
    /// Where the bytes are.
    pub source: ImageSource,
}

impl ImageRef {
    /// The content part the image is (`messages[i].content[j]`), for errors about the image as a
    /// whole rather than its URL.
    pub fn part(&self) -> &str {
        self.param.strip_suffix(".image_url.url").unwrap_or(&self.param)
    }
}

/// Inline bytes or a URL to fetch.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// Decoded from a `data:` URL.
    Data(Vec<u8>),
    /// An http(s) URL.
    Url(Url),
}

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Parses an `image_url.url`: a base64 `data:` URL (decoded now, size checked before decoding)
/// or an http(s) URL (literal private addresses refused now, hostnames when resolved).
pub fn parse_url(url: &str, param: String, limits: &ImageLimits) -> Result<ImageRef, ValidationError> {
    let invalid = |code, message: String| ValidationError::invalid(param.clone(), code, message);
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err(invalid(ErrorCode::InvalidImageUrl, "a data URL needs a comma before its payload".into()));
        };
        if !meta.ends_with(";base64") {
            return Err(invalid(
                ErrorCode::InvalidImageUrl,
                "only base64 data URLs are supported (data:image/png;base64,...)".into(),
            ));
        }
        let payload = payload.trim();
        // 4 base64 characters carry 3 bytes: refuse before allocating the decoded buffer.
        if payload.len() / 4 * 3 > limits.max_bytes + 3 {
            return Err(too_large(&param, limits.max_bytes));
        }
        let bytes = BASE64
            .decode(payload)
            .map_err(|e| invalid(ErrorCode::InvalidImageUrl, format!("invalid base64 in data URL: {e}")))?;
        if bytes.len() > limits.max_bytes {
            return Err(too_large(&param, limits.max_bytes));
        }
        return Ok(ImageRef { param, source: ImageSource::Data(bytes) });
    }
    let parsed = Url::parse(url).map_err(|e| invalid(ErrorCode::InvalidImageUrl, format!("not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            ErrorCode::InvalidImageUrl,
            format!("unsupported URL scheme `{}`: use data:, http or https", parsed.scheme()),
        ));
    }
    if !limits.allow_private {
        if let Some(ip) = literal_ip(&parsed) {
            if !is_public(ip) {
                return Err(invalid(
                    ErrorCode::ImageUrlPrivate,
                    format!("image URL host {ip} is a private, loopback or link-local address"),
                ));
            }
        }
    }
    Ok(ImageRef { param, source: ImageSource::Url(parsed) })
}

fn too_large(param: &str, max: usize) -> ValidationError {
    ValidationError::invalid(param, ErrorCode::ImageTooLarge, format!("the image is larger than {max} bytes"))
}

/// Fetches http(s) images with the limits applied.
#[derive(Debug, Clone)]
pub struct ImageFetcher {
    client: reqwest::Client,
    limits: ImageLimits,
    budget: DecodeBudget,
}

/// Why a fetch was refused before or during connecting (found in reqwest's error chain).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0} resolves only to private, loopback or link-local addresses")]
    Private(String),
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("redirect to a non-http(s) URL")]
    BadScheme,
}

impl ImageFetcher {
    /// A client with the timeout, redirect and address policies of `limits`.
    pub fn new(limits: ImageLimits) -> Result<Self, reqwest::Error> {
        let (max, allow_private) = (limits.max_redirects, limits.allow_private);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max {
                return attempt.error(Refusal::TooManyRedirects(max));
            }
            if !matches!(attempt.url().scheme(), "http" | "https") {
                return attempt.error(Refusal::BadScheme);
            }
            match literal_ip(attempt.url()) {
                Some(ip) if !allow_private && !is_public(ip) => attempt.error(Refusal::Private(ip.to_string())),
                _ => attempt.follow(),
            }
        });
        let client = reqwest::Client::builder()
            .timeout(limits.fetch_timeout)
            .redirect(policy)
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .user_agent(concat!("fitprune/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let budget = DecodeBudget::new(limits.max_decoded_bytes);
        Ok(Self { client, limits, budget })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ImageLimits {
        &self.limits
    }

    /// The server-wide decoded-image budget (shared by every clone of this fetcher).
    pub fn decode_budget(&self) -> &DecodeBudget {
        &self.budget
    }

    /// The bytes of every image, in order (URLs fetched concurrently).
    pub async fn fetch_all(&self, refs: &[ImageRef]) -> Result<Vec<Vec<u8>>, ValidationError> {
        futures::future::try_join_all(refs.iter().map(|r| async move {
            match &r.source {
                ImageSource::Data(bytes) => Ok(bytes.clone()),
                ImageSource::Url(url) => self.fetch(url, &r.param).await,
            }
        }))
        .await
    }

    async fn fetch(&self, url: &Url, param: &str) -> Result<Vec<u8>, ValidationError> {
        let max = self.limits.max_bytes;
        let failed = |e: reqwest::Error| fetch_error(e, param, url, self.limits.fetch_timeout);
        let mut resp = self.client.get(url.clone()).send().await.map_err(failed)?;
        if !resp.status().is_success() {
            return Err(ValidationError::invalid(
                param,
                ErrorCode::ImageFetchFailed,
                format!("fetching {url} returned HTTP {}", resp.status().as_u16()),
            ));
        }
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large(param, max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > max {
                return Err(too_large(param, max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A reqwest error as a 400 that says what happened.
fn fetch_error(e: reqwest::Error, param: &str, url: &Url, timeout: Duration) -> ValidationError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            let code =
                if matches!(r, Refusal::Private(_)) { ErrorCode::ImageUrlPrivate } else { ErrorCode::ImageFetchFailed };
            return ValidationError::invalid(param, code, format!("fetching {url}: {r}"));
        }
        source = err.source();
    }
    let message = if e.is_timeout() {
        format!("fetching {url} took longer than {timeout:?}")
    } else {
        format!("fetching {url} failed: {e}")
    };
    ValidationError::invalid(param, ErrorCode::ImageFetchFailed, message)
}

/// Resolves hostnames and drops non-public addresses (unless allowed).
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| allow_private || is_public(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(Refusal::Private(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        Host::Domain(_) => None,
    }
}

/// Whether `ip` is a globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the embedded IPv4 address.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                return is_public(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            // ::/96 holds the unspecified, loopback and deprecated IPv4-compatible addresses.
            if seg[..6] == [0; 6] {
                return false;
            }
            let first = seg[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && seg[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_reserved_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::7f00:1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn data_urls_are_size_checked_before_decoding() {
        let limits = ImageLimits { max_bytes: 10, ..Default::default() };
        let small = format!("data:image/png;base64,{}", BASE64.encode([1u8; 9]));
        assert!(matches!(parse_url(&small, "p".into(), &limits).unwrap().source, ImageSource::Data(b) if b.len() == 9));
        let big = format!("data:image/png;base64,{}", BASE64.encode([1u8; 30]));
        let e = parse_url(&big, "p".into(), &limits).unwrap_err();
        assert!(matches!(e, ValidationError::Invalid { code: ErrorCode::ImageTooLarge, .. }), "{e:?}");
        let e = parse_url("data:image/png,abc", "p".into(), &limits).unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        let e = parse_url("ftp://x/y.png", "p".into(), &limits).unwrap_err();
        assert!(e.to_string().contains("scheme"), "{e}");
        let e = parse_url("http://127.0.0.1:9/a.png", "p".into(), &limits).unwrap_err();
        assert!(matches!(e, ValidationError::Invalid { code: ErrorCode::ImageUrlPrivate, .. }), "{e:?}");
    }
}
