//! Issue 12 over HTTP on 127.0.0.1: the calibration data root, limits checked before the work,
//! recipe import errors, pagination, request integrity, auth, and restart accounting.

mod http_common;

use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use http_common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken";

async fn call(s: &TestServer, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
    admin_call(s, TOKEN, method, path, body).await
}

async fn raw(s: &TestServer, path: &str, auth: &str, body: &str) -> (StatusCode, Value) {
    let resp = s
        .client
        .post(format!("{}{path}", s.base))
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(name)).unwrap()
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn datasets_are_read_only_inside_the_data_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::write(root.join("images/wide.png"), fixture("wide.png")).unwrap();
    std::fs::write(
        root.join("calib.jsonl"),
        "{\"question_id\": 1, \"image\": \"wide.png\", \"text\": \"What is in the image?\"}\n",
    )
    .unwrap();
    // A file outside the root holding a JSON string, as in the report: it must never come back.
    std::fs::write(tmp.path().join("secret.jsonl"), "\"the password is hunter2\"\n").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret.jsonl"), root.join("link.jsonl")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(root.join("fifo")).status().unwrap().success());

    // Without a root, dataset input is refused with how to enable it.
    let off = start(&["--admin-token", TOKEN]).await;
    let body = json!({"budgets": [0.5], "dataset": {"path": "calib.jsonl", "image_dir": "images"}});
    let (status, err) = call(&off, Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_error(StatusCode::from_u16(status.as_u16()).unwrap(), &err, 400, Some("dataset"));
    assert!(err["error"]["message"].as_str().unwrap().contains("--calibration-data-dir"), "{err}");

    let s = start(&["--admin-token", TOKEN, "--calibration-data-dir", root.to_str().unwrap()]).await;
    let secret = tmp.path().join("secret.jsonl");
    let escapes = [
        "../secret.jsonl".to_string(),
        secret.display().to_string(),
        "link.jsonl".into(),
        "/etc/passwd".into(),
        "/dev/zero".into(),
        "fifo".into(),
        "does-not-exist.jsonl".into(),
        "images".into(),
    ];
    let mut messages = Vec::new();
    for path in &escapes {
        let body = json!({"budgets": [0.5], "dataset": {"path": path, "image_dir": "images"}});
        // A FIFO or /dev/zero must not hang the request or grow memory: bounded in time.
        let (status, err) =
            tokio::time::timeout(Duration::from_secs(10), call(&s, Method::POST, "/admin/calibrate", Some(&body)))
                .await
                .unwrap_or_else(|_| panic!("{path}: the request hung"));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {err}");
        assert_eq!(
            (err["error"]["param"].as_str(), code(&err)),
            (Some("dataset.path"), "dataset_unreadable"),
            "{path}"
        );
        let m = err["error"]["message"].as_str().unwrap().to_string();
        assert!(!m.contains("hunter2") && !m.contains("root:"), "{path}: {m}");
        messages.push(m.replace(path.as_str(), "P"));
    }
    // Missing and not-allowed paths read the same.
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:?}");
    assert_eq!(s.get("/health").await.0, 200, "nothing blocked the runtime");

    // An image entry escaping the root is refused the same way, naming the line.
    std::fs::write(
        root.join("escape.jsonl"),
        "{\"question_id\": 1, \"image\": \"../../secret.jsonl\", \"text\": \"q\"}\n",
    )
    .unwrap();
    let body = json!({"budgets": [0.5], "dataset": {"path": "escape.jsonl", "image_dir": "images"}});
    let (status, err) = call(&s, Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!((status, code(&err)), (StatusCode::BAD_REQUEST, "dataset_unreadable"), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("line 1"), "{err}");

    // The sample cap is checked on the lines, before any image is read (these images do not exist).
    let line = "{\"question_id\": 1, \"image\": \"missing.png\", \"text\": \"q\"}\n";
    std::fs::write(root.join("big.jsonl"), line.repeat(513)).unwrap();
    let body = json!({"budgets": [0.5], "dataset": {"path": "big.jsonl", "image_dir": "images"}});
    let (status, err) = call(&s, Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!((status, code(&err)), (StatusCode::BAD_REQUEST, "invalid_dataset"), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("more than 512"), "{err}");

    // A good dataset inside the root runs.
    let body = json!({"budgets": [0.5], "dataset": {"path": "calib.jsonl", "image_dir": "images"}});
    let (status, created) = call(&s, Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let (_, job) = call(&s, Method::GET, &format!("/admin/jobs/{}", created["id"].as_str().unwrap()), None).await;
    assert_eq!(job["samples"], 1, "{job}");
}

#[tokio::test]
async fn limits_are_checked_before_fetching_or_decoding() {
    let s = start(&["--admin-token", TOKEN]).await;
    // 65 samples whose images are not even valid: the count is refused first.
    let bad = json!({"image": "data:image/png;base64,AAAA", "prompt": "q"});
    let body = json!({"budgets": [0.5], "samples": vec![bad; 65]});
    let (status, err) = call(&s, Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("samples")), "{err}");

    // Budgets: duplicates collapse, more than 16 distinct are refused.
    let sample = json!([{"image": data_url(&png(32, 32)), "prompt": "q"}]);
    let body = json!({"budgets": [0.5, 0.5, 0.3, 0.5], "samples": sample});
    let (status, created) = call(&s, Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let (_, job) = call(&s, Method::GET, &format!("/admin/jobs/{}", created["id"].as_str().unwrap()), None).await;
    assert_eq!(job["budgets"], json!([0.5, 0.3]), "{job}");
    let many: Vec<f64> = (1..=17).map(|i| f64::from(i) / 20.0).collect();
    let (status, err) =
        call(&s, Method::POST, "/admin/calibrate", Some(&json!({"budgets": many, "samples": sample}))).await;
    assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("budgets")), "{err}");
}

#[tokio::test]
async fn recipe_import_errors_are_4xx_and_lists_paginate() {
    let s = start(&["--admin-token", TOKEN]).await;
    let cases = [
        (json!({"deletions": [1u64 << 63, 1u64 << 63, 0, 0]}), "deletions", "invalid_recipe"),
        (json!({"deletions": [1, 1, 0, 0], "job_id": "job_nope"}), "job_id", "job_not_found"),
        (json!({"deletions": [1, 1, 0, 0], "visual_tokens": 1u64 << 63}), "deletions", "invalid_recipe"),
        (json!({"deletions": [1, 1, 0, 0], "samples": u64::MAX}), "deletions", "invalid_recipe"),
    ];
    for (body, param, want) in cases {
        let (status, err) = call(&s, Method::POST, "/admin/recipes", Some(&body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!((err["error"]["param"].as_str(), code(&err)), (Some(param), want), "{body}: {err}");
    }

    let mut ids = Vec::new();
    for b in [0.1, 0.2, 0.3] {
        let (status, r) =
            call(&s, Method::POST, "/admin/recipes", Some(&json!({"deletions": [1, 0, 0, 0], "budget": b}))).await;
        assert_eq!(status, StatusCode::CREATED, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    let (_, p1) = call(&s, Method::GET, "/admin/recipes?limit=2", None).await;
    assert_eq!((p1["object"].as_str(), p1["has_more"].as_bool()), (Some("list"), Some(true)), "{p1}");
    assert_eq!(p1["data"].as_array().unwrap().len(), 2);
    assert_eq!((p1["first_id"].as_str(), p1["last_id"].as_str()), (Some(ids[0].as_str()), Some(ids[1].as_str())));
    let (_, p2) = call(&s, Method::GET, &format!("/admin/recipes?limit=2&after={}", ids[1]), None).await;
    assert_eq!((p2["data"].as_array().unwrap().len(), p2["has_more"].as_bool()), (1, Some(false)), "{p2}");
    assert_eq!(p2["data"][0]["id"], ids[2].as_str());
    for (query, param) in [("limit=0", "limit"), ("limit=101", "limit"), ("after=rcp_nope", "after")] {
        let (status, err) = call(&s, Method::GET, &format!("/admin/recipes?{query}"), None).await;
        assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{query}: {err}");
    }
    let (status, err) = call(&s, Method::GET, "/admin/jobs?limit=many", None).await;
    assert_eq!((status, code(&err)), (StatusCode::BAD_REQUEST, "invalid_type"), "{err}");
    let (_, jobs) = call(&s, Method::GET, "/admin/jobs?limit=5", None).await;
    assert_eq!((jobs["object"].as_str(), jobs["has_more"].as_bool()), (Some("list"), Some(false)), "{jobs}");
    assert!(jobs["first_id"].is_null() && jobs["data"].as_array().unwrap().is_empty(), "{jobs}");
}

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn request_integrity_and_auth() {
    let s = start(&["--admin-token", TOKEN, "--api-key", "k3y"]).await;
    let chat = r#"{"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}"#;
    // The Bearer scheme in any case; trailing data after the JSON value is refused everywhere.
    for auth in ["Bearer k3y", "bearer k3y", "BEARER k3y"] {
        let (status, body) = raw(&s, "/v1/chat/completions", auth, chat).await;
        assert_eq!(status, StatusCode::OK, "{auth}: {body}");
    }
    let (status, _) = raw(&s, "/v1/chat/completions", "Basic k3y", chat).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, err) = raw(&s, "/v1/chat/completions", "Bearer k3y", &format!("{chat} xyz")).await;
    assert_eq!((status, code(&err)), (StatusCode::BAD_REQUEST, "invalid_json"), "{err}");
    let (status, err) = raw(&s, "/admin/recipes", "bearer t0ken", r#"{"deletions": [0, 0, 0, 0]} {}"#).await;
    assert_eq!((status, code(&err)), (StatusCode::BAD_REQUEST, "invalid_json"), "{err}");

    // Truncated images are refused naming the part.
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    }));
    for (format, mime) in [(image::ImageFormat::Jpeg, "jpeg"), (image::ImageFormat::Png, "png")] {
        let whole = encode(&img, format);
        let half = &whole[..whole.len() / 2];
        let url = format!("data:image/{mime};base64,{}", base64_encode(half));
        let body = json!({"model": "demo", "max_tokens": 1, "messages": user_with_images("what?", &[&url])});
        let resp = s
            .client
            .post(format!("{}/v1/chat/completions", s.base))
            .bearer_auth("k3y")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let err: Value = resp.json().await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{mime}: {err}");
        assert_eq!(err["error"]["param"], "messages[0].content[0].image_url.url", "{mime}: {err}");
        assert_eq!(code(&err), "invalid_image");
    }

    // max_tokens beyond what the context leaves is a 400 naming the parameter (demo context 4096).
    for param in ["max_tokens", "max_completion_tokens"] {
        let body = json!({"model": "demo", param: 5000, "messages": [{"role": "user", "content": "hi"}]});
        let resp = s
            .client
            .post(format!("{}/v1/chat/completions", s.base))
            .bearer_auth("k3y")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let err: Value = resp.json().await.unwrap();
        assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{err}");
        assert_eq!(code(&err), "context_length_exceeded");
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn jobs_failed_by_a_restart_are_counted_as_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("r.db");
    let url = format!("sqlite://{}", db.display());
    {
        let pool = fitprune::store::open(&url).await.unwrap();
        for id in ["job_a", "job_b"] {
            let job = fitprune::store::jobs::NewJob {
                id,
                model_fingerprint: "x",
                name: None,
                budgets: &[0.5],
                tolerance: 0.01,
                samples: 1,
                created_at: "2026-01-01T00:00:00Z",
            };
            fitprune::store::jobs::create(&pool, &job).await.unwrap();
        }
        pool.close().await;
    }
    let s = start(&["--database-url", &url]).await;
    let text = s.metrics().await;
    assert_eq!(metric(&text, r#"fitprune_calibration_jobs_total{status="failed"}"#), Some(2.0), "{text}");
}

/// A recipe store that always fails, as a broken database would.
struct BrokenStore;

impl fitprune::engine::recipes::RecipeSource for BrokenStore {
    fn for_model<'a>(
        &'a self,
        _: &'a fitprune::engine::ModelInfo,
    ) -> futures::future::BoxFuture<
        'a,
        Result<Vec<std::sync::Arc<fitprune::pruning::Recipe>>, fitprune::engine::recipes::RecipeError>,
    > {
        Box::pin(async { Err(fitprune::engine::recipes::RecipeError::Store("disk I/O error at page 7".into())) })
    }
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn a_server_fault_is_a_generic_500_logged_with_the_request_id() {
    // A current-thread test runtime: the handler runs on this thread, under this subscriber.
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (mut state, _worker, _recipes) = fitprune::server::start(&args(&[]).validate().unwrap()).await.unwrap();
    wait_ready(&state).await;
    state.recipes = std::sync::Arc::new(BrokenStore);
    let s = serve(state).await;
    let body = json!({"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
        "pruning": {"budget": 0.5}});
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.base))
        .header("x-request-id", "req-fault-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp.headers()["x-request-id"], "req-fault-42");
    let err: Value = resp.json().await.unwrap();
    assert_eq!((err["error"]["type"].as_str(), code(&err)), (Some("server_error"), "internal_error"), "{err}");
    assert!(!err.to_string().contains("disk I/O"), "the body must not carry internals: {err}");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text.lines().find(|l| l.contains("request failed")).unwrap_or_else(|| panic!("no error line:\n{text}"));
    assert!(line.contains("req-fault-42") && line.contains("disk I/O error at page 7"), "{line}");
}

#[tokio::test]
async fn concurrent_requests_share_the_decoded_image_budget() {
    // 1 MiB for everyone; each request's image decodes to 1.7 MiB, so they take turns.
    let s = start(&["--max-decoded-image-mib", "1"]).await;
    let budget = s.state.fetcher.decode_budget().clone();
    assert_eq!(budget.available_kib(), 1024);
    let url = data_url(&png(1000, 600));
    let body = json!({"model": "demo", "max_tokens": 1, "messages": user_with_images("what?", &[&url])});
    let (a, b) = tokio::join!(s.chat(&body), s.chat(&body));
    assert_eq!(a.0, StatusCode::OK, "{}", a.2);
    assert_eq!(b.0, StatusCode::OK, "{}", b.2);
    assert_eq!(budget.available_kib(), 1024, "every reservation is returned");
}
