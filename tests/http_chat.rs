//! Chat completions over HTTP against the demo model: JSON and SSE, data-URL and http images,
//! logprobs with raw bytes, seeds, stop strings and the pruning extension.

mod http_common;

use http_common::*;
use serde_json::{json, Value};

fn greedy(messages: Value, max_tokens: u32) -> Value {
    json!({"model": "demo", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
}

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn completion_with_a_data_url_image() {
    let server = start(&[]).await;
    let messages = user_with_images("What is this?", &[&data_url(&png(40, 30))]);
    let (status, headers, body) = server.chat(&greedy(messages, 6)).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("x-request-id").is_some_and(|v| !v.is_empty()));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "demo");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["logprobs"].is_null());
    let usage = &body["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    // The demo model has 144 image tokens per image; they count as prompt tokens.
    assert!(prompt > 144, "{usage}");
    assert!((1..=6).contains(&completion), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "length" && completion == 6 || finish == "stop", "{body}");
    let pruning = &body["pruning"];
    assert_eq!(pruning["visual_tokens"], 144);
    assert_eq!(pruning["visual_tokens_kept"], 144);
    assert_eq!(pruning["recipe_id"], Value::Null);
    assert_eq!(pruning["reason"], "off");
}

#[tokio::test]
async fn stream_with_an_http_image_matches_the_json_answer() {
    let server = start(&["--allow-private-image-urls"]).await;
    let images = image_server().await;
    let url = format!("{images}/img.png");
    let messages = user_with_images("Describe it.", &[&url]);
    let (status, _, body) = server.chat(&greedy(messages.clone(), 12)).await;
    assert_eq!(status, 200, "{body}");
    let expected = content(&body);

    let mut req = greedy(messages.clone(), 12);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let events = server.chat_stream(&req).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(text, expected);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"], body["usage"]);
    let last_choice = &chunks[chunks.len() - 2];
    assert_eq!(last_choice["choices"][0]["finish_reason"], body["choices"][0]["finish_reason"]);
    assert_eq!(last_choice["pruning"]["visual_tokens"], 144);
    // Only the last chunk with a choice has a finish_reason.
    assert!(chunks[..chunks.len() - 2].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));

    // Without include_usage there is no usage chunk.
    req["stream_options"] = json!({"include_usage": false});
    let events = server.chat_stream(&req).await;
    let second_last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(second_last["choices"][0]["finish_reason"].is_string());
    assert!(second_last.get("usage").is_none());
}

#[tokio::test]
async fn logprobs_report_sorted_alternatives_and_raw_bytes() {
    let server = start(&[]).await;
    let mut req = greedy(json!([{"role": "user", "content": "Say something."}]), 8);
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(3);
    let (status, _, body) = server.chat(&req).await;
    assert_eq!(status, 200, "{body}");
    let entries = body["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert!(!entries.is_empty());
    for e in &entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
        assert!(lps.iter().all(|&l| l <= 0.0));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["token"], top[0]["token"]);
        assert!((e["logprob"].as_f64().unwrap() - lps[0]).abs() < 1e-6);
    }

    // The same request with token ids: bytes are each id's raw bytes in the tokenizer.
    req["return_tokens_as_token_ids"] = json!(true);
    let (_, _, by_id) = server.chat(&req).await;
    let by_id = by_id["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(by_id.len(), entries.len());
    let tokenizer = tokenizers::Tokenizer::from_file(demo_dir().join("tokenizer.json")).unwrap();
    let table = fitprune::engine::token_bytes::TokenBytes::new(&tokenizer);
    for (named, numbered) in entries.iter().zip(&by_id) {
        let id: u32 = numbered["token"].as_str().unwrap().strip_prefix("token_id:").unwrap().parse().unwrap();
        let bytes: Vec<u8> = named["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, table.get(id));
        assert_eq!(named["token"].as_str().unwrap(), String::from_utf8_lossy(&bytes));
        assert!(numbered["top_logprobs"][0]["token"].as_str().unwrap().starts_with("token_id:"));
    }
    // Byte-fallback pieces are their byte, not their spelling; `▁` is a space.
    let e2 = tokenizer.token_to_id("<0xE2>").unwrap();
    assert_eq!(table.get(e2), &[0xE2]);
    let word = (0..tokenizer.get_vocab_size(false) as u32)
        .find(|&id| tokenizer.id_to_token(id).is_some_and(|t| t.starts_with('\u{2581}') && t.len() > 3))
        .unwrap();
    assert_eq!(table.get(word)[0], b' ');

    // Streaming carries one logprobs entry per token chunk.
    req["stream"] = json!(true);
    req["return_tokens_as_token_ids"] = json!(false);
    let events = server.chat_stream(&req).await;
    let streamed: Vec<Value> = events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"].get(0)?["logprobs"]["content"].get(0).cloned())
        .collect();
    assert_eq!(streamed, entries);
}

#[tokio::test]
async fn same_seed_same_text_other_seeds_differ() {
    let server = start(&[]).await;
    let run = |seed: u64| {
        let req = json!({"messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 16, "temperature": 1.0, "seed": seed});
        let server = &server;
        async move {
            let (status, _, body) = server.chat(&req).await;
            assert_eq!(status, 200, "{body}");
            content(&body)
        }
    };
    let a = run(7).await;
    assert_eq!(a, run(7).await);
    let mut others = Vec::new();
    for seed in [8, 9, 10] {
        others.push(run(seed).await);
    }
    assert!(others.iter().any(|o| o != &a), "different seeds all gave {a:?}");
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let server = start(&[]).await;
    let messages = json!([{"role": "user", "content": "Count with me."}]);
    let (_, _, body) = server.chat(&greedy(messages.clone(), 24)).await;
    let full = content(&body);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 4, "greedy output too short to test stop strings: {full:?}");
    // Stop at a two-character string from the middle of the answer.
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.find(&stop).unwrap();
    let mut req = greedy(messages, 24);
    req["stop"] = json!([stop, "never-appears-anywhere"]);
    let (status, _, stopped) = server.chat(&req).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(content(&stopped), full[..cut]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    req["stream"] = json!(true);
    let events = server.chat_stream(&req).await;
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, full[..cut]);
}

#[tokio::test]
async fn pruning_by_budget_and_recipe_id_from_the_recipes_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = demo_recipes_file(dir.path());
    let server = start(&["--recipes", file.to_str().unwrap()]).await;
    let messages = user_with_images("What is this?", &[&data_url(&png(32, 32))]);
    let with = |pruning: Value| {
        let mut req = greedy(messages.clone(), 3);
        req["pruning"] = pruning;
        req
    };
    let (status, _, body) = server.chat(&with(json!({"budget": 0.5}))).await;
    assert_eq!(status, 200, "{body}");
    let p = &body["pruning"];
    assert_eq!(p["recipe_id"], "r30");
    assert_eq!(p["budget"], 0.3);
    assert_eq!(p["visual_tokens"], 144);
    assert_eq!(p["visual_tokens_kept"], 114);
    assert!(p["flops_reduction"].as_f64().unwrap() > 0.0);
    assert!(p.get("reason").is_none(), "{p}");

    let (_, _, body) = server.chat(&with(json!({"recipe_id": "r60"}))).await;
    assert_eq!(body["pruning"]["visual_tokens_kept"], 64);
    let (_, _, body) = server.chat(&with(json!({"budget": 0.1}))).await;
    assert_eq!(body["pruning"]["reason"], "no recipe applies");
    assert_eq!(body["pruning"]["visual_tokens_kept"], 144);
    let (_, _, body) = server.chat(&with(json!("off"))).await;
    assert_eq!(body["pruning"]["reason"], "off");
    let (status, _, body) = server.chat(&with(json!({"recipe_id": "nope"}))).await;
    assert_error(status, &body, 404, Some("pruning.recipe_id"));

    let text = server.metrics().await;
    assert_eq!(metric(&text, "fitprune_visual_tokens_in_total"), Some(288.0));
    assert_eq!(metric(&text, "fitprune_visual_tokens_kept_total"), Some(178.0));
    assert_eq!(metric(&text, "fitprune_flops_reduction_ratio_count"), Some(2.0));
    assert!(metric(&text, r#"fitprune_prefill_duration_seconds_count{pruned="true"}"#) == Some(2.0), "{text}");
}

#[tokio::test]
async fn jpeg_webp_gif_and_extreme_shapes_are_accepted_other_formats_refused() {
    use image::codecs::gif::GifEncoder;
    use image::{DynamicImage, Frame, ImageFormat, RgbaImage};
    let server = start(&[]).await;
    let encode = |img: DynamicImage, format: ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let rgb = |w, h| DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7])));
    let mut animated = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut animated);
        let frames = (0..2).map(|i| Frame::new(RgbaImage::from_pixel(30, 20, image::Rgba([i * 200, 50, 50, 255]))));
        enc.encode_frames(frames).unwrap();
    }
    let images = [
        ("jpeg", encode(rgb(50, 40), ImageFormat::Jpeg)),
        ("webp", encode(rgb(50, 40), ImageFormat::WebP)),
        ("gif", encode(rgb(50, 40), ImageFormat::Gif)),
        ("animated gif", animated),
        ("1x1", png(1, 1)),
        ("3000x1", png(3000, 1)),
        ("1x3000", png(1, 3000)),
    ];
    for (name, bytes) in images {
        let req = json!({"messages": user_with_images("x", &[&data_url(&bytes)]), "max_tokens": 1, "temperature": 0});
        let (status, _, body) = server.chat(&req).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["pruning"]["visual_tokens"], 144, "{name}");
    }
    // A BMP (recognised, not enabled) and a TIFF header are refused by name, not with a 500.
    for (name, bytes) in [("bmp", b"BM\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec()), ("tiff", b"II*\0\x08\0\0\0".to_vec())] {
        let req = json!({"messages": user_with_images("x", &[&data_url(&bytes)]), "max_tokens": 1});
        let (status, _, body) = server.chat(&req).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["code"], "unsupported_image_format", "{name}: {body}");
    }
}
