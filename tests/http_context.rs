//! A prompt whose images do not fit the context is a 400 naming the image part whose tokens
//! reach the limit, decided from the image headers before any image is decoded: on LLaVA-1.5
//! (a fixed count per image) and on LLaVA-NeXT (a count that depends on each image's size).

mod http_common;

use std::path::Path;

use clap::Parser;
use fitprune::config::ServeArgs;
use fitprune::model::demo::{write_demo_model, DemoFamily, DemoOptions};
use fitprune::model::prompt::{ChatMessage, ContentPart};
use fitprune::model::LlavaModel;
use http_common::*;
use serde_json::{json, Value};

/// Writes a demo model of `family` whose context is set, once its prompt is counted, so that
/// the second of two images (`first` then `second`, then the text) reaches the limit halfway
/// through its tokens. Returns the server and the two images' token spans.
async fn server_where_the_second_image_overflows(
    root: &Path,
    family: DemoFamily,
    first: &[u8],
    second: &[u8],
) -> (TestServer, Vec<std::ops::Range<usize>>, usize) {
    let dir = root.join("model");
    write_demo_model(&dir, &DemoOptions { family, ..Default::default() }).unwrap();
    let local = LlavaModel::load(&dir, Default::default()).unwrap();
    let sizes: Vec<(u32, u32)> = [first, second]
        .iter()
        .map(|b| {
            let img = image::load_from_memory(b).unwrap();
            (img.height(), img.width())
        })
        .collect();
    let content = vec![ContentPart::Image, ContentPart::Image, ContentPart::Text("Compare them.".into())];
    let prompt = local.tokenize(&[ChatMessage { role: "user".into(), content }], &sizes).unwrap();
    let spans = prompt.image_spans.clone();
    let context = spans[1].start + spans[1].len() / 2;

    let config_path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["text_config"]["max_position_embeddings"] = json!(context);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let db = format!("sqlite://{}", root.join("fp.db").display());
    let argv = ["serve", "--model", dir.to_str().unwrap(), "--served-model-name", "m", "--database-url", &db];
    (start_with(ServeArgs::parse_from(argv).validate().unwrap()).await, spans, context)
}

/// `bytes` cut in half: the header (and so the size) reads, the pixels do not decode.
fn truncated(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len() / 2].to_vec()
}

async fn check_family(family: DemoFamily, first: Vec<u8>, second: Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let (server, spans, context) = server_where_the_second_image_overflows(tmp.path(), family, &first, &second).await;
    let chat = |urls: &[&str]| json!({"messages": user_with_images("Compare them.", urls), "max_tokens": 2});

    // The second image is truncated: were it decoded, the answer would be invalid_image.
    let (status, _, body) = server.chat(&chat(&[&data_url(&first), &data_url(&truncated(&second))])).await;
    let e = assert_error(status, &body, 400, Some("messages[0].content[1]"));
    assert_eq!(e["code"], "context_length_exceeded", "{family:?}: {body}");
    let message = e["message"].as_str().unwrap();
    for counts in [
        format!("takes {} tokens", spans[1].len()),
        format!("brings the prompt to {} tokens", spans[1].end),
        format!("{context}-token context"),
    ] {
        assert!(message.contains(&counts), "{family:?}: {counts:?} not in {message}");
    }
    // The truncated image alone fits, so it is decoded, and refused for what it is.
    let (status, _, body) = server.chat(&chat(&[&data_url(&truncated(&second))])).await;
    let e = assert_error(status, &body, 400, Some("messages[0].content[0].image_url.url"));
    assert_eq!(e["code"], "invalid_image", "{family:?}: {body}");
    // The first image alone is answered; the refused requests never reached the engine.
    let (status, _, body) = server.chat(&chat(&[&data_url(&first)])).await;
    assert_eq!(status, 200, "{family:?}: {body}");
    assert_eq!(body["pruning"]["visual_tokens"], spans[0].len());
    let text = server.metrics().await;
    assert_eq!(metric(&text, "fitprune_image_tokens_total"), Some(spans[0].len() as f64), "{family:?}");
    // Too much text with no image is still refused naming the messages.
    let long = json!({"messages": [{"role": "user", "content": "lorem ipsum ".repeat(context)}]});
    let (status, _, body) = server.chat(&long).await;
    assert_eq!(assert_error(status, &body, 400, Some("messages"))["code"], "context_length_exceeded");
    // Text before an image that already fills the context names the messages, not the image.
    let mut late = chat(&[&data_url(&first)]);
    late["messages"] = json!([{"role": "user", "content": [
        {"type": "text", "text": "lorem ipsum ".repeat(context)},
        {"type": "image_url", "image_url": {"url": data_url(&first)}}]}]);
    let (status, _, body) = server.chat(&late).await;
    assert_eq!(assert_error(status, &body, 400, Some("messages"))["code"], "context_length_exceeded");
}

#[tokio::test]
async fn llava_15_names_the_image_that_overflows_the_context() {
    check_family(DemoFamily::Llava, png(32, 32), png(40, 24)).await;
}

#[tokio::test]
async fn next_names_the_image_that_overflows_the_context() {
    // A 4:3 photo (70 packed tokens in the tiny NeXT model) and a 1x3 strip (42).
    check_family(DemoFamily::Next, png(64, 48), png(60, 180)).await;
}
