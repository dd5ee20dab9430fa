//! A LLaVA-NeXT model behind the HTTP API: images of different sizes in one request, JSON and
//! SSE, with usage and the pruning report counting every image's packed tokens.

mod http_common;

use clap::Parser;
use fitprune::config::ServeArgs;
use fitprune::model::demo::{write_demo_model, DemoFamily, DemoOptions};
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::model::LlavaModel;
use http_common::*;
use serde_json::json;

#[tokio::test]
async fn next_model_answers_images_of_any_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("next");
    write_demo_model(&dir, &DemoOptions { family: DemoFamily::Next, ..Default::default() }).unwrap();
    let db = format!("sqlite://{}", tmp.path().join("next.db").display());
    let argv = ["serve", "--model", dir.to_str().unwrap(), "--served-model-name", "next", "--database-url", &db];
    let server = start_with(ServeArgs::parse_from(argv).validate().unwrap()).await;

    // What the model side counts for the same two images (a 4:3 photo and a 1x3 strip).
    let (wide, strip) = (png(64, 48), png(200, 20));
    let local = LlavaModel::load(&dir, Default::default()).unwrap();
    let images = [image::load_from_memory(&wide).unwrap(), image::load_from_memory(&strip).unwrap()];
    let content = vec![ContentPart::Image, ContentPart::Image, ContentPart::Text("Compare them.".into())];
    let prompt = local.prepare(&[ChatMessage { role: "user".into(), content }], &images).unwrap();
    let spans: Vec<usize> = prompt.image_spans.iter().map(|s| s.len()).collect();
    assert_eq!(spans, [70, 42]);

    let messages = user_with_images("Compare them.", &[&data_url(&wide), &data_url(&strip)]);
    let req = json!({"model": "next", "messages": messages, "max_tokens": 4, "temperature": 0});
    let (status, _, body) = server.chat(&req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], prompt.input_ids.len());
    assert_eq!(body["pruning"]["visual_tokens"], 112);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    let mut stream_req = req.clone();
    stream_req["stream"] = json!(true);
    let events = server.chat_stream(&stream_req).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text, "greedy SSE and JSON answers agree");
}
