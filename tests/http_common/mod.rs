//! Helpers for the HTTP integration tests: a demo checkpoint in a temp dir, a server on
//! 127.0.0.1:0 built with `build_app`, a local image server, and request/SSE helpers.
#![allow(dead_code)]

use std::future::IntoFuture;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Path as UrlPath;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use clap::Parser;
use fitprune::config::ServeArgs;
use fitprune::engine::{EngineState, RoundHook};
use fitprune::model::demo::{write_demo_model, DemoOptions};
use fitprune::{build_app, AppState};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The tiny demo checkpoint, written once per test binary.
pub fn demo_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("demo");
        write_demo_model(&dir, &DemoOptions::default()).unwrap();
        (tmp, dir)
    })
    .1
}

/// A running server.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its state (engine, metrics).
    pub state: AppState,
    /// A client.
    pub client: reqwest::Client,
}

/// `fitprune serve` flags every test server gets (plus `extra`).
pub fn args(extra: &[&str]) -> ServeArgs {
    args_for(demo_dir(), extra)
}

/// The tiny LLaVA-NeXT demo checkpoint, written once per test binary.
pub fn next_demo_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("next");
        let opts = DemoOptions { family: fitprune::model::demo::DemoFamily::Next, ..Default::default() };
        write_demo_model(&dir, &opts).unwrap();
        (tmp, dir)
    })
    .1
}

/// [`args`] for the model in `dir` (still served as `demo`).
pub fn args_for(dir: &Path, extra: &[&str]) -> ServeArgs {
    let dir = dir.to_str().unwrap().to_string();
    let mut argv = vec!["serve".to_string(), "--model".into(), dir, "--served-model-name".into(), "demo".into()];
    argv.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--database-url") {
        // Never the default ./fitprune.db: each server gets its own file in cargo's target/tmp,
        // named by test binary and server number, so reruns reuse (after clearing) the same files
        // instead of piling them up.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let exe = std::env::current_exe().unwrap();
        let binary = exe.file_stem().unwrap().to_string_lossy().to_string();
        let db = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fitprune-test-{binary}-{n}.db"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        argv.push("--database-url".into());
        argv.push(format!("sqlite://{}", db.display()));
    }
    ServeArgs::parse_from(argv)
}

/// Starts a server with the demo model and waits until it is ready.
pub async fn start(extra: &[&str]) -> TestServer {
    start_with(args(extra).validate().unwrap()).await
}

/// Starts a server from a (possibly edited) config and waits until it is ready.
pub async fn start_with(cfg: fitprune::config::ServerConfig) -> TestServer {
    let (state, _worker, _recipes) = fitprune::server::start(&cfg).await.unwrap();
    wait_ready(&state).await;
    serve(state).await
}

/// Serves `state` on a loopback port (without waiting for the model).
pub async fn serve(state: AppState) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, build_app(state.clone())).into_future());
    TestServer { base: format!("http://{addr}"), state, client: reqwest::Client::new() }
}

/// A server run through `fitprune::server::serve`, as `fitprune serve` runs it, with a handle to
/// shut it down gracefully: send on `stop`, then await `served`.
pub struct StoppableServer {
    pub server: TestServer,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts `cfg` as a [`StoppableServer`] once the model has loaded.
pub async fn start_stoppable(cfg: fitprune::config::ServerConfig) -> StoppableServer {
    let (state, worker, _) = fitprune::server::start(&cfg).await.unwrap();
    wait_ready(&state).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TestServer {
        base: format!("http://{}", listener.local_addr().unwrap()),
        state: state.clone(),
        client: reqwest::Client::new(),
    };
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let until = async move {
        let _ = stop_rx.await;
    };
    let served = tokio::spawn(fitprune::server::serve(listener, state, worker, until, cfg.shutdown_timeout));
    StoppableServer { server, stop, served }
}

/// An admin request with `token` as its bearer and `body` as JSON: the status and the JSON reply
/// (`null` if it is not JSON).
pub async fn admin_call(
    s: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (reqwest::StatusCode, Value) {
    let mut req = s.client.request(method, format!("{}{path}", s.base)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls until the engine has loaded the model.
pub async fn wait_ready(state: &AppState) {
    let start = Instant::now();
    loop {
        match state.engine.state() {
            EngineState::Ready(_) => return,
            EngineState::Loading => {}
            _ => panic!("engine failed to start"),
        }
        assert!(start.elapsed() < Duration::from_secs(60), "model did not load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` every 10 ms for up to 20 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl TestServer {
    /// POSTs a chat request; returns status, headers and the JSON body.
    pub async fn chat(&self, body: &Value) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let resp = self.client.post(format!("{}/v1/chat/completions", self.base)).json(body).send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, headers, json)
    }

    /// POSTs a streaming chat request; returns every `data:` payload in order.
    pub async fn chat_stream(&self, body: &Value) -> Vec<String> {
        let resp = self.client.post(format!("{}/v1/chat/completions", self.base)).json(body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap_or_default());
        let ctype = resp.headers()[header::CONTENT_TYPE.as_str()].to_str().unwrap().to_string();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        sse_data(&resp.text().await.unwrap())
    }

    /// GETs a path; returns status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// The Prometheus text.
    pub async fn metrics(&self) -> String {
        self.state.metrics.render().unwrap()
    }
}

/// `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))))
        .map(str::to_string)
        .collect()
}

/// The value of a metric line `name{labels} value` (labels as written by the encoder).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

/// A user message with text and image URLs.
pub fn user_with_images(text: &str, urls: &[&str]) -> Value {
    let mut parts: Vec<Value> = urls.iter().map(|u| json!({"type": "image_url", "image_url": {"url": u}})).collect();
    parts.push(json!({"type": "text", "text": text}));
    json!([{"role": "user", "content": parts}])
}

/// A PNG of `w` x `h` pixels (a gradient).
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `data:image/png;base64,...` of `bytes`.
pub fn data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Starts a local image server on 127.0.0.1; returns its base URL.
///
/// Routes: `/img.png` (64x48), `/big` (3 MB, with Content-Length), `/big-chunked` (3 MB streamed
/// without Content-Length), `/slow` (answers after 3 s), `/redirect/{n}` (n hops, then the PNG),
/// `/missing` (404), `/text` (not an image).
pub async fn image_server() -> String {
    async fn redirect(UrlPath(n): UrlPath<u32>) -> Response {
        if n == 0 {
            ([(header::CONTENT_TYPE, "image/png")], png(64, 48)).into_response()
        } else {
            Redirect::temporary(&format!("/redirect/{}", n - 1)).into_response()
        }
    }
    let app = Router::new()
        .route("/img.png", get(|| async { ([(header::CONTENT_TYPE, "image/png")], png(64, 48)) }))
        .route("/big", get(|| async { vec![0u8; 3 << 20] }))
        .route(
            "/big-chunked",
            get(|| async {
                let chunks = (0..48).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 64 << 10])));
                axum::body::Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                png(8, 8)
            }),
        )
        .route("/redirect/{n}", get(redirect))
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route("/text", get(|| async { "just some text" }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app).into_future());
    format!("http://{addr}")
}

/// Asserts an OpenAI-shaped error with this status, type and param; returns the body.
pub fn assert_error(status: StatusCode, body: &Value, want: u16, param: Option<&str>) -> Value {
    assert_eq!(status.as_u16(), want, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
    e.clone()
}

/// Writes two recipes for the demo model (4 layers, 144 visual tokens per image) to
/// `dir/recipes.json`: `r30` (budget 0.3, keeps 114) and `r60` (budget 0.6, keeps 64).
pub fn demo_recipes_file(dir: &Path) -> PathBuf {
    let file = dir.join("recipes.json");
    std::fs::write(
        &file,
        r#"[{"id": "r30", "budget": 0.3, "deletions": [0, 20, 10, 0]},
            {"id": "r60", "budget": 0.6, "deletions": [40, 30, 10, 0]}]"#,
    )
    .unwrap();
    file
}

/// Single-steps the engine: each engine step takes one permit (none left: it waits).
pub struct Stepper {
    state: Mutex<StepperState>,
    cv: Condvar,
}

pub struct StepperState {
    /// `None` runs freely.
    permits: Option<usize>,
    /// The engine is waiting for a permit (so the previous round has finished).
    blocked: bool,
}

impl Stepper {
    /// A server whose engine rounds are gated by the returned stepper (initially `permits`).
    pub async fn server(extra: &[&str], permits: Option<usize>) -> (TestServer, Arc<Stepper>) {
        Self::server_for(demo_dir(), extra, permits).await
    }

    /// [`Self::server`] for the model in `dir`.
    pub async fn server_for(dir: &Path, extra: &[&str], permits: Option<usize>) -> (TestServer, Arc<Stepper>) {
        let stepper = Stepper::new(permits);
        let mut cfg = args_for(dir, extra).validate().unwrap();
        cfg.engine.round_hook = Some(stepper.hook());
        (start_with(cfg).await, stepper)
    }

    pub fn new(permits: Option<usize>) -> Arc<Self> {
        Arc::new(Stepper { state: Mutex::new(StepperState { permits, blocked: false }), cv: Condvar::new() })
    }

    pub fn hook(self: &Arc<Self>) -> RoundHook {
        let me = self.clone();
        RoundHook(Arc::new(move || me.take()))
    }

    pub fn take(&self) {
        let mut s = self.state.lock().unwrap();
        while s.permits == Some(0) {
            s.blocked = true;
            s = self.cv.wait(s).unwrap();
        }
        s.blocked = false;
        if let Some(n) = s.permits.as_mut() {
            *n -= 1;
        }
    }

    pub fn grant(&self, n: usize) {
        let mut s = self.state.lock().unwrap();
        s.permits = Some(s.permits.unwrap_or(0) + n);
        s.blocked = false;
        self.cv.notify_all();
    }

    pub fn run_freely(&self) {
        let mut s = self.state.lock().unwrap();
        s.permits = None;
        s.blocked = false;
        self.cv.notify_all();
    }

    /// The engine used every permit and waits before its next round (the last one finished).
    pub fn blocked(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.blocked && s.permits == Some(0)
    }
}

/// A chat request tagged with `x-request-id: id`.
pub fn post(server: &TestServer, body: &Value, id: &str) -> reqwest::RequestBuilder {
    server.client.post(format!("{}/v1/chat/completions", server.base)).header("x-request-id", id).json(body)
}

/// Sends every request while the engine is held, then lets it run: they are admitted together.
pub async fn run_together(
    server: &TestServer,
    stepper: &Stepper,
    requests: &[Value],
    ids: &[&str],
) -> Vec<(u16, Value)> {
    let pending: Vec<_> = requests.iter().zip(ids).map(|(r, id)| tokio::spawn(post(server, r, id).send())).collect();
    eventually("all requests waiting", || server.state.engine.waiting() == requests.len()).await;
    stepper.run_freely();
    let mut out = Vec::new();
    for p in pending {
        let resp = p.await.unwrap().unwrap();
        let status = resp.status().as_u16();
        out.push((status, resp.json().await.unwrap()));
    }
    out
}

/// What must not change between batched and alone: text, finish reason, pruning, usage, and the
/// token logprobs (compared to 1e-4 separately).
fn answers(bodies: &[Value]) -> Vec<(Value, Value, Value, Value)> {
    bodies
        .iter()
        .map(|b| {
            let c = &b["choices"][0];
            (c["message"].clone(), c["finish_reason"].clone(), b["pruning"].clone(), b["usage"].clone())
        })
        .collect()
}

/// The (token, logprob) pairs of a completion's logprobs.
pub fn token_logprobs(body: &Value) -> Vec<(String, f64)> {
    body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["token"].as_str().unwrap().to_string(), t["logprob"].as_f64().unwrap()))
        .collect()
}

/// The same answers, pruning reports and usage, and logprobs within 1e-4.
pub fn assert_same_answers(batched: &[Value], alone: &[Value]) {
    assert_eq!(answers(batched), answers(alone));
    for (i, (b, a)) in batched.iter().zip(alone).enumerate() {
        let (lb, la) = (token_logprobs(b), token_logprobs(a));
        assert_eq!(lb.len(), la.len(), "request {i}");
        for ((tb, pb), (ta, pa)) in lb.into_iter().zip(la) {
            assert_eq!(tb, ta, "request {i}");
            assert!((pb - pa).abs() <= 1e-4, "request {i}: {pb} vs {pa}");
        }
    }
}
