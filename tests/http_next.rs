//! A LLaVA-NeXT model behind the HTTP API: images of different sizes in one request, JSON and
//! SSE, with usage and the pruning report counting every image's packed tokens; logprobs,
//! `detail`, and metrics; batched prefill and decode mixing image sizes and pruned requests;
//! calibration on samples of different sizes and serving its recipe scaled to another size.

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

/// Two recipes for the tiny NeXT model (4 layers) fitted at 100 visual tokens, so every image
/// size scales them by its own packed count.
fn next_recipes(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("next-recipes.json");
    let recipes = json!([
        {"id": "n30", "budget": 0.3, "visual_tokens": 100, "deletions": [0, 20, 10, 0]},
        {"id": "n60", "budget": 0.6, "visual_tokens": 100, "deletions": [40, 30, 10, 0]}]);
    std::fs::write(&file, recipes.to_string()).unwrap();
    file
}

/// Packed tokens of one image in the NeXT demo model.
fn next_count(w: u32, h: u32) -> usize {
    let local = LlavaModel::load(next_demo_dir(), Default::default()).unwrap();
    local.image_token_count(w, h).unwrap()
}

/// Tokens kept by a recipe fitted at `big_n` with `deletions` for an image of `n` tokens.
fn kept(n: usize, big_n: usize, deletions: &[usize]) -> usize {
    n - deletions.iter().map(|d| d * n / big_n).sum::<usize>()
}

#[tokio::test]
async fn next_logprobs_detail_and_metrics_count_packed_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let recipes = next_recipes(tmp.path());
    let extra = ["--recipes", recipes.to_str().unwrap(), "--detail-low-budget", "0.6"];
    let server = start_with(args_for(next_demo_dir(), &extra).validate().unwrap()).await;
    let (wide, strip) = ((64, 48), (60, 180));
    let (n_wide, n_strip) = (next_count(wide.0, wide.1), next_count(strip.0, strip.1));
    assert_ne!(n_wide, n_strip, "the two sizes pack differently");
    let urls = [data_url(&png(wide.0, wide.1)), data_url(&png(strip.0, strip.1))];

    // Logprobs with alternatives: greedy picks the best alternative, listed best first.
    let req = json!({"messages": user_with_images("Compare.", &[&urls[0], &urls[1]]), "max_tokens": 5,
        "temperature": 0, "logprobs": true, "top_logprobs": 4});
    let (status, _, body) = server.chat(&req).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, body["usage"]["completion_tokens"].as_u64().unwrap());
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 4, "{t}");
        assert_eq!((&top[0]["token"], &top[0]["logprob"]), (&t["token"], &t["logprob"]), "{t}");
        let lps: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{lps:?}");
        assert!(!t["bytes"].as_array().unwrap().is_empty(), "{t}");
    }
    assert_eq!(body["pruning"]["visual_tokens"], n_wide + n_strip);
    assert!(body["pruning"]["recipe_id"].is_null(), "{body}");

    // detail "low" selects the recipe at --detail-low-budget, scaled to each image's count;
    // "high" anywhere in the request keeps every token.
    let part = |url: &str, detail: &str| json!({"type": "image_url", "image_url": {"url": url, "detail": detail}});
    let detail = |d: &str| {
        json!({"max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
            part(&urls[1], d), {"type": "text", "text": "What is it?"}]}]})
    };
    let (status, headers, low) = server.chat(&detail("low")).await;
    assert_eq!(status, 200, "{low}");
    assert_eq!(headers["x-fitprune-recipe"], "n60");
    assert_eq!(low["pruning"]["visual_tokens"], n_strip);
    assert_eq!(low["pruning"]["visual_tokens_kept"], kept(n_strip, 100, &[40, 30, 10, 0]));
    let (_, _, high) = server.chat(&detail("high")).await;
    assert!(high["pruning"]["recipe_id"].is_null(), "{high}");
    assert_eq!(high["pruning"]["visual_tokens_kept"], n_strip);

    let text = server.metrics().await;
    let images = (n_wide + n_strip + 2 * n_strip) as f64;
    assert_eq!(metric(&text, "fitprune_image_tokens_total"), Some(images), "{text}");
    assert_eq!(metric(&text, "fitprune_visual_tokens_in_total"), Some(n_strip as f64));
    let kept_total = kept(n_strip, 100, &[40, 30, 10, 0]) as f64;
    assert_eq!(metric(&text, "fitprune_visual_tokens_kept_total"), Some(kept_total));
}

/// Pruned and unpruned requests with images of different sizes (and one without images).
fn mixed_next_requests() -> Vec<serde_json::Value> {
    let greedy = |messages: serde_json::Value, pruning: serde_json::Value, max_tokens: usize| {
        json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": true,
            "top_logprobs": 3, "pruning": pruning})
    };
    let url = |w, h| data_url(&png(w, h));
    vec![
        greedy(user_with_images("What is this?", &[&url(64, 48)]), json!({"recipe_id": "n60"}), 9),
        greedy(json!([{"role": "user", "content": "hi there"}]), json!("off"), 12),
        greedy(user_with_images("Compare.", &[&url(200, 20), &url(30, 90)]), json!("off"), 5),
        greedy(user_with_images("And this?", &[&url(50, 50), &url(60, 180)]), json!({"recipe_id": "n30"}), 7),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_batched_prefill_and_decode_give_the_answers_requests_get_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let recipes = next_recipes(tmp.path());
    let ids = ["a", "b", "c", "d"];
    let mut runs = Vec::new();
    for max_running in ["4", "1"] {
        let extra = ["--recipes", recipes.to_str().unwrap(), "--max-running", max_running];
        let (server, stepper) = Stepper::server_for(next_demo_dir(), &extra, Some(0)).await;
        let results = run_together(&server, &stepper, &mixed_next_requests(), &ids).await;
        assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
        let text = server.metrics().await;
        let passes = metric(&text, "fitprune_decode_batch_size_count").unwrap();
        let widest = metric(&text, r#"fitprune_decode_batch_size_bucket{le="3"}"#).unwrap();
        let prefills = metric(&text, "fitprune_prefill_batch_size_count").unwrap();
        assert_eq!(metric(&text, "fitprune_prefill_batch_size_sum"), Some(4.0));
        if max_running == "4" {
            assert!(widest < passes, "no decode pass had all 4 sequences: {passes} passes");
            assert!(prefills < 4.0, "the four prompts of different image sizes prefilled apart");
        } else {
            let single = metric(&text, r#"fitprune_decode_batch_size_bucket{le="1"}"#).unwrap();
            assert_eq!(single, passes, "with --max-running 1 every pass has one sequence");
        }
        runs.push(results.into_iter().map(|(_, b)| b).collect::<Vec<_>>());
    }
    assert_same_answers(&runs[0], &runs[1]);
    let visual: Vec<u64> = runs[0].iter().map(|b| b["pruning"]["visual_tokens"].as_u64().unwrap()).collect();
    let want =
        [next_count(64, 48), 0, next_count(200, 20) + next_count(30, 90), next_count(50, 50) + next_count(60, 180)];
    assert_eq!(visual, want.map(|n| n as u64));
    let pruned: Vec<bool> = runs[0].iter().map(|b| b["pruning"]["recipe_id"].is_string()).collect();
    assert_eq!(pruned, [true, false, false, true]);
}

#[tokio::test]
async fn next_calibration_on_mixed_sizes_records_the_mean_count_and_serves_it_scaled() {
    const TOKEN: &str = "adm1n";
    let server = start_with(args_for(next_demo_dir(), &["--admin-token", TOKEN]).validate().unwrap()).await;
    let sizes = [(64, 48), (60, 180), (50, 50)];
    let samples: Vec<_> = sizes
        .iter()
        .zip(["What is in the image?", "Describe the colours.", "Describe it."])
        .map(|(&(w, h), prompt)| json!({"image": data_url(&png(w, h)), "prompt": prompt}))
        .collect();
    let counts: Vec<usize> = sizes.iter().map(|&(w, h)| next_count(w, h)).collect();
    assert!(counts.windows(2).all(|c| c[0] != c[1]), "three different counts: {counts:?}");
    let mean = (counts.iter().sum::<usize>() + 1) / 3;
    let nominal = LlavaModel::load(next_demo_dir(), Default::default()).unwrap().nominal_image_tokens();
    assert_ne!(mean, nominal, "the mean must be told apart from the model's nominal count");

    let admin = |method: reqwest::Method, path: &str| {
        server.client.request(method, format!("{}{path}", server.base)).bearer_auth(TOKEN)
    };
    let body = json!({"budgets": [0.5], "samples": samples, "name": "next-mixed"});
    let resp = admin(reqwest::Method::POST, "/admin/calibrate").json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let job: serde_json::Value = resp.json().await.unwrap();
    let path = format!("/admin/jobs/{}", job["id"].as_str().unwrap());
    let started = std::time::Instant::now();
    let job = loop {
        let job: serde_json::Value = admin(reqwest::Method::GET, &path).send().await.unwrap().json().await.unwrap();
        if ["succeeded", "failed"].contains(&job["status"].as_str().unwrap_or("")) {
            break job;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "job stuck: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    let id = job["recipe_ids"][0].as_str().unwrap().to_string();
    let recipe: serde_json::Value =
        admin(reqwest::Method::GET, &format!("/admin/recipes/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(recipe["visual_tokens"], mean, "{recipe}");
    let deletions: Vec<usize> =
        recipe["deletions"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    assert!(deletions.iter().sum::<usize>() > 0, "{recipe}");

    // A chat with the recipe on an image of yet another size deletes its scaled share.
    let n = next_count(200, 20);
    let chat = json!({"messages": user_with_images("What is it?", &[&data_url(&png(200, 20))]),
        "max_tokens": 3, "temperature": 0, "pruning": {"recipe_id": id}});
    let (status, _, out) = server.chat(&chat).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["pruning"]["recipe_id"], id.as_str());
    assert_eq!(out["pruning"]["visual_tokens"], n);
    assert_eq!(out["pruning"]["visual_tokens_kept"], kept(n, mean, &deletions), "{out}");
}
