//! Continuous batching behind HTTP: concurrent requests decode in one pass with the answers they
//! get alone, KV memory decides how many run (pruned requests cost less), a request larger than
//! the whole cache is refused, failed batched passes fail only the sequence at fault, and
//! background work runs on the engine thread only when no chat work exists.

mod http_common;

use std::sync::Arc;

use fitprune::engine::{FaultInjector, Phase};
use http_common::*;
use serde_json::{json, Value};

/// Pruned, unpruned and differently pruned requests of different prompt and answer lengths.
fn mixed_requests() -> Vec<Value> {
    let greedy = |messages: Value, pruning: Value, max_tokens: usize| {
        json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": true,
            "top_logprobs": 3, "pruning": pruning})
    };
    vec![
        greedy(user_with_images("What is this?", &[&data_url(&png(32, 32))]), json!({"recipe_id": "r60"}), 9),
        greedy(json!([{"role": "user", "content": "hi there"}]), json!("off"), 12),
        greedy(user_with_images("Compare.", &[&data_url(&png(40, 24)), &data_url(&png(24, 40))]), json!("off"), 5),
        greedy(user_with_images("And this?", &[&data_url(&png(50, 30))]), json!({"recipe_id": "r30"}), 7),
    ]
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_decode_in_one_pass_with_the_answers_they_get_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = demo_recipes_file(dir.path());
    let recipes = file.to_str().unwrap();
    let mut runs = Vec::new();
    for max_running in ["4", "1"] {
        let (server, stepper) = Stepper::server(&["--recipes", recipes, "--max-running", max_running], Some(0)).await;
        let results = run_together(&server, &stepper, &mixed_requests(), &IDS).await;
        assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
        let text = server.metrics().await;
        let passes = metric(&text, "fitprune_decode_batch_size_count").unwrap();
        let single = metric(&text, r#"fitprune_decode_batch_size_bucket{le="1"}"#).unwrap();
        let widest = metric(&text, r#"fitprune_decode_batch_size_bucket{le="3"}"#).unwrap();
        if max_running == "4" {
            // The first decode step carries all four; one pass per step, not per sequence.
            assert!(widest < passes, "no decode pass had 4 sequences: {passes} passes");
            let tokens = metric(&text, "fitprune_generation_tokens_total").unwrap();
            assert!(passes < tokens - 4.0, "{passes} decode passes for {tokens} tokens");
        } else {
            assert_eq!(single, passes, "with --max-running 1 every pass has one sequence");
        }
        runs.push(results.into_iter().map(|(_, b)| b).collect::<Vec<_>>());
    }
    assert_same_answers(&runs[0], &runs[1]);
    // Different lengths really were mixed: the answers end at different token counts.
    let lengths: Vec<u64> =
        runs[0].iter().map(|b| b["usage"]["completion_tokens"].as_u64().unwrap()).collect::<Vec<_>>();
    assert!(lengths.windows(2).any(|w| w[0] != w[1]), "{lengths:?}");
}

/// Two-image prompts (288 visual tokens): one unpruned sequence needs about 0.65 MB of KV
/// cache in the tiny demo model (4 layers, 2 KV heads of 32, f32, 317 tokens), the r60 recipe
/// about 0.45 MB, so a 1 MiB cache runs one unpruned or two pruned at a time.
fn two_image_request(pruning: Value) -> Value {
    json!({"messages": user_with_images("Compare.", &[&data_url(&png(40, 24)), &data_url(&png(24, 40))]),
        "max_tokens": 8, "temperature": 0, "pruning": pruning})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_memory_decides_admission_and_pruned_requests_fit_more() {
    let dir = tempfile::tempdir().unwrap();
    let file = demo_recipes_file(dir.path());
    let recipes = file.to_str().unwrap();
    let mut admitted = Vec::new();
    for pruning in [json!("off"), json!({"recipe_id": "r60"})] {
        let extra = ["--recipes", recipes, "--max-running", "8", "--kv-cache-mib", "1"];
        let (server, stepper) = Stepper::server(&extra, Some(0)).await;
        let requests = vec![two_image_request(pruning.clone()); 3];
        let pending: Vec<_> =
            requests.iter().zip(IDS).map(|(r, id)| tokio::spawn(post(&server, r, id).send())).collect();
        eventually("all requests waiting", || server.state.engine.waiting() == 3).await;
        stepper.grant(1);
        eventually("the first step ran", || stepper.blocked()).await;
        let text = server.metrics().await;
        let running = metric(&text, "fitprune_requests_running").unwrap();
        let used = metric(&text, r#"fitprune_kv_cache_bytes{kind="used"}"#).unwrap();
        assert_eq!(metric(&text, r#"fitprune_kv_cache_bytes{kind="capacity"}"#), Some(1048576.0));
        assert!(used > 0.0 && used <= 1048576.0, "{used}");
        assert_eq!(server.state.engine.waiting(), 3 - running as usize, "the rest wait");
        admitted.push(running);
        // Memory short means waiting, not failing: all three finish.
        stepper.run_freely();
        for p in pending {
            assert_eq!(p.await.unwrap().unwrap().status(), 200);
        }
        let text = server.metrics().await;
        assert_eq!(metric(&text, r#"fitprune_kv_cache_bytes{kind="used"}"#), Some(0.0), "freed at the end");
        let saved = metric(&text, "fitprune_kv_tokens_saved_total").unwrap();
        assert_eq!(saved > 0.0, pruning != json!("off"), "{saved}");
    }
    assert_eq!(admitted, vec![1.0, 2.0], "unpruned vs r60 admitted under 1 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_whole_kv_cache_is_a_400() {
    let server = start(&["--kv-cache-mib", "1"]).await;
    let mut body = two_image_request(json!("off"));
    body["max_tokens"] = json!(1500);
    let (status, _, body) = server.chat(&body).await;
    let err = assert_error(status, &body, 400, Some("max_tokens"));
    assert_eq!(err["code"], "kv_cache_exceeded");
    // The server is fine afterwards.
    let (status, _, _) = server.chat(&two_image_request(json!("off"))).await;
    assert_eq!(status, 200);
}

fn faulty(extra: &[&str], phase: Phase) -> fitprune::config::ServerConfig {
    let mut cfg = args(extra).validate().unwrap();
    cfg.engine.fault = Some(FaultInjector(Arc::new(move |p, ids: &[&str]| p == phase && ids.contains(&"poison"))));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batched_pass_fails_only_the_sequence_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let file = demo_recipes_file(dir.path());
    let recipes = file.to_str().unwrap();
    let extra = ["--recipes", recipes, "--max-running", "4"];
    let clean = {
        let (server, stepper) = Stepper::server(&extra, Some(0)).await;
        run_together(&server, &stepper, &mixed_requests(), &IDS).await
    };
    let ids = ["a", "poison", "c", "d"];
    for phase in [Phase::Prefill, Phase::Decode] {
        let stepper = Stepper::new(Some(0));
        let mut cfg = faulty(&extra, phase);
        cfg.engine.round_hook = Some(stepper.hook());
        let server = start_with(cfg).await;
        let results = run_together(&server, &stepper, &mixed_requests(), &ids).await;
        let (status, body) = &results[1];
        let err = assert_error(reqwest::StatusCode::from_u16(*status).unwrap(), body, 500, None);
        assert!(err["message"].is_string(), "{phase:?}: {body}");
        let survivors: Vec<Value> = [0, 2, 3].iter().map(|&i| results[i].1.clone()).collect();
        let expected: Vec<Value> = [0, 2, 3].iter().map(|&i| clean[i].1.clone()).collect();
        assert!([0, 2, 3].iter().all(|&i| results[i].0 == 200), "{phase:?}: {results:?}");
        assert_same_answers(&survivors, &expected);
        let text = server.metrics().await;
        assert_eq!(metric(&text, r#"fitprune_kv_cache_bytes{kind="used"}"#), Some(0.0), "{phase:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_runs_on_the_engine_thread_only_when_no_chat_work_exists() {
    let server = start(&[]).await;
    let engine = server.state.engine.clone();
    let name = tokio::task::spawn_blocking(move || {
        engine.run_background(|_| std::thread::current().name().map(str::to_string)).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(name.as_deref(), Some("fitprune-engine"));

    // A long stream is running when the slice is submitted: the slice waits for it to finish.
    let long = json!({"messages": [{"role": "user", "content": "Continue."}], "max_tokens": 60,
        "temperature": 0, "stream": true});
    let stream = tokio::spawn(post(&server, &long, "long").send());
    eventually("the stream runs", || server.state.metrics.running.get() == 1).await;
    let (engine, metrics) = (server.state.engine.clone(), server.state.metrics.clone());
    let seen = tokio::task::spawn_blocking(move || {
        engine.run_background(move |_| (metrics.running.get(), metrics.tokens.generated.get())).unwrap()
    })
    .await
    .unwrap();
    let events = sse_data(&stream.await.unwrap().unwrap().text().await.unwrap());
    let chunks: Vec<Value> =
        events.iter().filter(|e| e.as_str() != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let tokens = chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].is_string()).count() as u64;
    assert_eq!(seen.0, 0, "the slice ran while a sequence was running");
    // Generated tokens are counted when a request finishes: non-zero means the stream had ended.
    assert!(seen.1 > 0 && seen.1 >= tokens, "the slice ran before the stream's {tokens} tokens: {}", seen.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fidelity_monitor_compares_sampled_pruned_requests_with_their_unpruned_pass() {
    let dir = tempfile::tempdir().unwrap();
    let file = demo_recipes_file(dir.path());
    let server = start(&["--recipes", file.to_str().unwrap(), "--fidelity-sample-rate", "1"]).await;
    let request = |pruning: Value| {
        json!({"messages": user_with_images("What is this?", &[&data_url(&png(32, 32))]), "max_tokens": 2,
            "temperature": 0, "pruning": pruning})
    };
    for pruning in [json!({"recipe_id": "r60"}), json!("off"), json!({"recipe_id": "r60"})] {
        let (status, _, body) = server.chat(&request(pruning)).await;
        assert_eq!(status, 200, "{body}");
    }
    let probes = |text: &str| {
        ["true", "false"]
            .iter()
            .filter_map(|a| {
                metric(text, &format!(r#"fitprune_fidelity_top1_agreement_total{{agree="{a}",recipe="r60"}}"#))
            })
            .sum::<f64>()
    };
    let metrics = server.state.metrics.clone();
    eventually("both pruned requests probed", || probes(&metrics.render().unwrap()) == 2.0).await;
    let text = server.metrics().await;
    // Only the pruned requests were probed, each once; r60 deletes 40 of 144 visual tokens at
    // layer 0, so the distributions differ (KL > 0) but stay close.
    assert_eq!(metric(&text, r#"fitprune_fidelity_kl_count{recipe="r60"}"#), Some(2.0));
    let kl = metric(&text, r#"fitprune_fidelity_kl_sum{recipe="r60"}"#).unwrap();
    assert!(kl > 0.0 && kl.is_finite(), "{kl}");
    assert_eq!(metric(&text, "fitprune_fidelity_dropped_total"), Some(0.0));
    assert_eq!(metric(&text, "fitprune_fidelity_backlog"), Some(0.0));
}
