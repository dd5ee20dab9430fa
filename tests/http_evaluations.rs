//! Evaluation jobs over HTTP on the trained demo model (tests/fixtures/trained-demo): inline
//! labelled samples and a data-root dataset evaluated end to end, each result row checked
//! against the shared runner (`fitprune::eval::evaluate`) on the same samples and recipes;
//! listing, cancellation with chat served meanwhile, bad input, auth, and shutdown.

mod http_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fitprune::eval::recipes::{calibrate_recipes, load_images, match_budgets};
use fitprune::eval::{evaluate, load_eval_dataset, EvalPlan, EvalReport, Method, Quiet};
use fitprune::model::llava::LoadOptions;
use fitprune::model::LlavaModel;
use fitprune::pruning::calibrate::Silent;
use fitprune::pruning::Recipe;
use http_common::{
    admin_call, args_for, assert_error, data_url, start_stoppable, start_with, StoppableServer, TestServer,
};
use reqwest::{Method as Http, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "eval-admin";

fn trained() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-demo")
}

/// The held-out set's lines as JSON.
fn eval_lines() -> Vec<Value> {
    let text = std::fs::read_to_string(trained().join("eval/eval.jsonl")).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Held-out items `range` as inline samples, with their labels.
fn inline(range: std::ops::Range<usize>) -> Value {
    let lines = eval_lines();
    Value::Array(
        lines[range]
            .iter()
            .map(|l| {
                let image = std::fs::read(trained().join("eval").join(l["image"].as_str().unwrap())).unwrap();
                json!({"image": data_url(&image), "prompt": l["text"], "answer": l["answer"],
                    "question_id": l["question_id"]})
            })
            .collect(),
    )
}

/// A data root holding held-out items `range` as `set/set.jsonl` with its images beside it.
fn data_root(dir: &Path, range: std::ops::Range<usize>) -> PathBuf {
    let root = dir.join("data");
    std::fs::create_dir_all(root.join("set/images")).unwrap();
    let lines = eval_lines();
    let mut jsonl = String::new();
    for l in &lines[range] {
        let image = l["image"].as_str().unwrap();
        std::fs::copy(trained().join("eval").join(image), root.join("set").join(image)).unwrap();
        jsonl.push_str(&format!("{l}\n"));
    }
    std::fs::write(root.join("set/set.jsonl"), jsonl).unwrap();
    std::fs::write(dir.join("outside.jsonl"), "{}\n").unwrap();
    // The committed calibration subset, as `calib/calib.jsonl` with `calib/images/`.
    std::fs::create_dir_all(root.join("calib/images")).unwrap();
    let calib = trained().join("calib");
    std::fs::copy(calib.join("calib.jsonl"), root.join("calib/calib.jsonl")).unwrap();
    for entry in std::fs::read_dir(calib.join("images")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), root.join("calib/images").join(entry.file_name())).unwrap();
    }
    root
}

async fn server(dir: &Path, extra: &[&str]) -> TestServer {
    let url = format!("sqlite://{}", dir.join("fp.db").display());
    let mut flags = vec!["--database-url", url.as_str(), "--admin-token", TOKEN];
    flags.extend_from_slice(extra);
    start_with(args_for(&trained().join("model"), &flags).validate().unwrap()).await
}

async fn admin(s: &TestServer, method: Http, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
    admin_call(s, TOKEN, method, path, body).await
}

async fn wait_eval(s: &TestServer, id: &str, until: &[&str]) -> Value {
    let start = Instant::now();
    loop {
        let (status, job) = admin(s, Http::GET, &format!("/admin/evaluations/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        if until.contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "evaluation stuck: {job}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Imports two recipes sized to the loaded model (budget labels 0.3 and 0.5); returns them.
async fn import_recipes(s: &TestServer) -> Vec<Recipe> {
    let info = &s.state.engine.ready().unwrap().info;
    let (n, layers) = (info.image_tokens, info.layers);
    let mut out = Vec::new();
    for (budget, deletions) in [(0.3, vec![0, n / 3]), (0.5, vec![n / 6, n / 3, n / 6])] {
        let mut d = deletions;
        d.resize(layers, 0);
        let body = json!({"deletions": d, "budget": budget, "name": format!("t{budget}")});
        let (status, r) = admin(s, Http::POST, "/admin/recipes", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{r}");
        out.push(serde_json::from_value(r).unwrap());
    }
    out
}

async fn post_eval(s: &TestServer, body: &Value) -> String {
    let resp =
        s.client.post(format!("{}/admin/evaluations", s.base)).bearer_auth(TOKEN).json(body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["status"], "queued");
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/admin/evaluations/{id}"));
    id
}

/// What the shared runner reports for held-out items `range` with the same plan.
fn direct(range: std::ops::Range<usize>, budgets: &[(f64, Option<Recipe>)], methods: &[Method]) -> EvalReport {
    let model = LlavaModel::load(&trained().join("model"), LoadOptions::default()).unwrap();
    let all = load_eval_dataset(&trained().join("eval/eval.jsonl"), &trained().join("eval"), None).unwrap();
    let samples = all[range].to_vec();
    let images = load_images(&samples).unwrap();
    let plan =
        EvalPlan { methods: methods.to_vec(), budgets: budgets.to_vec(), max_tokens: 6, seed: 3, fastv_layer: 1 };
    evaluate(&model, &samples, &images, &plan, &mut Quiet).unwrap()
}

/// The job's rows equal the runner's, row for row, and make sense on their own.
fn assert_rows_match(job: &Value, want: &EvalReport, recipes: &[Option<&Recipe>], methods: &[Method]) {
    let rows = job["rows"].as_array().unwrap();
    assert_eq!(rows.len(), want.rows.len(), "{job}");
    assert_eq!(job["samples"], want.samples);
    assert_eq!(job["labelled"], want.labelled);
    assert_eq!(job["progress"]["done"], job["progress"]["total"]);
    assert_eq!(job["progress"]["done"], want.samples);
    assert!((job["visual_tokens"].as_f64().unwrap() - want.visual_tokens).abs() < 1e-9);
    for (i, (got, w)) in rows.iter().zip(&want.rows).enumerate() {
        let recipe = recipes[i / methods.len()];
        assert_eq!(got["method"], w.method.name(), "row {i}");
        assert_eq!(got["method"], methods[i % methods.len()].name(), "row {i}");
        assert_eq!(got["budget"].as_f64().unwrap(), w.budget, "row {i}");
        assert_eq!(got["recipe_id"].as_str(), recipe.map(|r| r.id.as_str()), "row {i}");
        assert_eq!(got["accuracy"].as_f64(), w.accuracy, "row {i}: {got}");
        for (key, value) in [
            ("agreement", w.agreement),
            ("top1_agreement", w.top1_agreement),
            ("flops_reduction", w.flops_reduction),
            ("visual_tokens_kept", w.visual_tokens_kept),
        ] {
            assert!((got[key].as_f64().unwrap() - value).abs() < 1e-9, "row {i} {key}: {got} vs {value}");
        }
        let kl = got["kl_mean"].as_f64().unwrap();
        assert!((kl - w.kl_mean).abs() < 1e-6, "row {i}: kl {kl} vs {}", w.kl_mean);
        assert!(got["ttft_ms"].as_f64().unwrap() > 0.0, "{got}");
        if w.budget == 0.0 {
            // The unpruned row is a second unpruned pass: it reproduces the reference.
            assert_eq!((got["agreement"].as_f64(), got["kl_mean"].as_f64()), (Some(1.0), Some(0.0)), "{got}");
            assert_eq!(got["flops_reduction"].as_f64(), Some(0.0));
        } else {
            assert!(got["flops_reduction"].as_f64().unwrap() > 0.0, "{got}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_and_dataset_evaluations_match_the_shared_runner() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path(), 6..10);
    let s = server(tmp.path(), &["--calibration-data-dir", root.to_str().unwrap()]).await;
    let recipes = import_recipes(&s).await;
    let all = [Method::Fitprune, Method::Random, Method::Fastv];

    let inline_body = json!({"budgets": [0, 0.3, 0.55], "samples": inline(0..6), "max_new_tokens": 6, "seed": 3,
        "name": "inline"});
    let inline_id = post_eval(&s, &inline_body).await;
    let dataset_body = json!({"budgets": [0, 0.5], "methods": ["fitprune", "random"], "max_new_tokens": 6,
        "seed": 3, "dataset": {"path": "set/set.jsonl"}});
    let dataset_id = post_eval(&s, &dataset_body).await;

    let job = wait_eval(&s, &inline_id, &["succeeded", "failed", "cancelled"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // 0.55 takes the largest recipe at or below it, the 0.5 one.
    let planned = vec![(0.0, None), (0.3, Some(recipes[0].clone())), (0.55, Some(recipes[1].clone()))];
    let want = direct(0..6, &planned, &all);
    assert_eq!(want.labelled, 6);
    assert_rows_match(&job, &want, &[None, Some(&recipes[0]), Some(&recipes[1])], &all);
    assert_eq!(job["recipe_ids"], json!([null, recipes[0].id, recipes[1].id]));

    let job = wait_eval(&s, &dataset_id, &["succeeded", "failed", "cancelled"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let two = [Method::Fitprune, Method::Random];
    let want = direct(6..10, &[(0.0, None), (0.5, Some(recipes[1].clone()))], &two);
    assert_rows_match(&job, &want, &[None, Some(&recipes[1])], &two);

    // Listed newest first, a page at a time.
    let (status, page) = admin(&s, Http::GET, "/admin/evaluations?limit=1", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!((page["data"].as_array().unwrap().len(), page["has_more"].as_bool()), (1, Some(true)));
    let first = page["last_id"].as_str().unwrap().to_string();
    let (_, rest) = admin(&s, Http::GET, &format!("/admin/evaluations?limit=5&after={first}"), None).await;
    let mut ids: Vec<String> = vec![first];
    ids.extend(rest["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()));
    ids.sort();
    let mut both = vec![inline_id, dataset_id];
    both.sort();
    assert_eq!(ids, both);
    assert_eq!(rest["has_more"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_fitted_on_a_calibration_dataset_are_the_cli_calibrations() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path(), 0..1);
    let s = server(tmp.path(), &["--calibration-data-dir", root.to_str().unwrap()]).await;
    // No stored recipes: the budgets are realised by calibrating on the spot.
    let body = json!({"budgets": [0, 0.5], "methods": ["fitprune", "fastv"], "samples": inline(0..4),
        "max_new_tokens": 6, "seed": 3, "calibration_dataset": {"path": "calib/calib.jsonl"}});
    let id = post_eval(&s, &body).await;
    let job = wait_eval(&s, &id, &["succeeded", "failed", "cancelled"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let model = LlavaModel::load(&trained().join("model"), LoadOptions::default()).unwrap();
    let calib = load_eval_dataset(&trained().join("calib/calib.jsonl"), &trained().join("calib"), None).unwrap();
    let fitted = calibrate_recipes(&model, &calib, &[0.0, 0.5], "test", &mut Silent).unwrap();
    let (planned, missing) = match_budgets(&[0.0, 0.5], &fitted);
    assert!(missing.is_empty());
    let methods = [Method::Fitprune, Method::Fastv];
    let want = direct(0..4, &planned, &methods);
    // Fitted recipes are not stored: rows name the recipe but no id.
    assert_rows_match(&job, &want, &[None, None], &methods);
    assert_eq!(job["rows"][2]["recipe"], "fitprune-50", "{job}");
    let (_, recipes) = admin(&s, Http::GET, "/admin/recipes", None).await;
    assert_eq!(recipes["data"].as_array().unwrap().len(), 0, "nothing stored");

    let both = json!({"budgets": [0.5], "samples": inline(0..1), "recipe_ids": ["x"],
        "calibration_dataset": {"path": "calib/calib.jsonl"}});
    let (status, err) = admin(&s, Http::POST, "/admin/evaluations", Some(&both)).await;
    assert_error(status, &err, 400, Some("calibration_dataset"));
    let outside =
        json!({"budgets": [0.5], "samples": inline(0..1), "calibration_dataset": {"path": "../outside.jsonl"}});
    let (status, err) = admin(&s, Http::POST, "/admin/evaluations", Some(&outside)).await;
    assert_eq!(assert_error(status, &err, 400, Some("calibration_dataset.path"))["code"], "dataset_unreadable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_evaluation_and_keep_serving_chat_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(tmp.path(), &[]).await;
    import_recipes(&s).await;
    // Long enough to still be running after a few chat requests: 64 samples x 7 answers.
    let body = json!({"budgets": [0, 0.3, 0.5], "samples": inline(0..64), "max_new_tokens": 32});
    let id = post_eval(&s, &body).await;
    wait_eval(&s, &id, &["running"]).await;

    let image = std::fs::read(trained().join("eval/images/eval_00000.png")).unwrap();
    let chat = json!({"model": "demo", "max_tokens": 4, "temperature": 0,
        "messages": http_common::user_with_images("Is there a circle?", &[&data_url(&image)])});
    for _ in 0..3 {
        let (status, _, out) = s.chat(&chat).await;
        assert_eq!(status, StatusCode::OK, "{out}");
    }
    let (_, job) = admin(&s, Http::GET, &format!("/admin/evaluations/{id}"), None).await;
    assert_eq!(job["status"], "running", "the evaluation must still be running: {job}");

    let (status, _) = admin(&s, Http::DELETE, &format!("/admin/evaluations/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let job = wait_eval(&s, &id, &["cancelled", "succeeded", "failed"]).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["rows"].as_array().unwrap().len(), 0, "a cancelled evaluation stores no rows");
    let (status, err) = admin(&s, Http::DELETE, &format!("/admin/evaluations/{id}"), None).await;
    assert_eq!(assert_error(status, &err, 400, Some("id"))["code"], "job_finished");
}

#[tokio::test]
async fn bad_input_and_missing_auth_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path(), 0..2);
    let s = server(tmp.path(), &["--calibration-data-dir", root.to_str().unwrap()]).await;
    let good = json!({"budgets": [0], "samples": inline(0..1)});
    for auth in [None, Some("wrong")] {
        let mut req = s.client.post(format!("{}/admin/evaluations", s.base)).json(&good);
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        assert_error(status, &resp.json().await.unwrap(), 401, None);
        let resp = s.client.get(format!("{}/admin/evaluations", s.base)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    import_recipes(&s).await;
    // 65 junk images: the count is refused before any image is parsed.
    let junk: Vec<Value> = (0..65).map(|_| json!({"image": "data:,", "prompt": "x"})).collect();
    let cases = [
        (json!({"budgets": [0.5], "dataset": {"path": "../outside.jsonl"}}), "dataset.path", "dataset_unreadable"),
        (json!({"budgets": [0.5], "dataset": {"path": "/etc/passwd"}}), "dataset.path", "dataset_unreadable"),
        (
            json!({"budgets": [0.5], "dataset": {"path": "set/set.jsonl", "image_dir": ".."}}),
            "dataset.image_dir",
            "dataset_unreadable",
        ),
        (json!({"budgets": [1.5], "samples": inline(0..1)}), "budgets[0]", "invalid_value"),
        (json!({"budgets": [0, 0.2], "samples": inline(0..1)}), "budgets[1]", "no_recipe"),
        (json!({"budgets": [0.5], "samples": junk}), "samples", "invalid_value"),
        (
            json!({"budgets": [0.5], "samples": inline(0..1), "methods": ["fitprune", "magic"]}),
            "methods[1]",
            "invalid_value",
        ),
        (
            json!({"budgets": [0.5], "samples": inline(0..1), "recipe_ids": ["rcp_nope"]}),
            "recipe_ids[0]",
            "recipe_not_found",
        ),
        (json!({"budgets": [0.5], "samples": inline(0..1), "fastv_layer": 99}), "fastv_layer", "invalid_value"),
        (json!({"budgets": [0.5], "samples": inline(0..1), "max_new_tokens": 0}), "max_new_tokens", "invalid_value"),
        (
            json!({"budgets": [0.5], "samples": inline(0..1), "dataset": {"path": "set/set.jsonl"}}),
            "dataset",
            "invalid_value",
        ),
        (
            json!({"budgets": [0.5], "samples": [{"image": "data:image/png;base64,AAAA", "prompt": "x"}]}),
            "samples[0].image",
            "invalid_image",
        ),
    ];
    for (body, param, code) in cases {
        let (status, err) = admin(&s, Http::POST, "/admin/evaluations", Some(&body)).await;
        let e = assert_error(status, &err, 400, Some(param));
        assert_eq!(e["code"], code, "{body}: {err}");
    }
    let (status, err) = admin(&s, Http::GET, "/admin/evaluations/eval_nope", None).await;
    assert_eq!(assert_error(status, &err, 404, Some("id"))["code"], "evaluation_not_found");
    let (status, err) = admin(&s, Http::GET, "/admin/evaluations?after=eval_nope", None).await;
    assert_error(status, &err, 400, Some("after"));
    let (_, listed) = admin(&s, Http::GET, "/admin/evaluations", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "failed validation creates no job");

    // Without a data root, datasets are refused; without an admin token, the whole API is.
    let plain = tempfile::tempdir().unwrap();
    let s = server(plain.path(), &[]).await;
    let body = json!({"budgets": [0], "dataset": {"path": "set/set.jsonl"}});
    let (status, err) = admin(&s, Http::POST, "/admin/evaluations", Some(&body)).await;
    assert_eq!(assert_error(status, &err, 400, Some("dataset"))["code"], "dataset_disabled");
    let off = start_with(args_for(&trained().join("model"), &[]).validate().unwrap()).await;
    let resp = off.client.get(format!("{}/admin/evaluations", off.base)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_running_at_shutdown_is_recorded_as_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", tmp.path().join("fp.db").display());
    let flags = ["--database-url", url.as_str(), "--admin-token", TOKEN, "--shutdown-timeout", "0.2"];
    let cfg = args_for(&trained().join("model"), &flags).validate().unwrap();
    let StoppableServer { server: s, stop: stop_tx, served } = start_stoppable(cfg).await;
    let id = post_eval(&s, &json!({"budgets": [0], "samples": inline(0..64), "max_new_tokens": 32})).await;
    wait_eval(&s, &id, &["running"]).await;
    drop(s);
    stop_tx.send(()).unwrap();
    served.await.unwrap().unwrap();

    // A new server on the same database finds the job already ended by the old one.
    let s = server(tmp.path(), &[]).await;
    let (_, job) = admin(&s, Http::GET, &format!("/admin/evaluations/{id}"), None).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"], "interrupted: the server shut down", "{job}");
}
