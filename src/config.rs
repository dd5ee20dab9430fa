//! Typed server settings: `fitprune serve` flags (each also a `FITPRUNE_*` environment
//! variable), validated once into a [`ServerConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};

use crate::engine::fidelity::FidelityConfig;
use crate::engine::EngineConfig;
use crate::validation::data_root::DataRoot;
use crate::validation::ImageLimits;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `fitprune serve`.
#[derive(Debug, Clone, Parser)]
#[command(name = "serve")]
pub struct ServeArgs {
    /// Model directory or hub id; omitted = the built-in demo model (random weights).
    #[arg(long, env = "FITPRUNE_MODEL")]
    pub model: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "FITPRUNE_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "FITPRUNE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// f32 (CPU), f16 or bf16 (CUDA).
    #[arg(long, env = "FITPRUNE_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Pad images to a square with the mean colour before resizing (original LLaVA).
    #[arg(long, env = "FITPRUNE_PAD_TO_SQUARE")]
    pub pad_to_square: bool,
    /// The model name clients send and see (default: the --model value, or `fitprune-demo`).
    #[arg(long, env = "FITPRUNE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Requests allowed to wait for a running slot; more get 429.
    #[arg(long, env = "FITPRUNE_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: usize,
    /// Most sequences running at once; all of them advance one token per engine step in one
    /// batched decode pass.
    #[arg(long, env = "FITPRUNE_MAX_RUNNING", default_value_t = 8)]
    pub max_running: usize,
    /// Waiting requests prefilled in one batched pass while their prompt tokens (images
    /// included, summed) stay within this many; 1 prefills one request at a time.
    #[arg(long, env = "FITPRUNE_MAX_BATCH_PREFILL_TOKENS", default_value_t = 4096)]
    pub max_batch_prefill_tokens: usize,
    /// MiB of KV cache all running sequences may hold (default: 2048 on a CPU, 70% of the
    /// device memory free after loading on CUDA). A request starts only when what it will hold
    /// fits: its pruned per-layer prompt rows plus max_tokens, so pruned requests cost less.
    #[arg(long, env = "FITPRUNE_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<u64>,
    /// Fraction of pruned chat requests whose prompt the engine re-runs unpruned when idle, to
    /// measure the recipe's KL and top-1 agreement (`fitprune_fidelity_*` metrics); 0 = off.
    #[arg(long, env = "FITPRUNE_FIDELITY_SAMPLE_RATE", default_value_t = 0.0)]
    pub fidelity_sample_rate: f64,
    /// Fidelity probes that may wait for an idle engine; more are dropped and counted.
    #[arg(long, env = "FITPRUNE_FIDELITY_BACKLOG", default_value_t = 32)]
    pub fidelity_backlog: usize,
    /// Seconds a request may take, queue wait included.
    #[arg(long, env = "FITPRUNE_REQUEST_TIMEOUT", default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Largest request body in bytes.
    #[arg(long, env = "FITPRUNE_MAX_BODY_BYTES", default_value_t = 20 << 20)]
    pub max_body_bytes: usize,
    /// Largest encoded image in bytes.
    #[arg(long, env = "FITPRUNE_MAX_IMAGE_BYTES", default_value_t = 16 << 20)]
    pub max_image_bytes: usize,
    /// Most pixels (width × height) per image, checked before decoding.
    #[arg(long, env = "FITPRUNE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Most images per request.
    #[arg(long, env = "FITPRUNE_MAX_IMAGES", default_value_t = 8)]
    pub max_images: usize,
    /// Seconds allowed to fetch one image URL.
    #[arg(long, env = "FITPRUNE_IMAGE_FETCH_TIMEOUT", default_value_t = 10.0)]
    pub image_fetch_timeout: f64,
    /// Allow image URLs on private, loopback and link-local addresses.
    #[arg(long, env = "FITPRUNE_ALLOW_PRIVATE_IMAGE_URLS")]
    pub allow_private_image_urls: bool,
    /// MiB of decoded image pixels all requests together may hold while decoding; a request
    /// whose images do not fit waits until earlier ones are done with theirs.
    #[arg(long, env = "FITPRUNE_MAX_DECODED_IMAGE_MIB", default_value_t = 2048)]
    pub max_decoded_image_mib: u64,
    /// Folder `POST /admin/calibrate` may read datasets (and their images) from; without it,
    /// dataset input is refused and only inline samples are accepted.
    #[arg(long, env = "FITPRUNE_CALIBRATION_DATA_DIR")]
    pub calibration_data_dir: Option<PathBuf>,
    /// JSON file with pruning recipes (one object or a list) to serve `pruning` requests from.
    #[arg(long, env = "FITPRUNE_RECIPES")]
    pub recipes: Option<PathBuf>,
    /// Pruning budget for requests without a `pruning` field (default: unpruned).
    #[arg(long, env = "FITPRUNE_DEFAULT_BUDGET")]
    pub default_budget: Option<f64>,
    /// Budget for images sent with `detail: "low"` (requests without a `pruning` field).
    #[arg(long, env = "FITPRUNE_DETAIL_LOW_BUDGET", default_value_t = 0.7)]
    pub detail_low_budget: f64,
    /// SQLite database for recipes and calibration jobs (created if missing).
    #[arg(long, env = "FITPRUNE_DATABASE_URL", default_value = crate::store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Bearer token for /admin routes; without one the admin API answers 403.
    #[arg(long, env = "FITPRUNE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// MiB of hidden states a calibration job may memoise (least recently used dropped past it).
    #[arg(long, env = "FITPRUNE_CALIBRATION_CACHE_MIB", default_value_t = 4096)]
    pub calibration_cache_mib: usize,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "FITPRUNE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM before cancelling them.
    #[arg(long, env = "FITPRUNE_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Log format.
    #[arg(long, env = "FITPRUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    /// The flag at fault.
    pub flag: &'static str,
    /// Why.
    pub message: String,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `--model` (None = demo model).
    pub model: Option<String>,
    /// Listen address.
    pub addr: SocketAddr,
    /// Device and its label.
    pub device: Device,
    /// `--device` as given.
    pub device_label: String,
    /// Compute dtype.
    pub dtype: DType,
    /// Pad images to square.
    pub pad_to_square: bool,
    /// The name clients use.
    pub served_model_name: String,
    /// Queue and timeouts.
    pub engine: EngineConfig,
    /// Image limits.
    pub images: ImageLimits,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Recipes file.
    pub recipes: Option<PathBuf>,
    /// Budget when a request has no `pruning`.
    pub default_budget: Option<f64>,
    /// Budget for `detail: "low"` images.
    pub detail_low_budget: f64,
    /// SQLite database URL.
    pub database_url: String,
    /// Admin API token.
    pub admin_token: Option<String>,
    /// Calibration memo limit in bytes.
    pub calibration_cache_bytes: usize,
    /// The calibration data root, canonicalised.
    pub calibration_data_root: Option<DataRoot>,
    /// API key for /v1.
    pub api_key: Option<String>,
    /// Grace period on shutdown.
    pub shutdown_timeout: Duration,
}

fn seconds(flag: &'static str, s: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError { flag, message: format!("must be a positive number of seconds, got {s}") })
}

fn positive(flag: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(ConfigError { flag, message: "must be at least 1".into() });
    }
    Ok(n)
}

impl ServeArgs {
    /// Checks every setting and resolves the device.
    pub fn validate(self) -> Result<ServerConfig, ConfigError> {
        let device = crate::cli::parse_device(&self.device)
            .map_err(|e| ConfigError { flag: "device", message: e.to_string() })?;
        let dtype = crate::cli::parse_dtype(&self.dtype, &device)
            .map_err(|e| ConfigError { flag: "dtype", message: e.to_string() })?;
        if let Some(b) = self.default_budget {
            if !(0.0..1.0).contains(&b) {
                return Err(ConfigError { flag: "default-budget", message: format!("must be in [0, 1), got {b}") });
            }
        }
        if !(0.0..1.0).contains(&self.detail_low_budget) {
            return Err(ConfigError {
                flag: "detail-low-budget",
                message: format!("must be in [0, 1), got {}", self.detail_low_budget),
            });
        }
        if self.admin_token.as_deref() == Some("") {
            return Err(ConfigError { flag: "admin-token", message: "must not be empty".into() });
        }
        if self.api_key.as_deref() == Some("") {
            return Err(ConfigError { flag: "api-key", message: "must not be empty".into() });
        }
        let served_model_name = self
            .served_model_name
            .clone()
            .or_else(|| self.model.clone())
            .unwrap_or_else(|| "fitprune-demo".to_string());
        let images = ImageLimits {
            max_images: self.max_images,
            max_bytes: positive("max-image-bytes", self.max_image_bytes)?,
            max_pixels: self.max_image_pixels.max(1),
            fetch_timeout: seconds("image-fetch-timeout", self.image_fetch_timeout)?,
            max_redirects: 3,
            allow_private: self.allow_private_image_urls,
            pad_to_square: self.pad_to_square,
            max_decoded_bytes: self.max_decoded_image_mib.max(1).saturating_mul(1 << 20),
        };
        let calibration_data_root = match &self.calibration_data_dir {
            None => None,
            Some(dir) => Some(DataRoot::new(dir).map_err(|e| ConfigError {
                flag: "calibration-data-dir",
                message: format!("{}: {e} (it must be an existing folder)", dir.display()),
            })?),
        };
        Ok(ServerConfig {
            model: self.model,
            addr: self.addr,
            device,
            device_label: self.device,
            dtype,
            pad_to_square: self.pad_to_square,
            served_model_name,
            engine: EngineConfig {
                max_waiting: self.max_waiting,
                max_running: positive("max-running", self.max_running)?,
                request_timeout: seconds("request-timeout", self.request_timeout)?,
                max_batch_prefill_tokens: positive("max-batch-prefill-tokens", self.max_batch_prefill_tokens)?,
                kv_cache_bytes: match self.kv_cache_mib {
                    Some(0) => return Err(ConfigError { flag: "kv-cache-mib", message: "must be at least 1".into() }),
                    Some(mib) => Some(mib.saturating_mul(1 << 20)),
                    None => None,
                },
                fidelity: FidelityConfig {
                    sample_rate: match self.fidelity_sample_rate {
                        r if (0.0..=1.0).contains(&r) => r,
                        r => {
                            return Err(ConfigError {
                                flag: "fidelity-sample-rate",
                                message: format!("must be in [0, 1], got {r}"),
                            })
                        }
                    },
                    backlog: positive("fidelity-backlog", self.fidelity_backlog)?,
                },
                round_hook: None,
                fault: None,
            },
            images,
            max_body_bytes: positive("max-body-bytes", self.max_body_bytes)?,
            recipes: self.recipes,
            default_budget: self.default_budget,
            detail_low_budget: self.detail_low_budget,
            database_url: self.database_url,
            admin_token: self.admin_token,
            calibration_cache_bytes: self.calibration_cache_mib.saturating_mul(1 << 20),
            calibration_data_root,
            api_key: self.api_key,
            shutdown_timeout: seconds("shutdown-timeout", self.shutdown_timeout)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_issue_and_bad_values_name_the_flag() {
        let cfg = ServeArgs::parse_from(["serve"]).validate().unwrap();
        assert_eq!(cfg.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.engine.max_waiting, 64);
        assert_eq!(cfg.images.max_bytes, 16 << 20);
        assert_eq!(cfg.images.max_pixels, 40_000_000);
        assert_eq!(cfg.images.max_images, 8);
        assert_eq!(cfg.images.fetch_timeout, Duration::from_secs(10));
        assert_eq!(cfg.max_body_bytes, 20 << 20);
        assert_eq!(cfg.served_model_name, "fitprune-demo");
        let e = ServeArgs::parse_from(["serve", "--default-budget", "1.5"]).validate().unwrap_err();
        assert_eq!(e.flag, "default-budget");
        let e = ServeArgs::parse_from(["serve", "--max-running", "0"]).validate().unwrap_err();
        assert_eq!(e.flag, "max-running");
        let e = ServeArgs::parse_from(["serve", "--device", "tpu"]).validate().unwrap_err();
        assert_eq!(e.flag, "device");
        assert!(cfg.calibration_data_root.is_none(), "dataset input is off unless a root is given");
        assert_eq!(cfg.images.max_decoded_bytes, 2048 << 20);
        let e = ServeArgs::parse_from(["serve", "--calibration-data-dir", "/no/such/dir"]).validate().unwrap_err();
        assert_eq!(e.flag, "calibration-data-dir");
    }
}
