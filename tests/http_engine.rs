//! The engine behind HTTP: queue overflow (429), cancellation of a client that goes away
//! mid-stream, timeouts, shutdown, health while loading, metrics and request ids.

mod http_common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use fitprune::api::ApiSettings;
use fitprune::engine::recipes::FileRecipes;
use fitprune::engine::{BackgroundWork, Engine, EngineConfig, LoadedModel};
use fitprune::metrics::Metrics;
use fitprune::model::llava::LoadOptions;
use fitprune::model::{LlavaModel, ModelError};
use fitprune::validation::images::ImageFetcher;
use fitprune::validation::{ImageLimits, ValidationSettings};
use fitprune::AppState;
use futures::StreamExt;
use http_common::*;
use serde_json::{json, Value};

/// Background work that holds the engine thread until released (the calibration seam).
struct Gate {
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

impl BackgroundWork for Gate {
    fn step(&mut self, _model: &LlavaModel) -> bool {
        let _ = self.entered.send(());
        let _ = self.release.recv_timeout(Duration::from_secs(30));
        false
    }
}

/// Blocks the engine thread; returns the release handle once it is blocked.
async fn hold_engine(server: &TestServer) -> mpsc::Sender<()> {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    server.state.engine.submit_background(Box::new(Gate { entered: entered_tx, release: release_rx })).unwrap();
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(20)).unwrap()).await.unwrap();
    release_tx
}

fn short() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
}

/// A greedy request the demo model answers at length (about 150 tokens before EOS).
fn long_stream() -> Value {
    json!({"messages": [{"role": "user", "content": "Continue."}], "max_tokens": 1000, "temperature": 0,
        "stream": true})
}

/// Lets the engine run one round at a time until it has cancelled a client that went away.
async fn step_until_cancelled(server: &TestServer, stepper: &Stepper) {
    let cancelled = r#"fitprune_requests_cancelled_total{reason="client_gone"}"#;
    let metrics = server.state.metrics.clone();
    let is_cancelled = move || metric(&metrics.render().unwrap(), cancelled) == Some(1.0);
    let mut rounds = 0;
    while !is_cancelled() {
        assert!(rounds < 40, "not cancelled after {rounds} more rounds");
        stepper.grant(1);
        rounds += 1;
        eventually("the round ran", || stepper.blocked() || is_cancelled()).await;
    }
}

fn post(server: &TestServer, body: &Value) -> reqwest::RequestBuilder {
    server.client.post(format!("{}/v1/chat/completions", server.base)).json(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = start(&["--max-waiting", "2", "--max-running", "1"]).await;
    let release = hold_engine(&server).await;
    let waiting: Vec<_> = (0..2).map(|_| tokio::spawn(post(&server, &short()).send())).collect();
    eventually("two requests waiting", || server.state.engine.waiting() == 2).await;
    let (status, headers, body) = server.chat(&short()).await;
    let e = assert_error(status, &body, 429, None);
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(metric(&server.metrics().await, "fitprune_requests_waiting"), Some(2.0));
    release.send(()).unwrap();
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), 200);
    }
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"fitprune_requests_total{route="/v1/chat/completions",status="429"}"#), Some(1.0));
    assert_eq!(metric(&text, r#"fitprune_requests_total{route="/v1/chat/completions",status="200"}"#), Some(2.0));
    assert_eq!(metric(&text, "fitprune_requests_waiting"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_is_cancelled_and_frees_its_slot() {
    // Three rounds: admission + prefill + first token, then two more tokens; then the engine waits.
    let (server, stepper) = Stepper::server(&["--max-running", "1"], Some(3)).await;
    let resp = post(&server, &long_stream()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).to_string();
    assert!(first.contains(r#""role":"assistant""#), "{first}");
    eventually("three rounds ran", || stepper.blocked()).await;
    let text = server.metrics().await;
    assert_eq!(metric(&text, "fitprune_requests_running"), Some(1.0), "the stream is mid-generation");
    drop(body);
    // Let the engine step one round at a time until it notices the client is gone.
    step_until_cancelled(&server, &stepper).await;
    let text = server.metrics().await;
    assert_eq!(metric(&text, "fitprune_requests_running"), Some(0.0));
    assert!(metric(&text, "fitprune_generation_tokens_total").unwrap() < 50.0);
    // The single running slot is free again.
    stepper.run_freely();
    let (status, _, body) = server.chat(&short()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_cancels_a_non_streaming_request() {
    let (server, stepper) = Stepper::server(&["--max-running", "1"], Some(2)).await;
    let mut req = long_stream();
    req["stream"] = json!(false);
    // The client gives up (and closes its connection) while the answer is being generated.
    let gave_up = post(&server, &req).timeout(Duration::from_millis(300)).send().await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    eventually("two rounds ran", || stepper.blocked()).await;
    step_until_cancelled(&server, &stepper).await;
    assert_eq!(metric(&server.metrics().await, "fitprune_requests_running"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_advances_every_running_sequence_so_a_short_request_finishes_beside_a_long_one() {
    let (server, stepper) = Stepper::server(&["--max-running", "2"], Some(0)).await;
    let long = tokio::spawn(post(&server, &long_stream()).send());
    let short_req = tokio::spawn(post(&server, &short()).send());
    eventually("both requests waiting", || server.state.engine.waiting() == 2).await;
    // Step 1 admits both (one batched prefill, first tokens sampled); step 2's batched decode
    // gives each its second token, so the 2-token request is done well within five steps while
    // the long one keeps running.
    stepper.grant(5);
    let resp = short_req.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 2);
    eventually("five steps ran", || stepper.blocked()).await;
    assert_eq!(metric(&server.metrics().await, "fitprune_requests_running"), Some(1.0));
    let long = long.await.unwrap().unwrap();
    assert_eq!(long.status(), 200);
    stepper.run_freely();
    let events = sse_data(&long.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

/// Requests that differ in length, images and pruning: a batched prefill must pad and prune
/// each one by itself.
fn mixed_requests() -> Vec<Value> {
    let greedy = |messages: Value, pruning: Value| {
        json!({"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3,
            "pruning": pruning})
    };
    vec![
        greedy(user_with_images("What is this?", &[&data_url(&png(32, 32))]), json!({"recipe_id": "r60"})),
        greedy(json!([{"role": "user", "content": "hi there"}]), json!("off")),
        greedy(user_with_images("Compare.", &[&data_url(&png(40, 24)), &data_url(&png(24, 40))]), json!("off")),
        greedy(user_with_images("And this?", &[&data_url(&png(50, 30))]), json!({"recipe_id": "r30"})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_prefilled_in_one_batch_with_the_answers_they_get_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = demo_recipes_file(dir.path());
    let recipes = file.to_str().unwrap();
    let mut answers = Vec::new();
    for batch_tokens in ["4096", "1"] {
        let extra = ["--recipes", recipes, "--max-running", "4", "--max-batch-prefill-tokens", batch_tokens];
        let (server, stepper) = Stepper::server(&extra, Some(0)).await;
        let pending: Vec<_> = mixed_requests().iter().map(|r| tokio::spawn(post(&server, r).send())).collect();
        eventually("all requests waiting", || server.state.engine.waiting() == 4).await;
        stepper.grant(1);
        eventually("the first round ran", || stepper.blocked()).await;
        let text = server.metrics().await;
        let (batches, prefilled) = if batch_tokens == "1" { (1.0, 1.0) } else { (1.0, 4.0) };
        assert_eq!(metric(&text, "fitprune_prefill_batch_size_count"), Some(batches), "{batch_tokens}");
        assert_eq!(metric(&text, "fitprune_prefill_batch_size_sum"), Some(prefilled), "{batch_tokens}");
        stepper.run_freely();
        let mut bodies = Vec::new();
        for p in pending {
            let resp = p.await.unwrap().unwrap();
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.unwrap();
            bodies.push((body["choices"][0].clone(), body["pruning"].clone(), body["usage"].clone()));
        }
        assert_eq!(bodies[0].1["visual_tokens_kept"], 64);
        assert_eq!(bodies[3].1["visual_tokens_kept"], 114);
        assert_eq!(bodies[2].1["visual_tokens"], 288);
        answers.push(bodies);
    }
    // Greedy text, finish reasons and token logprobs as printed in JSON (to 1e-7 or so) agree.
    for (i, (batched, alone)) in answers[0].iter().zip(&answers[1]).enumerate() {
        assert_eq!(batched.0["message"], alone.0["message"], "request {i}");
        assert_eq!(batched.0["finish_reason"], alone.0["finish_reason"], "request {i}");
        assert_eq!(batched.1, alone.1, "request {i}: pruning report");
        assert_eq!(batched.2, alone.2, "request {i}: usage");
        let lp = |c: &Value| -> Vec<(String, f64)> {
            c["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["token"].as_str().unwrap().to_string(), t["logprob"].as_f64().unwrap()))
                .collect()
        };
        for ((ta, la), (tb, lb)) in lp(&batched.0).into_iter().zip(lp(&alone.0)) {
            assert_eq!(ta, tb, "request {i}");
            assert!((la - lb).abs() <= 1e-4, "request {i}: {la} vs {lb}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_is_503() {
    let server = start(&["--request-timeout", "0.5", "--max-running", "1"]).await;
    let release = hold_engine(&server).await;
    let pending = tokio::spawn(post(&server, &short()).send());
    eventually("the request is waiting", || server.state.engine.waiting() == 1).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    release.send(()).unwrap();
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"fitprune_requests_cancelled_total{reason="timeout"}"#), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_streams_and_refuses_new_work() {
    let (server, stepper) = Stepper::server(&[], Some(2)).await;
    let resp = post(&server, &long_stream()).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).to_string();
    eventually("two rounds ran", || stepper.blocked()).await;
    server.state.engine.shutdown();
    stepper.run_freely();
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events = sse_data(&seen);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{seen}");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down", "{seen}");
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"fitprune_requests_cancelled_total{reason="shutdown"}"#), Some(1.0));
    let (status, text) = server.get("/health").await;
    assert_eq!(status, 503);
    assert!(text.contains("shutting_down"), "{text}");
    let (status, _, body) = server.chat(&short()).await;
    assert_eq!(assert_error(status, &body, 503, None)["code"], "shutting_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_work_then_cancels_what_is_left() {
    // With a long grace period the in-flight stream completes; with a short one it is cancelled.
    for (grace, completes) in [("30", true), ("0.3", false)] {
        let stepper = Stepper::new(Some(2));
        let mut cfg = args(&["--shutdown-timeout", grace]).validate().unwrap();
        cfg.engine.round_hook = Some(stepper.hook());
        let (state, worker, _) = fitprune::server::start(&cfg).await.unwrap();
        wait_ready(&state).await;
        let engine = state.engine.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let server = tokio::spawn(fitprune::server::serve(listener, state, worker, stop, cfg.shutdown_timeout));
        let resp = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(&long_stream())
            .send()
            .await
            .unwrap();
        let mut body = resp.bytes_stream();
        let mut seen = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).to_string();
        eventually("two rounds ran", || stepper.blocked()).await;

        stop_tx.send(()).unwrap();
        eventually("the engine drains", || engine.is_draining()).await;
        // The listener closes: new connections are refused.
        let mut refused = false;
        for _ in 0..100 {
            if reqwest::Client::new().get(format!("{base}/health")).send().await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "still accepting connections after shutdown began");
        if !completes {
            // Past the grace period the engine is told to cancel; let it run again afterwards.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        stepper.run_freely();
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        let events = sse_data(&seen);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{seen}");
        let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        if completes {
            assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
        } else {
            assert_eq!(last["error"]["code"], "shutting_down", "{last}");
        }
        // serve returns once connections are closed, after joining the engine thread.
        tokio::time::timeout(Duration::from_secs(20), server).await.unwrap().unwrap().unwrap();
        assert!(matches!(engine.state(), fitprune::engine::EngineState::Stopped));
    }
}

fn manual_state(loader: fitprune::engine::queue::Loader) -> AppState {
    let metrics = Metrics::new().unwrap();
    let (engine, _thread) = Engine::start(loader, EngineConfig::default(), metrics.clone()).unwrap();
    let settings = ApiSettings {
        validation: ValidationSettings {
            served_model_name: "demo".into(),
            images: ImageLimits::default(),
            default_budget: None,
            detail_low_budget: 0.7,
        },
        api_key: None,
        max_body_bytes: 1 << 20,
        started: 0,
    };
    AppState {
        engine,
        metrics,
        recipes: Arc::new(FileRecipes::empty()),
        fetcher: ImageFetcher::new(ImageLimits::default()).unwrap(),
        settings: Arc::new(settings),
        admin: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_and_after_a_failed_load() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let dir = demo_dir().to_path_buf();
    let server = serve(manual_state(Box::new(move || {
        let _ = release_rx.recv();
        let model = LlavaModel::load(&dir, LoadOptions::default())?;
        LoadedModel::new(model, "demo".into(), true, "cpu".into())
    })))
    .await;
    let (status, text) = server.get("/health").await;
    assert_eq!(status, 503);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["status"], "loading");
    let (status, headers, body) = server.chat(&short()).await;
    assert_eq!(assert_error(status, &body, 503, None)["code"], "model_loading");
    assert_eq!(headers["retry-after"], "1");
    // /v1/models answers while loading.
    assert_eq!(server.get("/v1/models").await.0, 200);
    release_tx.send(()).unwrap();
    wait_ready(&server.state).await;
    let (status, text) = server.get("/health").await;
    assert_eq!((status, serde_json::from_str::<Value>(&text).unwrap()["status"].clone()), (200, json!("ok")));
    assert_eq!(server.chat(&short()).await.0, 200);

    let failed = serve(manual_state(Box::new(|| Err(ModelError::InvalidInput("no weights here".into()))))).await;
    eventually("load failure is reported", || {
        matches!(failed.state.engine.state(), fitprune::engine::EngineState::Failed(_))
    })
    .await;
    let (status, text) = failed.get("/health").await;
    assert_eq!(status, 503);
    let health: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(health["status"], "failed");
    assert!(health["error"].as_str().unwrap().contains("no weights here"));
    let (status, _, body) = failed.chat(&short()).await;
    assert_eq!(assert_error(status, &body, 503, None)["code"], "model_load_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_every_series_after_traffic() {
    let server = start(&[]).await;
    let req = json!({"messages": user_with_images("Look.", &[&data_url(&png(20, 20))]), "max_tokens": 4,
        "temperature": 0});
    assert_eq!(server.chat(&req).await.0, 200);
    // The request duration is observed when the response body is dropped, just after the client has it.
    let metrics = server.state.metrics.clone();
    eventually("the request duration is recorded", || {
        metrics.render().unwrap().contains(r#"fitprune_request_duration_seconds_count{route="/v1/chat/completions"} 1"#)
    })
    .await;
    let (status, text) = server.get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        r#"fitprune_requests_total{route="/v1/chat/completions",status="200"} 1"#,
        r#"fitprune_request_duration_seconds_count{route="/v1/chat/completions"} 1"#,
        "fitprune_queue_wait_seconds_count 1",
        "fitprune_time_to_first_token_seconds_count 1",
        "fitprune_time_per_output_token_seconds_count",
        r#"fitprune_prefill_duration_seconds_count{pruned="false"} 1"#,
        "fitprune_prompt_tokens_total",
        "fitprune_image_tokens_total 144",
        "fitprune_generation_tokens_total",
        "fitprune_requests_waiting 0",
        "fitprune_requests_running 0",
        "fitprune_visual_tokens_in_total 0",
        "fitprune_visual_tokens_kept_total 0",
        "fitprune_flops_reduction_ratio_bucket",
        r#"fitprune_model_info{device="cpu",dtype="f32",model="demo"} 1"#,
    ] {
        assert!(text.contains(series), "missing {series:?} in\n{text}");
    }
    assert!(metric(&text, "fitprune_prompt_tokens_total").unwrap() > 144.0);
}

#[tokio::test]
async fn request_ids_are_generated_or_echoed() {
    let server = start(&[]).await;
    let resp = server.client.get(format!("{}/health", server.base)).send().await.unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "{generated}");
    let resp =
        server.client.get(format!("{}/v1/models", server.base)).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let models: Value = resp.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "demo");
    assert_eq!(server.get("/v1/models/demo").await.0, 200);
    assert_eq!(server.get("/v1/models/other").await.0, 404);
}
