//! Admin API over HTTP on 127.0.0.1: calibration jobs end to end, recipe selection in chat
//! requests, auth, validation, cancellation, restarts, and chat service during calibration.

mod http_common;

use std::path::Path;
use std::time::{Duration, Instant};

use http_common::{admin_call, args, assert_error, data_url, start_stoppable, start_with, StoppableServer, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-admin";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(name)).unwrap()
}

async fn server(db: &Path, extra: &[&str]) -> TestServer {
    let url = format!("sqlite://{}", db.display());
    let mut flags = vec!["--database-url", url.as_str()];
    flags.extend_from_slice(extra);
    start_with(args(&flags).validate().unwrap()).await
}

async fn admin(s: &TestServer, method: reqwest::Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
    admin_call(s, TOKEN, method, path, body).await
}

fn samples(n: usize) -> Value {
    let images = ["wide.png", "tall.png", "square.png"];
    let prompts = ["What is in the image?", "Describe the colours.", "Is anything unusual here?", "Describe it."];
    Value::Array(
        (0..n).map(|i| json!({"image": data_url(&fixture(images[i % 3])), "prompt": prompts[i % 4]})).collect(),
    )
}

async fn wait_job(s: &TestServer, id: &str, until: &[&str]) -> Value {
    let start = Instant::now();
    loop {
        let (status, job) = admin(s, reqwest::Method::GET, &format!("/admin/jobs/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        if until.contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "job stuck: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn calibrate_then_serve_pruned_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("fp.db");
    let s = server(&db, &["--admin-token", TOKEN]).await;
    let body = json!({"budgets": [0.3, 0.6], "samples": samples(3), "name": "t"});
    let resp =
        s.client.post(format!("{}/admin/calibrate", s.base)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["status"], "queued");
    assert_eq!(location, format!("/admin/jobs/{}", created["id"].as_str().unwrap()));

    let job = wait_job(&s, created["id"].as_str().unwrap(), &["succeeded", "failed"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["recipe_ids"].as_array().unwrap().len(), 2);
    assert_eq!(job["progress"]["done"], job["progress"]["total"]);

    let (_, listed) = admin(&s, reqwest::Method::GET, "/admin/recipes?model=loaded", None).await;
    let recipes = listed["data"].as_array().unwrap().clone();
    assert_eq!(recipes.len(), 2);
    let low = recipes.iter().find(|r| r["budget"] == 0.3).unwrap().clone();

    // 0.5 selects the 0.3 recipe (largest budget not above the request).
    let chat = json!({"model": "demo", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&fixture("square.png"))}},
            {"type": "text", "text": "Describe it."}]}],
        "pruning": {"budget": 0.5}});
    let (status, headers, out) = s.chat(&chat).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["pruning"]["recipe_id"], low["id"]);
    assert_eq!(headers["x-fitprune-recipe"].to_str().unwrap(), low["id"].as_str().unwrap());
    assert!(out["pruning"]["visual_tokens_kept"].as_u64().unwrap() < out["pruning"]["visual_tokens"].as_u64().unwrap());

    // The same recipe through the CLI gives the same answer.
    let recipe_file = tmp.path().join("r.json");
    std::fs::write(&recipe_file, serde_json::to_string(&low).unwrap()).unwrap();
    let image = tmp.path().join("square.png");
    std::fs::write(&image, fixture("square.png")).unwrap();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_fitprune"))
        .args(["generate", "--model", http_common::demo_dir().to_str().unwrap(), "--image", image.to_str().unwrap()])
        .args(["--prompt", "Describe it.", "--max-tokens", "6", "--json", "--recipe", recipe_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(out["choices"][0]["message"]["content"], cli["text"]);

    // Unpruned on request, and when no recipe is at or below the budget.
    let (_, _, off) = s.chat(&with_pruning(&chat, json!("off"))).await;
    assert!(off["pruning"]["recipe_id"].is_null(), "{off}");
    let (_, _, none) = s.chat(&with_pruning(&chat, json!({"budget": 0.1}))).await;
    assert!(none["pruning"]["recipe_id"].is_null(), "{none}");

    // Deleting a recipe takes effect for the next request.
    let (st, _) =
        admin(&s, reqwest::Method::DELETE, &format!("/admin/recipes/{}", low["id"].as_str().unwrap()), None).await;
    assert_eq!(st, StatusCode::OK);
    let (_, _, after) = s.chat(&chat).await;
    assert!(after["pruning"]["recipe_id"].is_null(), "{after}");

    // Restart on the same database: the remaining recipe is still there.
    drop(s);
    let s = server(&db, &["--admin-token", TOKEN]).await;
    let (_, listed) = admin(&s, reqwest::Method::GET, "/admin/recipes", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
}

/// `chat` with another `pruning` field.
fn with_pruning(chat: &Value, pruning: Value) -> Value {
    let mut m = chat.clone();
    m["pruning"] = pruning;
    m
}

#[tokio::test]
async fn auth_and_validation_errors_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let off = server(&tmp.path().join("a.db"), &[]).await;
    let resp = off.client.get(format!("{}/admin/jobs", off.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("--admin-token"), "{body}");

    let s = server(&tmp.path().join("b.db"), &["--admin-token", TOKEN]).await;
    let url = format!("{}/admin/calibrate", s.base);
    let good = json!({"budgets": [0.5], "samples": samples(1)});
    for auth in [None, Some("wrong")] {
        let mut req = s.client.post(&url).json(&good);
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        assert_error(status, &resp.json().await.unwrap(), 401, None);
    }
    let cases = [
        (json!({"budgets": [], "samples": samples(1)}), "budgets"),
        (json!({"budgets": [1.2], "samples": samples(1)}), "budgets[0]"),
        (json!({"budgets": [0.5], "samples": []}), "samples"),
        (
            json!({"budgets": [0.5], "samples": [{"image": "data:image/png;base64,AAAA", "prompt": "x"}]}),
            "samples[0].image",
        ),
        (json!({"budgets": [0.5], "samples": samples(1), "tolerance": 0}), "tolerance"),
    ];
    for (body, param) in cases {
        let (status, err) = admin(&s, reqwest::Method::POST, "/admin/calibrate", Some(&body)).await;
        assert_error(status, &err, 400, Some(param));
    }
    let (status, err) = admin(&s, reqwest::Method::GET, "/admin/jobs/job_nope", None).await;
    assert_error(status, &err, 404, Some("id"));
    let (status, err) = admin(&s, reqwest::Method::GET, "/admin/recipes/rcp_nope", None).await;
    assert_error(status, &err, 404, Some("id"));
    let (status, err) = admin(&s, reqwest::Method::POST, "/admin/recipes", Some(&json!({"deletions": [1, 2]}))).await;
    assert_error(status, &err, 400, Some("deletions"));
    let (status, err) =
        admin(&s, reqwest::Method::POST, "/admin/recipes", Some(&json!({"scheme": "authors-llava15-7b-50"}))).await;
    assert_error(status, &err, 400, Some("deletions"));
    let (_, jobs) = admin(&s, reqwest::Method::GET, "/admin/jobs", None).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 0, "failed validation creates no job");

    // An unknown recipe id in a chat request is a 404.
    let chat = json!({"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
        "pruning": {"recipe_id": "rcp_missing"}});
    let (status, _, err) = s.chat(&chat).await;
    assert_error(status, &err, 404, Some("pruning.recipe_id"));

    // A valid import works and is listed.
    let (status, r) =
        admin(&s, reqwest::Method::POST, "/admin/recipes", Some(&json!({"deletions": [20, 10, 0, 0], "budget": 0.2})))
            .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(r["visual_tokens"], 144);
}

#[tokio::test]
async fn cancel_a_running_job_and_keep_serving_chat_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp.path().join("c.db"), &["--admin-token", TOKEN]).await;
    let body = json!({"budgets": [0.2, 0.4, 0.6, 0.8], "samples": samples(12), "tolerance": 0.001});
    let (status, created) = admin(&s, reqwest::Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    wait_job(&s, &id, &["running"]).await;

    // Chat requests complete while the job is still running.
    let chat = json!({"model": "demo", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]});
    for _ in 0..3 {
        let (status, _, out) = s.chat(&chat).await;
        assert_eq!(status, StatusCode::OK, "{out}");
    }
    let (_, job) = admin(&s, reqwest::Method::GET, &format!("/admin/jobs/{id}"), None).await;
    assert_eq!(job["status"], "running", "calibration must still be running: {job}");

    let (status, _) = admin(&s, reqwest::Method::DELETE, &format!("/admin/jobs/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let job = wait_job(&s, &id, &["cancelled", "succeeded", "failed"]).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let (_, listed) = admin(&s, reqwest::Method::GET, "/admin/recipes", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "a cancelled job stores nothing");
    let (status, err) = admin(&s, reqwest::Method::DELETE, &format!("/admin/jobs/{id}"), None).await;
    assert_error(status, &err, 400, Some("id"));
}

#[tokio::test]
async fn a_job_interrupted_by_a_restart_is_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("d.db");
    {
        let rt_pool = fitprune::store::open(&format!("sqlite://{}", db.display())).await.unwrap();
        let job = fitprune::store::jobs::NewJob {
            id: "job_old",
            model_fingerprint: "x",
            name: None,
            budgets: &[0.5],
            tolerance: 0.01,
            samples: 2,
            created_at: "2026-01-01T00:00:00Z",
        };
        fitprune::store::jobs::create(&rt_pool, &job).await.unwrap();
        fitprune::store::jobs::start(&rt_pool, "job_old", "2026-01-01T00:00:01Z").await.unwrap();
        rt_pool.close().await;
    }
    let s = server(&db, &["--admin-token", TOKEN]).await;
    let (_, job) = admin(&s, reqwest::Method::GET, "/admin/jobs/job_old", None).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"], "interrupted by restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_at_shutdown_is_recorded_as_interrupted_before_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("s.db");
    let url = format!("sqlite://{}", db.display());
    let cfg = args(&["--database-url", &url, "--admin-token", TOKEN, "--shutdown-timeout", "0.2"]).validate().unwrap();
    let StoppableServer { server: s, stop: stop_tx, served } = start_stoppable(cfg).await;
    let body = json!({"budgets": [0.2, 0.4, 0.6, 0.8], "samples": samples(12), "tolerance": 0.001});
    let (status, created) = admin(&s, reqwest::Method::POST, "/admin/calibrate", Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    wait_job(&s, &id, &["running"]).await;
    drop(s);
    stop_tx.send(()).unwrap();
    served.await.unwrap().unwrap();

    // A new server on the same database finds the job already ended by the old one.
    let s = server(&db, &["--admin-token", TOKEN]).await;
    let (_, job) = admin(&s, reqwest::Method::GET, &format!("/admin/jobs/{id}"), None).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"], "interrupted: the server shut down", "{job}");
}
