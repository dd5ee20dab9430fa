//! Every Prometheus series the server exports, in one place: names (`fitprune_` prefix, unit
//! suffixes `_seconds`/`_total`), labels and vLLM-style histogram buckets.
//!
//! Each [`Metrics`] owns its own registry (not the process-global one), so tests can run several
//! servers in one process.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// vLLM's end-to-end latency buckets.
/// Calibration takes seconds on demo models and up to hours on 7B models.
const CALIBRATION_BUCKETS: &[f64] = &[0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0];
const REQUEST_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0];
/// vLLM's time-to-first-token buckets (also used for queue wait and prefill).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0,
];
/// vLLM's time-per-output-token buckets.
const TPOT_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// FLOPs reduction ratio buckets.
const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
/// KL divergence buckets (nats): near-identical distributions up to clearly different ones.
const KL_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];
/// Batch size buckets (requests per batched prefill or decode pass).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0];

/// Errors while registering or encoding metrics.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The server's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route template and status code.
    pub requests: IntCounterVec,
    /// HTTP request duration by route.
    pub request_duration: HistogramVec,
    /// Time from admission to the start of prefill.
    pub queue_wait: Histogram,
    /// Time from admission to the first token.
    pub time_to_first_token: Histogram,
    /// Mean time between output tokens of a finished request.
    pub time_per_output_token: Histogram,
    /// Prefill duration, `pruned` = true|false (a batched prefill counts for each request in it).
    pub prefill_duration: HistogramVec,
    /// Requests prefilled together in one batched pass.
    pub prefill_batch_size: Histogram,
    /// Token and request counters (see [`TokenCounters`]).
    pub tokens: TokenCounters,
    /// Requests waiting in the queue.
    pub waiting: IntGauge,
    /// Sequences being decoded.
    pub running: IntGauge,
    /// Requests cancelled before finishing, by `reason` (client_gone, timeout, shutdown).
    pub cancelled: IntCounterVec,
    /// FLOPs reduction of each pruned prefill.
    pub flops_reduction: Histogram,
    /// Chat requests by the recipe they were served with (`none` when unpruned).
    pub requests_by_recipe: IntCounterVec,
    /// Calibration jobs by final `status`.
    pub calibration_jobs: IntCounterVec,
    /// Wall time of finished calibration jobs.
    pub calibration_duration: Histogram,
    /// Evaluation jobs (`POST /admin/evaluations`) by final `status`.
    pub evaluation_jobs: IntCounterVec,
    /// Wall time of finished evaluation jobs.
    pub evaluation_duration: Histogram,
    /// Recipes in the store.
    pub recipes_stored: IntGauge,
    /// Engine scheduling and KV-cache series (see [`EngineMetrics`]).
    pub engine: EngineMetrics,
    /// Live pruned-vs-unpruned comparisons (see [`FidelityMetrics`]).
    pub fidelity: FidelityMetrics,
    model_info: IntGaugeVec,
}

/// The live fidelity monitor (`--fidelity-sample-rate`).
#[derive(Clone)]
pub struct FidelityMetrics {
    /// KL(pruned ‖ unpruned) of first-token distributions, by `recipe`.
    pub kl: HistogramVec,
    /// Probes by `recipe` and whether the top-1 tokens agreed (`agree` = true | false).
    pub top1_agreement: IntCounterVec,
    /// Probes dropped (backlog full or failed).
    pub dropped: IntCounter,
    /// Probes waiting.
    pub backlog: IntGauge,
}

/// The engine step and its KV-cache memory.
#[derive(Clone)]
pub struct EngineMetrics {
    /// KV-cache bytes, `kind` = used (held by running sequences) | capacity.
    pub kv_cache_bytes: IntGaugeVec,
    /// Cache entries (tokens × layers) not stored thanks to pruning.
    pub kv_tokens_saved: IntCounter,
    /// Sequences advanced together in one batched decode pass.
    pub decode_batch_size: Histogram,
    /// Wall time of each engine step's passes, `phase` = prefill | decode.
    pub step_duration: HistogramVec,
}

/// Counters of tokens flowing through the engine.
#[derive(Clone)]
pub struct TokenCounters {
    /// Prompt tokens prefilled (image tokens included).
    pub prompt: IntCounter,
    /// Image (visual) tokens in prompts.
    pub image: IntCounter,
    /// Tokens generated.
    pub generated: IntCounter,
    /// Visual tokens entering pruned prefills.
    pub visual_in: IntCounter,
    /// Visual tokens that survived pruning.
    pub visual_kept: IntCounter,
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, MetricsError> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let requests = IntCounterVec::new(
            Opts::new("fitprune_requests_total", "HTTP requests by route and status"),
            &["route", "status"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "fitprune_request_duration_seconds",
                "HTTP request duration (streams: until the last byte)",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["route"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let prefill_duration = HistogramVec::new(
            HistogramOpts::new("fitprune_prefill_duration_seconds", "Vision tower + decoder prefill")
                .buckets(TTFT_BUCKETS.to_vec()),
            &["pruned"],
        )?;
        registry.register(Box::new(prefill_duration.clone()))?;
        let cancelled = IntCounterVec::new(
            Opts::new("fitprune_requests_cancelled_total", "Requests ended before finishing, by reason"),
            &["reason"],
        )?;
        registry.register(Box::new(cancelled.clone()))?;
        let requests_by_recipe = IntCounterVec::new(
            Opts::new("fitprune_requests_by_recipe_total", "Chat requests by the pruning recipe applied"),
            &["recipe"],
        )?;
        registry.register(Box::new(requests_by_recipe.clone()))?;
        let calibration_jobs = IntCounterVec::new(
            Opts::new("fitprune_calibration_jobs_total", "Calibration jobs by final status"),
            &["status"],
        )?;
        registry.register(Box::new(calibration_jobs.clone()))?;
        let evaluation_jobs = IntCounterVec::new(
            Opts::new("fitprune_evaluation_jobs_total", "Evaluation jobs by final status"),
            &["status"],
        )?;
        registry.register(Box::new(evaluation_jobs.clone()))?;
        let model_info = IntGaugeVec::new(
            Opts::new("fitprune_model_info", "The loaded model (value 1)"),
            &["model", "device", "dtype"],
        )?;
        registry.register(Box::new(model_info.clone()))?;
        let kv_cache_bytes = IntGaugeVec::new(
            Opts::new(
                "fitprune_kv_cache_bytes",
                "KV-cache bytes held by running sequences (used) and available (capacity)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(kv_cache_bytes.clone()))?;
        let step_duration = HistogramVec::new(
            HistogramOpts::new("fitprune_engine_step_seconds", "Wall time of an engine step's batched pass, by phase")
                .buckets(TTFT_BUCKETS.to_vec()),
            &["phase"],
        )?;
        registry.register(Box::new(step_duration.clone()))?;
        let engine = EngineMetrics {
            kv_cache_bytes,
            kv_tokens_saved: counter(
                "fitprune_kv_tokens_saved_total",
                "KV-cache entries (tokens x layers) not stored thanks to pruning",
            )?,
            decode_batch_size: histogram(
                "fitprune_decode_batch_size",
                "Sequences advanced together in one decode pass",
                BATCH_BUCKETS,
            )?,
            step_duration,
        };
        let fidelity_kl = HistogramVec::new(
            HistogramOpts::new(
                "fitprune_fidelity_kl",
                "KL divergence (nats) of a pruned request's first-token distribution from the unpruned one",
            )
            .buckets(KL_BUCKETS.to_vec()),
            &["recipe"],
        )?;
        registry.register(Box::new(fidelity_kl.clone()))?;
        let top1_agreement = IntCounterVec::new(
            Opts::new(
                "fitprune_fidelity_top1_agreement_total",
                "Fidelity probes by recipe and whether pruned and unpruned top-1 first tokens agree",
            ),
            &["recipe", "agree"],
        )?;
        registry.register(Box::new(top1_agreement.clone()))?;
        let fidelity = FidelityMetrics {
            kl: fidelity_kl,
            top1_agreement,
            dropped: counter("fitprune_fidelity_dropped_total", "Fidelity probes dropped (backlog full or failed)")?,
            backlog: gauge("fitprune_fidelity_backlog", "Fidelity probes waiting for an idle engine")?,
        };
        let tokens = TokenCounters {
            prompt: counter("fitprune_prompt_tokens_total", "Prompt tokens prefilled, image tokens included")?,
            image: counter("fitprune_image_tokens_total", "Visual tokens in prompts")?,
            generated: counter("fitprune_generation_tokens_total", "Tokens generated")?,
            visual_in: counter("fitprune_visual_tokens_in_total", "Visual tokens entering pruned prefills")?,
            visual_kept: counter("fitprune_visual_tokens_kept_total", "Visual tokens kept by pruned prefills")?,
        };
        let metrics = Self {
            requests,
            request_duration,
            queue_wait: histogram("fitprune_queue_wait_seconds", "Time waiting for a running slot", TTFT_BUCKETS)?,
            time_to_first_token: histogram(
                "fitprune_time_to_first_token_seconds",
                "Admission to first token",
                TTFT_BUCKETS,
            )?,
            time_per_output_token: histogram(
                "fitprune_time_per_output_token_seconds",
                "Mean time between output tokens",
                TPOT_BUCKETS,
            )?,
            prefill_duration,
            prefill_batch_size: histogram(
                "fitprune_prefill_batch_size",
                "Requests prefilled together in one pass",
                BATCH_BUCKETS,
            )?,
            tokens,
            waiting: gauge("fitprune_requests_waiting", "Requests waiting for a running slot")?,
            running: gauge("fitprune_requests_running", "Sequences being decoded")?,
            cancelled,
            flops_reduction: histogram(
                "fitprune_flops_reduction_ratio",
                "Visual-token FLOPs removed by each pruned prefill",
                RATIO_BUCKETS,
            )?,
            requests_by_recipe,
            calibration_jobs,
            calibration_duration: histogram(
                "fitprune_calibration_duration_seconds",
                "Wall time of finished calibration jobs",
                CALIBRATION_BUCKETS,
            )?,
            evaluation_jobs,
            evaluation_duration: histogram(
                "fitprune_evaluation_duration_seconds",
                "Wall time of finished evaluation jobs",
                CALIBRATION_BUCKETS,
            )?,
            recipes_stored: gauge("fitprune_recipes_stored", "Recipes in the store")?,
            engine,
            fidelity,
            model_info,
            registry,
        };
        metrics.zero_known_labels();
        Ok(metrics)
    }

    /// Creates every series with a known label value at zero, so a counter's first increment
    /// after a start shows up in `rate()`/`increase()` (Prometheus needs a previous sample).
    fn zero_known_labels(&self) {
        for reason in [CancelReason::ClientGone, CancelReason::Timeout, CancelReason::Shutdown] {
            self.cancelled.with_label_values(&[reason.label()]);
        }
        for status in ["succeeded", "failed", "cancelled"] {
            self.calibration_jobs.with_label_values(&[status]);
            self.evaluation_jobs.with_label_values(&[status]);
        }
        for pruned in ["true", "false"] {
            self.prefill_duration.with_label_values(&[pruned]);
        }
        for kind in ["used", "capacity"] {
            self.engine.kv_cache_bytes.with_label_values(&[kind]);
        }
        for phase in ["prefill", "decode"] {
            self.engine.step_duration.with_label_values(&[phase]);
        }
    }

    /// Sets `fitprune_model_info{model,device,dtype} 1`.
    pub fn set_model_info(&self, model: &str, device: &str, dtype: &str) {
        self.model_info.with_label_values(&[model, device, dtype]).set(1);
    }

    /// Counts one cancelled request.
    pub fn cancel(&self, reason: CancelReason) {
        self.cancelled.with_label_values(&[reason.label()]).inc();
    }

    /// Prometheus text exposition of every series.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Why a request ended early (the `reason` label of `fitprune_requests_cancelled_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client closed the connection or dropped the stream.
    ClientGone,
    /// The per-request timeout passed.
    Timeout,
    /// The server shut down.
    Shutdown,
}

impl CancelReason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientGone => "client_gone",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_prefixed_and_suffixed() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["/health", "200"]).inc();
        m.request_duration.with_label_values(&["/health"]).observe(0.1);
        m.prefill_duration.with_label_values(&["false"]).observe(0.1);
        m.cancel(CancelReason::ClientGone);
        m.set_model_info("demo", "cpu", "f32");
        let text = m.render().unwrap();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("fitprune_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains(r#"fitprune_requests_cancelled_total{reason="client_gone"} 1"#), "{text}");
        assert!(text.contains(r#"fitprune_model_info{device="cpu",dtype="f32",model="demo"} 1"#), "{text}");
    }
}
