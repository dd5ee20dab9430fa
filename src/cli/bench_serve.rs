//! `fitprune bench --concurrency 1,2,4,...`: the server's engine under concurrent load, in
//! process (no HTTP): aggregate decode throughput, p50/p99 TTFT and TPOT per concurrency,
//! unpruned and pruned, and how many sequences one KV-cache budget admits with and without
//! pruning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use crate::engine::kv::KvLayout;
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{Demand, Scheduler, SchedulerLimits};
use crate::engine::sequence::{decode_growth_for, GenerationParams};
use crate::engine::{ChatJob, Engine, EngineConfig, Event, LoadedModel};
use crate::metrics::Metrics;
use crate::model::llava::LoadOptions;
use crate::model::{LlavaModel, PreparedPrompt};
use crate::pruning::Recipe;

/// What the concurrency bench runs.
pub struct ConcurrencyBench {
    /// Concurrent requests per row.
    pub concurrency: Vec<usize>,
    /// Tokens each request generates (at most; EOS may end it sooner).
    pub max_tokens: usize,
    /// `(budget, per-layer deletions)` rows; budget 0 is unpruned.
    pub rows: Vec<(f64, Vec<usize>)>,
    /// KV budget for the admission count, in MiB; `None` = room for 16 unpruned sequences.
    pub kv_cache_mib: Option<u64>,
}

/// Timings of one request.
struct Trace {
    submitted: Instant,
    tokens: Vec<Instant>,
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    xs[rank.min(xs.len() - 1)]
}

/// Runs `bench` on the model in `dir`; `prompt_for(i)` gives request i's prompt.
pub fn run(
    dir: &std::path::Path,
    options: LoadOptions,
    bench: &ConcurrencyBench,
    prompt_for: &dyn Fn(&LlavaModel, usize) -> anyhow::Result<PreparedPrompt>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let max_c = bench.concurrency.iter().copied().max().unwrap_or(1);
    if max_c == 0 {
        bail!("--concurrency values must be positive");
    }
    let dir_owned = dir.to_path_buf();
    let loader = Box::new(move || {
        let m = LlavaModel::load(&dir_owned, options)?;
        LoadedModel::new(m, "bench".into(), false, "bench".into())
    });
    let config = EngineConfig {
        max_waiting: max_c * 2,
        max_running: max_c,
        request_timeout: Duration::from_secs(3600),
        // Room for every request's memory: this part measures throughput, not admission.
        kv_cache_bytes: Some(u64::MAX / 2),
        ..EngineConfig::default()
    };
    let (engine, worker) = Engine::start(loader, config, Metrics::new()?)?;
    let loaded = wait_ready(&engine)?;
    // One copy of the weights: the engine's, also used (read-only) to prepare the prompts and,
    // once the engine has stopped, for the pass-by-pass comparison.
    let model = &loaded.model;
    let prompts: Vec<PreparedPrompt> = (0..max_c).map(|i| prompt_for(model, 200 + i)).collect::<anyhow::Result<_>>()?;
    println!(
        "concurrency: {} requests of {:?} prompt tokens, up to {} tokens each, batched decode",
        max_c,
        prompts.iter().map(|p| p.input_ids.len()).take(3).collect::<Vec<_>>(),
        bench.max_tokens
    );
    println!("| budget | concurrent | aggregate decode tok/s | vs 1 stream | TTFT p50 / p99 s | TPOT p50 / p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut report = Vec::new();
    for (budget, deletions) in &bench.rows {
        let recipe = (*budget > 0.0).then(|| Arc::new(recipe_for(&loaded, *budget, deletions, &prompts[0])));
        let mut single = None;
        for &c in &bench.concurrency {
            // One warm-up request, then the measured wave.
            run_wave(&engine, &prompts[..1], bench.max_tokens, recipe.clone())?;
            let traces = run_wave(&engine, &prompts[..c], bench.max_tokens, recipe.clone())?;
            let tput = steady_decode_rate(&traces);
            let base = *single.get_or_insert(tput);
            let mut ttft: Vec<f64> =
                traces.iter().filter_map(|t| t.tokens.first().map(|f| (*f - t.submitted).as_secs_f64())).collect();
            let mut tpot: Vec<f64> = traces
                .iter()
                .filter(|t| t.tokens.len() > 1)
                .map(|t| (t.tokens[t.tokens.len() - 1] - t.tokens[0]).as_secs_f64() / (t.tokens.len() - 1) as f64 * 1e3)
                .collect();
            let (ttft50, ttft99) = (percentile(&mut ttft, 50.0), percentile(&mut ttft, 99.0));
            let (tpot50, tpot99) = (percentile(&mut tpot, 50.0), percentile(&mut tpot, 99.0));
            println!(
                "| {budget:.1} | {c} | {tput:.1} | {:.2}x | {ttft50:.3} / {ttft99:.3} | {tpot50:.1} / {tpot99:.1} |",
                tput / base,
            );
            report.push(serde_json::json!({
                "budget": budget, "concurrent": c, "aggregate_decode_tokens_per_s": tput,
                "ttft_p50_s": ttft50, "ttft_p99_s": ttft99, "tpot_p50_ms": tpot50, "tpot_p99_ms": tpot99,
            }));
        }
    }
    admission_table(&loaded, bench, &prompts[0]);
    engine.shutdown();
    worker.join().map_err(|_| anyhow!("engine thread panicked"))?;
    pass_table(model, bench, &prompts)?;
    Ok(report)
}

/// One decode pass per sequence (the round-robin engine this one replaced) against one batched
/// pass for all of them, on the same prefilled caches, in one run.
fn pass_table(model: &LlavaModel, bench: &ConcurrencyBench, prompts: &[PreparedPrompt]) -> anyhow::Result<()> {
    use crate::model::llama::{KvCache, NoHook};
    let steps = bench.max_tokens.clamp(2, 16);
    println!();
    println!("decode passes: {steps} steps, unpruned, same caches; tokens/s over all sequences");
    println!("| sequences | one pass per sequence tok/s | one batched pass tok/s | batched / per sequence |");
    println!("|---|---|---|---|");
    for &c in &bench.concurrency {
        let prefill = |p: &PreparedPrompt| -> anyhow::Result<KvCache> {
            let mut cache = model.new_cache_with_growth(2 * steps);
            model.prefill(p, &mut cache, &mut NoHook)?;
            Ok(cache)
        };
        let mut caches: Vec<KvCache> = prompts[..c].iter().map(prefill).collect::<anyhow::Result<_>>()?;
        let start: Vec<u32> = prompts[..c].iter().map(|p| p.input_ids.len() as u32).collect();
        // The two ways take turns every step, so load that drifts during the run (these machines
        // are shared) hits both alike: per-sequence passes on one set of caches, a batched pass
        // on a copy prefilled the same way.
        let mut twins: Vec<KvCache> = prompts[..c].iter().map(prefill).collect::<anyhow::Result<_>>()?;
        let (mut single_s, mut batched_s) = (0.0, 0.0);
        for s in 0..steps as u32 {
            let t = Instant::now();
            for (i, cache) in caches.iter_mut().enumerate() {
                model.decode_batch(&[1], &[start[i] + s], &mut [cache])?.to_vec2::<f32>()?;
            }
            single_s += t.elapsed().as_secs_f64();
            let positions: Vec<u32> = start.iter().map(|p| p + s).collect();
            let mut refs: Vec<&mut KvCache> = twins.iter_mut().collect();
            let t = Instant::now();
            model.decode_batch(&vec![1; c], &positions, &mut refs)?.to_vec2::<f32>()?;
            batched_s += t.elapsed().as_secs_f64();
        }
        let single = (c * steps) as f64 / single_s;
        let batched = (c * steps) as f64 / batched_s;
        println!("| {c} | {single:.1} | {batched:.1} | {:.2}x |", batched / single);
    }
    Ok(())
}

fn wait_ready(engine: &Engine) -> anyhow::Result<Arc<LoadedModel>> {
    loop {
        match engine.ready() {
            Ok(m) => return Ok(m),
            Err(crate::engine::EngineError::Loading) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => bail!("{e}"),
        }
    }
}

fn recipe_for(loaded: &LoadedModel, budget: f64, deletions: &[usize], prompt: &PreparedPrompt) -> Recipe {
    Recipe {
        id: format!("bench-{budget}"),
        name: format!("bench-{budget}"),
        model_fingerprint: loaded.info.fingerprint.clone(),
        budget,
        achieved_reduction: 0.0,
        deletions: deletions.to_vec(),
        alpha: None,
        visual_tokens: prompt.visual_tokens(),
        samples: 0,
        created_at: String::new(),
        job_id: None,
    }
}

/// Submits every prompt at once and waits for all of them, recording token times.
fn run_wave(
    engine: &Engine,
    prompts: &[PreparedPrompt],
    max_tokens: usize,
    recipe: Option<Arc<Recipe>>,
) -> anyhow::Result<Vec<Trace>> {
    let mut pending = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let job = ChatJob {
            request_id: format!("bench-{i}"),
            prompt: p.clone(),
            params: GenerationParams {
                sampling: SamplingParams { seed: Some(0), ..SamplingParams::default() },
                max_tokens,
                stop: Vec::new(),
            },
            recipe: recipe.clone(),
        };
        let submitted = Instant::now();
        pending.push((submitted, engine.submit(job)?));
    }
    // One receiver thread per request, so every token is timestamped when it arrives rather
    // than when a sequential reader gets to it.
    let readers: Vec<_> = pending
        .into_iter()
        .map(|(submitted, mut rx)| {
            std::thread::spawn(move || -> anyhow::Result<Trace> {
                let mut trace = Trace { submitted, tokens: Vec::new() };
                while let Some(event) = rx.blocking_recv() {
                    match event {
                        Event::Token(_) => trace.tokens.push(Instant::now()),
                        Event::Finished(_) => break,
                        Event::Failed(e) => bail!("bench request failed: {e}"),
                        Event::Prefilled(_) => {}
                    }
                }
                Ok(trace)
            })
        })
        .collect();
    readers.into_iter().map(|r| r.join().map_err(|_| anyhow!("reader thread panicked"))?).collect()
}

/// Tokens per second over the window in which every request was decoding (from the last first
/// token to the first last token), counting all requests' tokens inside it.
fn steady_decode_rate(traces: &[Trace]) -> f64 {
    let start = traces.iter().filter_map(|t| t.tokens.first()).max();
    let end = traces.iter().filter_map(|t| t.tokens.last()).min();
    let (Some(&start), Some(&end)) = (start, end) else { return 0.0 };
    let window = end.saturating_duration_since(start).as_secs_f64();
    if window <= 0.0 {
        return 0.0;
    }
    // Tokens strictly after `start` up to `end`: each is one decode step's output.
    let tokens = traces.iter().flat_map(|t| &t.tokens).filter(|&&at| at > start && at <= end).count();
    tokens as f64 / window
}

/// How many copies of `prompt` one KV budget admits at each budget row (the scheduler's
/// admission, with each sequence's demand as the engine computes it).
fn admission_table(loaded: &LoadedModel, bench: &ConcurrencyBench, prompt: &PreparedPrompt) {
    let info = &loaded.info;
    let kv: KvLayout = info.kv;
    let (tokens, visual) = (prompt.input_ids.len(), prompt.visual_tokens());
    let growth = decode_growth_for(bench.max_tokens, tokens, info.max_context);
    let unpruned = kv.demand(tokens, visual, None, growth).bytes;
    let capacity = bench.kv_cache_mib.map_or(unpruned * 16, |m| m << 20);
    println!();
    println!(
        "KV admission: --kv-cache-mib {:.1}, prompt {tokens} tokens ({visual} visual), max_tokens {}",
        capacity as f64 / f64::from(1 << 20),
        bench.max_tokens
    );
    println!("| budget | KV per sequence MiB | sequences admitted | vs unpruned |");
    println!("|---|---|---|---|");
    let mut base = None;
    for (budget, deletions) in &bench.rows {
        let d = (*budget > 0.0).then_some(deletions.as_slice());
        let bytes = kv.demand(tokens, visual, d, growth).bytes;
        let limits = SchedulerLimits {
            max_running: usize::MAX,
            max_batch_prefill_tokens: usize::MAX,
            kv_capacity_bytes: capacity,
        };
        let mut s = Scheduler::new(limits);
        let mut id = 0;
        while s.enqueue(id, Demand { prompt_tokens: tokens, kv_bytes: bytes }).is_ok() && id < 100_000 {
            s.schedule();
            if s.waiting_len() > 0 {
                break;
            }
            id += 1;
        }
        let admitted = s.running_len();
        let base = *base.get_or_insert(admitted.max(1));
        println!(
            "| {budget:.1} | {:.2} | {admitted} | {:.2}x |",
            bytes as f64 / f64::from(1 << 20),
            admitted as f64 / base as f64
        );
    }
}
