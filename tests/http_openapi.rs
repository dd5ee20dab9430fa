//! openapi.yaml and the server agree: the same routes and methods, and real responses only use
//! fields the document declares (with every required one present).

mod http_common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::Request;
use fitprune::api::ROUTES;
use http_common::*;
use serde_json::{json, Value};
use tower::ServiceExt;

fn document() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    serde_json::to_value(yaml).unwrap()
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        // Path items also hold shared `parameters`, which are not operations.
        for method in ops.as_object().unwrap().keys().filter(|k| *k != "parameters") {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[tokio::test]
async fn served_routes_and_the_document_agree() {
    let doc = document();
    assert_eq!(doc["openapi"].as_str().unwrap(), "3.1.0");
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented_routes(&doc), served);

    // Every documented operation is routed (not the unknown-route or wrong-method fallback).
    let server = start(&["--admin-token", "t"]).await;
    let app = fitprune::build_app(server.state.clone());
    let recipe_id = admin_post(&app, "/admin/recipes", json!({"deletions": [2, 0, 0, 0]})).await;
    let job_id = admin_post(
        &app,
        "/admin/calibrate",
        json!({"budgets": [0.5], "samples": [
        {"image": http_common::data_url(&http_common::png(32, 32)), "prompt": "hi"}]}),
    )
    .await;
    let eval_id = admin_post(&app, "/admin/evaluations", one_sample_evaluation()).await;
    // Reads first, deletes last, so each `{id}` still exists when it is read.
    let mut ordered: Vec<&(String, String)> = served.iter().collect();
    ordered.sort_by_key(|(m, _)| match m.as_str() {
        "GET" => 0,
        "POST" => 1,
        _ => 2,
    });
    for (method, path) in ordered {
        let id = if path.starts_with("/admin/jobs/") {
            &job_id
        } else if path.starts_with("/admin/evaluations/") {
            &eval_id
        } else {
            &recipe_id
        };
        let uri = path.replace("{model}", "demo").replace("{id}", id);
        let body = match (method.as_str(), path.as_str()) {
            ("POST", "/admin/calibrate") => json!({"budgets": [0.5], "samples": [
                {"image": http_common::data_url(&http_common::png(32, 32)), "prompt": "hi"}]}),
            ("POST", "/admin/recipes") => json!({"deletions": [1, 0, 0, 0]}),
            ("POST", "/admin/evaluations") => one_sample_evaluation(),
            ("POST", _) => short_request(),
            _ => Value::Null,
        };
        let body = if body.is_null() { Body::empty() } else { Body::from(body.to_string()) };
        let req = Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .header("content-type", "application/json")
            .header("authorization", "Bearer t")
            .body(body)
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        // Cancelling a job may race with it finishing (400 job_finished): still routed.
        let cancel = path == "/admin/jobs/{id}" || path == "/admin/evaluations/{id}";
        let routed = resp.status().is_success() || (method == "DELETE" && cancel);
        assert!(routed, "{method} {uri}: {}", resp.status());
    }
    // And an undocumented path is not.
    let req = Request::builder().uri("/v1/completions").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 404);
    // Every documented status of the chat route is one the error enum can produce, and back.
    let statuses: BTreeSet<String> =
        doc["paths"]["/v1/chat/completions"]["post"]["responses"].as_object().unwrap().keys().cloned().collect();
    let expected: BTreeSet<String> =
        ["200", "400", "401", "404", "413", "422", "429", "500", "503"].iter().map(|s| s.to_string()).collect();
    assert_eq!(statuses, expected);
}

/// An unpruned evaluation of one sample (needs no recipe).
fn one_sample_evaluation() -> Value {
    json!({"budgets": [0], "max_new_tokens": 2, "samples": [
        {"image": http_common::data_url(&http_common::png(32, 32)), "prompt": "hi", "answer": "yes"}]})
}

fn short_request() -> Value {
    json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
        "logprobs": true, "top_logprobs": 2})
}

/// Resolves `{"$ref": "#/components/..."}`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r.trim_start_matches("#/").split('/').fold(doc, |v, key| &v[key]),
        None => schema,
    }
}

/// Problems with `value` under `schema`: undeclared or missing fields, wrong JSON types.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let results: Vec<Vec<String>> = options.iter().map(|o| check(doc, o, value, at)).collect();
        return if results.iter().any(Vec::is_empty) {
            Vec::new()
        } else {
            vec![format!("{at}: matches no oneOf branch: {results:?}")]
        };
    }
    if let Some(c) = schema.get("const") {
        return if c == value { Vec::new() } else { vec![format!("{at}: {value} != const {c}")] };
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ if schema.get("properties").is_some() => vec!["object"],
        _ => return Vec::new(),
    };
    let actual = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if !types.iter().any(|t| *t == actual || (*t == "number" && actual == "integer")) {
        return vec![format!("{at}: {actual} is not {types:?}")];
    }
    let mut problems = Vec::new();
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, v) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => problems.extend(check(doc, s, v, &format!("{at}.{k}"))),
                    None if props.is_some() => problems.push(format!("{at}.{k}: not declared")),
                    None => {}
                }
            }
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !map.contains_key(req.as_str().unwrap()) {
                    problems.push(format!("{at}.{req}: required but missing"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    problems.extend(check(doc, s, v, &format!("{at}[{i}]")));
                }
            }
        }
        _ => {}
    }
    problems
}

fn assert_matches(doc: &Value, schema: &str, value: &Value) {
    let problems = check(doc, &json!({"$ref": format!("#/components/schemas/{schema}")}), value, schema);
    assert!(problems.is_empty(), "{value}\n{problems:#?}");
}

#[tokio::test]
async fn responses_use_only_documented_fields() {
    let doc = document();
    let server = start(&[]).await;
    let req = json!({"model": "demo", "messages": user_with_images("Hi", &[&data_url(&png(16, 16))]),
        "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, _, body) = server.chat(&req).await;
    assert_eq!(status, 200, "{body}");
    assert_matches(&doc, "ChatCompletion", &body);

    let mut stream_req = req.clone();
    stream_req["stream"] = json!(true);
    stream_req["stream_options"] = json!({"include_usage": true});
    for event in server.chat_stream(&stream_req).await.iter().filter(|e| e.as_str() != "[DONE]") {
        assert_matches(&doc, "ChatCompletionChunk", &serde_json::from_str(event).unwrap());
    }
    let (_, text) = server.get("/v1/models").await;
    assert_matches(&doc, "ModelList", &serde_json::from_str(&text).unwrap());
    let (_, text) = server.get("/v1/models/demo").await;
    assert_matches(&doc, "ModelCard", &serde_json::from_str(&text).unwrap());
    let (_, text) = server.get("/health").await;
    assert_matches(&doc, "Health", &serde_json::from_str(&text).unwrap());
    let (_, _, error) = server.chat(&json!({"messages": [], "n": 3})).await;
    assert_matches(&doc, "ErrorBody", &error);
    // The request schema declares every field the server reads.
    assert_matches(&doc, "ChatRequest", &stream_req);
}

/// POSTs an admin request that must succeed and returns the `id` it created.
async fn admin_post(app: &axum::Router, uri: &str, body: Value) -> String {
    let req = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json")
        .header("authorization", "Bearer t")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert!(resp.status().is_success(), "{uri}: {}", resp.status());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let created: Value = serde_json::from_slice(&bytes).unwrap();
    created["id"].as_str().unwrap().to_string()
}

#[test]
fn every_error_code_is_documented() {
    let doc = document();
    let documented: BTreeSet<String> = doc["components"]["schemas"]["ErrorBody"]["properties"]["error"]["properties"]
        ["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let defined: BTreeSet<String> = fitprune::protocol::ErrorCode::ALL.iter().map(|c| c.as_str().to_string()).collect();
    assert_eq!(documented, defined);
}

#[tokio::test]
async fn admin_lists_match_the_document() {
    let doc = document();
    let server = start(&["--admin-token", "t"]).await;
    let app = fitprune::build_app(server.state.clone());
    admin_post(&app, "/admin/recipes", json!({"deletions": [2, 0, 0, 0]})).await;
    // A finished evaluation, so its rows are checked too.
    let eval_id = admin_post(&app, "/admin/evaluations", one_sample_evaluation()).await;
    let uri = format!("/admin/evaluations/{eval_id}");
    let mut done = false;
    for _ in 0..2000 {
        let req = Request::builder().uri(&uri).header("authorization", "Bearer t").body(Body::empty()).unwrap();
        let bytes = axum::body::to_bytes(app.clone().oneshot(req).await.unwrap().into_body(), 1 << 20).await.unwrap();
        let job: Value = serde_json::from_slice(&bytes).unwrap();
        assert_matches(&doc, "Evaluation", &job);
        if job["status"] == "succeeded" {
            assert_eq!(job["rows"].as_array().unwrap().len(), 3, "{job}");
            done = true;
            break;
        }
        assert!(job["status"] == "queued" || job["status"] == "running", "{job}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(done, "the evaluation did not finish");
    for (uri, schema) in
        [("/admin/recipes?limit=1", "RecipeList"), ("/admin/jobs", "JobList"), ("/admin/evaluations", "EvaluationList")]
    {
        let req = Request::builder().uri(uri).header("authorization", "Bearer t").body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{uri}");
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        assert_matches(&doc, schema, &serde_json::from_slice(&bytes).unwrap());
    }
}
