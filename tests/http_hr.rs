//! A LLaVA-HR model behind the HTTP API: chat and SSE with a budget (the recipe's deletions
//! applied to the 64 fused visual tokens of the tiny HR demo), the pruning report and metrics,
//! and admin calibration whose recipe then serves.

mod http_common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fitprune::model::demo::{write_demo_model, DemoFamily, DemoOptions};
use http_common::*;
use serde_json::json;

/// The tiny HR demo (S = 256, 64 visual tokens), written once per test binary.
fn hr_demo_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hr");
        write_demo_model(&dir, &DemoOptions { family: DemoFamily::Hr, ..Default::default() }).unwrap();
        (tmp, dir)
    })
    .1
}

/// Two recipes for the 4-layer HR demo fitted at 64 tokens.
fn hr_recipes(dir: &Path) -> PathBuf {
    let file = dir.join("hr-recipes.json");
    let recipes = json!([
        {"id": "hr40", "budget": 0.4, "visual_tokens": 64, "deletions": [10, 8, 6, 0]},
        {"id": "hr60", "budget": 0.6, "visual_tokens": 64, "deletions": [24, 10, 6, 0]}]);
    std::fs::write(&file, recipes.to_string()).unwrap();
    file
}

#[tokio::test]
async fn hr_model_chats_and_streams_with_a_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let recipes = hr_recipes(tmp.path());
    let server =
        start_with(args_for(hr_demo_dir(), &["--recipes", recipes.to_str().unwrap()]).validate().unwrap()).await;
    let url = data_url(&png(120, 80));
    let req = json!({"messages": user_with_images("What is in the image?", &[&url]), "max_tokens": 6,
        "temperature": 0, "pruning": {"budget": 0.5}});
    let (status, headers, body) = server.chat(&req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-fitprune-recipe"], "hr40");
    assert_eq!(body["pruning"]["visual_tokens"], 64);
    assert_eq!(body["pruning"]["visual_tokens_kept"], 64 - 24);
    assert!(body["pruning"]["flops_reduction"].as_f64().unwrap() > 0.0, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    let mut stream_req = req.clone();
    stream_req["stream"] = json!(true);
    stream_req["stream_options"] = json!({"include_usage": true});
    let events = server.chat_stream(&stream_req).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(streamed, text, "greedy SSE and JSON answers agree");
    let usage = chunks.iter().find_map(|c| c.get("usage").filter(|u| !u.is_null())).unwrap();
    assert_eq!(usage["prompt_tokens"], body["usage"]["prompt_tokens"]);

    // Unpruned, the same request keeps every fused token.
    let mut off = req.clone();
    off["pruning"] = json!("off");
    let (status, _, unpruned) = server.chat(&off).await;
    assert_eq!(status, 200, "{unpruned}");
    assert_eq!(unpruned["pruning"]["visual_tokens_kept"], 64);

    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "fitprune_image_tokens_total"), Some(3.0 * 64.0), "{metrics}");
    // The pruned-token counters cover the two pruned requests only.
    assert_eq!(metric(&metrics, "fitprune_visual_tokens_in_total"), Some(2.0 * 64.0), "{metrics}");
    assert_eq!(metric(&metrics, "fitprune_visual_tokens_kept_total"), Some(2.0 * 40.0), "{metrics}");
}

#[tokio::test]
async fn hr_admin_calibration_fits_a_recipe_that_serves() {
    const TOKEN: &str = "adm1n";
    let server = start_with(args_for(hr_demo_dir(), &["--admin-token", TOKEN]).validate().unwrap()).await;
    let samples: Vec<_> = [(120, 80), (64, 100), (90, 90)]
        .iter()
        .zip(["What is in the image?", "Describe the colours.", "Describe it."])
        .map(|(&(w, h), prompt)| json!({"image": data_url(&png(w, h)), "prompt": prompt}))
        .collect();
    let admin = |method: reqwest::Method, path: &str| {
        server.client.request(method, format!("{}{path}", server.base)).bearer_auth(TOKEN)
    };
    let body = json!({"budgets": [0.5], "samples": samples, "name": "hr-cal"});
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
        assert!(started.elapsed() < std::time::Duration::from_secs(180), "job stuck: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    let id = job["recipe_ids"][0].as_str().unwrap().to_string();
    let recipe: serde_json::Value =
        admin(reqwest::Method::GET, &format!("/admin/recipes/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(recipe["visual_tokens"], 64, "{recipe}");
    let deletions: Vec<usize> =
        recipe["deletions"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let total: usize = deletions.iter().sum();
    assert!(total > 0, "{recipe}");

    let chat = json!({"messages": user_with_images("What is it?", &[&data_url(&png(100, 70))]),
        "max_tokens": 3, "temperature": 0, "pruning": {"recipe_id": id}});
    let (status, _, out) = server.chat(&chat).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["pruning"]["recipe_id"], id.as_str());
    assert_eq!(out["pruning"]["visual_tokens_kept"], 64 - total, "{out}");
}
