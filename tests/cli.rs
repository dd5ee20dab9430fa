//! The `fitprune` binary end to end: demo-model, generate (plain and pruned), calibrate.

mod common;

use std::path::Path;
use std::process::Command;

use fitprune::pruning::Recipe;

fn fitprune(args: &[&str], cache: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fitprune"))
        .args(args)
        .env("FITPRUNE_CACHE_DIR", cache)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fitprune")
}

/// `fitprune calibrate` on `model` with `dataset`, images from the parity fixtures, plus `extra`.
fn calibrate(model: &Path, dataset: &Path, extra: &[&str], cache: &Path) -> std::process::Output {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let mut args = vec!["calibrate", "--model", model.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
    args.extend(["--image-dir", images.to_str().unwrap()]);
    args.extend(extra);
    fitprune(&args, cache)
}

fn image(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(name).display().to_string()
}

#[test]
fn generate_on_the_builtin_demo_model_labels_random_weights() {
    let cache = tempfile::tempdir().unwrap();
    let out = fitprune(&["generate", "--image", &image("wide.png"), "--max-tokens", "4", "--json"], cache.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RANDOM WEIGHTS"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["random_weights"], true);
    assert_eq!(doc["image_tokens"], 144);
    assert!(doc["tokens"].as_array().unwrap().len() <= 4);
    assert!(doc["timings"]["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn calibrate_then_generate_pruned() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    assert!(fitprune(&["demo-model", model.to_str().unwrap()], cache.path()).status.success());
    let dataset = work.path().join("calib.jsonl");
    std::fs::write(
        &dataset,
        "{\"question_id\": 1, \"image\": \"wide.png\", \"text\": \"What is in the image?\"}\n\
         {\"question_id\": \"b\", \"image\": \"tall.png\", \"text\": \"Describe the colours.\"}\n",
    )
    .unwrap();
    let recipes = work.path().join("recipes.json");
    let out = calibrate(&model, &dataset, &["--budgets", "0.3,0.6", "--out", recipes.to_str().unwrap()], cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("layer evaluations"), "{stderr}");
    let fitted: Vec<Recipe> = serde_json::from_str(&std::fs::read_to_string(&recipes).unwrap()).unwrap();
    assert_eq!(fitted.len(), 2);
    for r in &fitted {
        assert_eq!(r.deletions.len(), 4);
        assert_eq!(r.visual_tokens, 144);
        // The search stops when the per-sample average meets the budget, but the recipe is the
        // floor-averaged deletion count (the authors' rule), which can lose up to one token per
        // layer: the recipe's own reduction may fall just short of the budget.
        assert!((r.achieved_reduction - r.budget).abs() < 0.02, "{r:?}");
        assert_eq!(r.model_fingerprint.len(), 32);
    }

    let out = fitprune(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--image",
            &image("square.png"),
            "--max-tokens",
            "3",
            "--json",
            "--recipe",
            recipes.to_str().unwrap(),
            "--budget",
            "0.5",
        ],
        cache.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &doc["pruning"];
    assert_eq!(p["budget"], 0.3, "0.5 selects the largest budget not above it");
    assert_eq!(p["visual_tokens"], 144);
    assert!(p["visual_tokens_kept"].as_u64().unwrap() < 144);
    assert!((p["flops_reduction"].as_f64().unwrap() - fitted[0].achieved_reduction).abs() < 1e-9);
}

#[test]
fn a_bad_dataset_line_is_named() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    assert!(fitprune(&["demo-model", model.to_str().unwrap()], cache.path()).status.success());
    let dataset = work.path().join("bad.jsonl");
    std::fs::write(&dataset, "{\"question_id\": 1, \"image\": \"wide.png\", \"text\": \"ok\"}\n{\"question_id\": 2}\n")
        .unwrap();
    let out = calibrate(&model, &dataset, &[], cache.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[test]
fn recipes_store_round_trip_through_the_cli() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    let m = model.to_str().unwrap();
    assert!(fitprune(&["demo-model", m], cache.path()).status.success());
    let db = format!("sqlite://{}", work.path().join("r.db").display());
    let file = work.path().join("in.json");
    std::fs::write(&file, r#"[{"deletions": [10, 5, 0, 0], "budget": 0.2, "name": "mine"}]"#).unwrap();

    let out =
        fitprune(&["recipes", "--database-url", &db, "import", file.to_str().unwrap(), "--model", m], cache.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The authors' 7B schemes have 32 layers; the 4-layer demo model must refuse them.
    let out = fitprune(
        &["recipes", "--database-url", &db, "import", "--authors", "authors-llava15-7b-50", "--model", m],
        cache.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 entries"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = fitprune(&["recipes", "--database-url", &db, "export"], cache.path());
    let listed: Vec<Recipe> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    let r = &listed[0];
    assert_eq!((r.name.as_str(), r.visual_tokens, r.model_fingerprint.len()), ("mine", 144, 32));
    assert!(r.id.starts_with("rcp_"));

    let out = fitprune(&["recipes", "--database-url", &db, "show", &r.id], cache.path());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"deletions\""));
    assert!(fitprune(&["recipes", "--database-url", &db, "delete", &r.id], cache.path()).status.success());
    let out = fitprune(&["recipes", "--database-url", &db, "delete", &r.id], cache.path());
    assert!(!out.status.success(), "deleting twice fails");
    let out = fitprune(&["recipes", "--database-url", &db, "export"], cache.path());
    assert_eq!(serde_json::from_slice::<Vec<Recipe>>(&out.stdout).unwrap().len(), 0);
}

#[test]
fn empty_environment_settings_count_as_unset() {
    let cache = tempfile::tempdir().unwrap();
    // An invalid flag makes `serve` exit during validation, after the environment was read.
    let out = Command::new(env!("CARGO_BIN_EXE_fitprune"))
        .args(["serve", "--max-running", "0"])
        .env("FITPRUNE_CACHE_DIR", cache.path())
        .env("FITPRUNE_DEFAULT_BUDGET", "")
        .env("FITPRUNE_MAX_WAITING", "")
        .output()
        .expect("run fitprune");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--max-running"), "{stderr}");
    assert!(!stderr.contains("default-budget") && !stderr.contains("max-waiting"), "{stderr}");
}

#[test]
fn a_cli_image_declaring_a_huge_canvas_is_refused_before_decoding() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let bomb = work.path().join("bomb.png");
    std::fs::write(&bomb, common::png_bomb(50_000, 50_000)).unwrap();
    let out = fitprune(&["generate", "--image", bomb.to_str().unwrap(), "--max-tokens", "1"], cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("50000x50000") && stderr.contains("pixels"), "{stderr}");
}

/// Answers one HTTP request on 127.0.0.1 with a PNG; returns the URL.
fn one_shot_png_server() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let png = fixture_bytes("square.png");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                png.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&png);
        }
    });
    format!("http://{addr}/square.png")
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(image(name)).unwrap()
}

#[test]
fn cli_image_urls_pass_the_private_address_guard_unless_allowed() {
    let cache = tempfile::tempdir().unwrap();
    let url = one_shot_png_server();
    let out = fitprune(&["generate", "--image", &url, "--max-tokens", "1"], cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("private") && stderr.contains("--allow-private-image-urls"), "{stderr}");
    // The server's opt-out flag works here too (the one-shot server is still waiting).
    let out = fitprune(&["generate", "--image", &url, "--max-tokens", "1", "--allow-private-image-urls"], cache.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sigterm_closes_the_database_cleanly() {
    use std::io::{BufRead, BufReader};
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("fp.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fitprune"))
        .args(["serve", "--addr", "127.0.0.1:0", "--database-url", &format!("sqlite://{}", db.display())])
        .env("FITPRUNE_CACHE_DIR", cache.path())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening") {
            break;
        }
    }
    assert!(log.contains("listening"), "{log}");
    let wal = work.path().join("fp.db-wal");
    assert!(wal.exists(), "the database runs in WAL mode while serving");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Drain the rest of the log so the child never blocks on a full pipe.
    for line in lines {
        log.push_str(&line.unwrap_or_default());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!wal.exists(), "-wal left behind\n{log}");
    assert!(!work.path().join("fp.db-shm").exists(), "-shm left behind\n{log}");
    assert!(db.exists());
}

#[test]
fn hr_demo_model_calibrates_and_generates_pruned() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("hr");
    let out = fitprune(&["demo-model", model.to_str().unwrap(), "--family", "hr"], cache.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("64 image tokens"));
    let dataset = work.path().join("calib.jsonl");
    std::fs::write(
        &dataset,
        "{\"question_id\": 1, \"image\": \"wide.png\", \"text\": \"What is in the image?\"}\n\
         {\"question_id\": 2, \"image\": \"tall.png\", \"text\": \"Describe the colours.\"}\n",
    )
    .unwrap();
    let recipes = work.path().join("recipes.json");
    let out = calibrate(&model, &dataset, &["--budgets", "0.4", "--out", recipes.to_str().unwrap()], cache.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fitted: Vec<Recipe> = serde_json::from_str(&std::fs::read_to_string(&recipes).unwrap()).unwrap();
    assert_eq!((fitted.len(), fitted[0].visual_tokens, fitted[0].deletions.len()), (1, 64, 4));
    let (m, img, r) = (model.to_str().unwrap(), image("square.png"), recipes.to_str().unwrap());
    let args = ["generate", "--model", m, "--image", &img, "--max-tokens", "3", "--json", "--recipe", r];
    let out = fitprune(&args, cache.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["image_tokens"], 64);
    let kept = 64 - fitted[0].deletions.iter().sum::<usize>();
    assert_eq!(doc["pruning"]["visual_tokens_kept"], kept);
}
