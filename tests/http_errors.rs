//! Every limit and malformed input answers with the right status and OpenAI's error JSON.

mod common;
mod http_common;

use http_common::*;
use serde_json::{json, Value};

fn with_messages(messages: Value) -> Value {
    json!({"model": "demo", "messages": messages, "max_tokens": 2, "temperature": 0})
}

async fn raw_post(server: &TestServer, body: &'static str) -> (axum::http::StatusCode, Value) {
    let resp = server
        .client
        .post(format!("{}/v1/chat/completions", server.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_in_openai_shape() {
    let server = start(&[]).await;
    let (status, body) = raw_post(&server, "{\"messages\": [").await;
    let e = assert_error(status, &body, 400, None);
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "invalid_json");
    let (status, body) = raw_post(&server, r#"{"messages": "hello"}"#).await;
    assert_error(status, &body, 400, Some("messages"));
    let (status, body) = raw_post(&server, r#"{"model": "demo"}"#).await;
    assert_error(status, &body, 400, Some("messages"));
    let (status, body) =
        raw_post(&server, r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#).await;
    assert_error(status, &body, 400, Some("temperature"));
    let (status, body) = raw_post(&server, r#"{"messages": [{"role": "robot", "content": "x"}]}"#).await;
    assert_error(status, &body, 400, Some("messages[0].role"));
    let (status, body) =
        raw_post(&server, r#"{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#).await;
    assert_error(status, &body, 400, Some("messages[0].content[0]"));
}

#[tokio::test]
async fn out_of_range_and_unsupported_parameters_name_the_field() {
    let server = start(&[]).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"n": 2}), "n"),
        (json!({"temperature": 3}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"pruning": {"budget": 1.5}}), "pruning.budget"),
        (json!({"pruning": "on"}), "pruning"),
        (json!({"frequency_penalty": 1}), "frequency_penalty"),
        (json!({"seed": -1}), "seed"),
    ];
    for (extra, param) in cases {
        let mut req = with_messages(user.clone());
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (status, _, body) = server.chat(&req).await;
        assert_error(status, &body, 400, Some(param));
    }
    let mut req = with_messages(user.clone());
    req["model"] = json!("gpt-4o");
    let (status, _, body) = server.chat(&req).await;
    let e = assert_error(status, &body, 404, Some("model"));
    assert_eq!(e["code"], "model_not_found");
    // A prompt longer than the context (4096 for the demo model) is a 400, not a 500.
    let long = "lorem ipsum ".repeat(3000);
    let (status, _, body) = server.chat(&with_messages(json!([{"role": "user", "content": long}]))).await;
    let e = assert_error(status, &body, 400, Some("messages"));
    assert_eq!(e["code"], "context_length_exceeded");
}

#[tokio::test]
async fn body_and_image_limits() {
    let server = start(&[
        "--max-body-bytes",
        "300000",
        "--max-image-bytes",
        "100000",
        "--max-image-pixels",
        "10000",
        "--max-images",
        "2",
    ])
    .await;
    // Body over the limit: 413.
    let huge = data_url(&vec![7u8; 400_000]);
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&huge]))).await;
    let e = assert_error(status, &body, 413, None);
    assert_eq!(e["code"], "request_too_large");
    // Image bytes over the limit.
    let big = data_url(&vec![7u8; 150_000]);
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&big]))).await;
    let e = assert_error(status, &body, 400, Some("messages[0].content[0].image_url.url"));
    assert_eq!(e["code"], "image_too_large");
    // Pixels over the limit (200 x 100 = 20000 > 10000).
    let wide = data_url(&png(200, 100));
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&wide]))).await;
    assert_eq!(assert_error(status, &body, 400, None)["code"], "image_too_many_pixels");
    // Too many images.
    let small = data_url(&png(10, 10));
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&small, &small, &small]))).await;
    assert_eq!(assert_error(status, &body, 400, Some("messages"))["code"], "too_many_images");
    // Not an image, not base64, unsupported scheme.
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&data_url(b"hello there")]))).await;
    assert_eq!(assert_error(status, &body, 400, None)["code"], "invalid_image");
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &["data:image/png;base64,@@@"]))).await;
    assert_eq!(assert_error(status, &body, 400, None)["code"], "invalid_image_url");
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &["file:///etc/passwd"]))).await;
    assert_eq!(assert_error(status, &body, 400, None)["code"], "invalid_image_url");
    // Two images within the limits are fine.
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&small, &small]))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pruning"]["visual_tokens"], 288);
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_from_its_header() {
    let server = start(&[]).await;
    // A small PNG that declares 50000 x 50000 pixels (2.5 GP).
    let bomb = common::png_bomb(50_000, 50_000);
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&data_url(&bomb)]))).await;
    let e = assert_error(status, &body, 400, Some("messages[0].content[0].image_url.url"));
    assert_eq!(e["code"], "image_too_many_pixels");
    assert!(e["message"].as_str().unwrap().contains("50000x50000"), "{e}");
}

#[tokio::test]
async fn image_url_fetch_limits() {
    let server =
        start(&["--allow-private-image-urls", "--max-image-bytes", "1000000", "--image-fetch-timeout", "1"]).await;
    let images = image_server().await;
    let fetch = |path: &str| with_messages(user_with_images("x", &[&format!("{images}{path}")]));
    let code_of = |status, body: &Value| assert_error(status, body, 400, None)["code"].as_str().unwrap().to_string();

    let (status, _, body) = server.chat(&fetch("/big")).await;
    assert_eq!(code_of(status, &body), "image_too_large");
    let (status, _, body) = server.chat(&fetch("/big-chunked")).await;
    assert_eq!(code_of(status, &body), "image_too_large");
    let (status, _, body) = server.chat(&fetch("/slow")).await;
    assert_eq!(code_of(status, &body), "image_fetch_failed");
    assert!(body["error"]["message"].as_str().unwrap().contains("longer than"), "{body}");
    let (status, _, body) = server.chat(&fetch("/missing")).await;
    assert_eq!(code_of(status, &body), "image_fetch_failed");
    assert!(body["error"]["message"].as_str().unwrap().contains("404"), "{body}");
    let (status, _, body) = server.chat(&fetch("/text")).await;
    assert_eq!(code_of(status, &body), "invalid_image");
    // Three redirects are followed; a fourth is refused.
    let (status, _, body) = server.chat(&fetch("/redirect/3")).await;
    assert_eq!(status, 200, "{body}");
    // A hostname goes through the guarded resolver (allowed here) and keeps the URL's port.
    let by_name = images.replace("127.0.0.1", "localhost");
    let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&format!("{by_name}/img.png")]))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = server.chat(&fetch("/redirect/4")).await;
    assert_eq!(code_of(status, &body), "image_fetch_failed");
    assert!(body["error"]["message"].as_str().unwrap().contains("redirects"), "{body}");
}

#[tokio::test]
async fn private_image_urls_are_refused_by_default() {
    let server = start(&[]).await;
    let images = image_server().await;
    let port = images.rsplit(':').next().unwrap().to_string();
    for url in [format!("{images}/img.png"), format!("http://localhost:{port}/img.png"), "http://[::1]/a.png".into()] {
        let (status, _, body) = server.chat(&with_messages(user_with_images("x", &[&url]))).await;
        assert_eq!(assert_error(status, &body, 400, None)["code"], "image_url_private", "{url}");
    }
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_api_keys() {
    let server = start(&["--api-key", "sekret"]).await;
    let (status, text) = server.get("/v2/nothing").await;
    assert_eq!(status, 404);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "unknown_route");
    let (status, text) = server.get("/v1/chat/completions").await;
    assert_eq!(status, 405);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], "method_not_allowed");

    let req = with_messages(json!([{"role": "user", "content": "hi"}]));
    let (status, _, body) = server.chat(&req).await;
    assert_eq!(assert_error(status, &body, 401, None)["type"], "authentication_error");
    let resp = server
        .client
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth("sekret")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Health and metrics stay open.
    assert_eq!(server.get("/health").await.0, 200);
    assert_eq!(server.get("/metrics").await.0, 200);
}
