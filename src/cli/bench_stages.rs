//! `fitprune bench --stages`: where one unpruned prefill's time goes, in a warm process.
//!
//! Stages: vision tower + projector (+ the merge into the token embeddings), the decoder as one
//! `Llama::forward` (the path `serve` runs), the same decoder split into its attention halves
//! (norm, projections, RoPE, scores, softmax, values) and the rest (`o_proj`, residuals, norm,
//! MLP) through `Llama::layer_attention` / `layer_finish`, and the LM head on the last row.
//! `scripts/prefill_vs_transformers.py --stages` times transformers' same stages beside it.

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::model::llama::NoHook;
use crate::model::{LlavaModel, PreparedPrompt};

/// Forces `t`'s computation to finish (a no-op on the CPU, a sync on CUDA) cheaply.
fn wait(t: &Tensor) -> anyhow::Result<()> {
    t.flatten_all()?.narrow(0, 0, 1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(())
}

const NAMES: [&str; 5] = ["vision+projector", "decoder", "decoder attention", "decoder rest", "lm head"];

/// Times each stage `reps` times after a warm-up; prints medians with [min..max] and returns
/// every repetition's seconds per stage.
pub fn run(model: &LlavaModel, prompt: &PreparedPrompt, reps: usize) -> anyhow::Result<serde_json::Value> {
    let llama = model.llama();
    let positions: Vec<u32> = (0..prompt.input_ids.len() as u32).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    for rep in 0..=reps {
        let mut got = [0.0; NAMES.len()];
        let t = Instant::now();
        let embeds = model.input_embeds(prompt)?;
        wait(&embeds)?;
        got[0] = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = llama.forward(&embeds, &positions, &mut model.new_cache(), &mut NoHook)?;
        wait(&out.hidden)?;
        got[1] = t.elapsed().as_secs_f64();
        let mut x = embeds;
        for l in 0..llama.num_layers() {
            let t = Instant::now();
            let (attn, _probs) = llama.layer_attention(l, &x, &positions)?;
            wait(&attn)?;
            got[2] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            x = llama.layer_finish(l, &x, &attn, None)?;
            wait(&x)?;
            got[3] += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        llama.last_logits(&out.hidden)?.to_vec2::<f32>()?;
        got[4] = t.elapsed().as_secs_f64();
        if rep > 0 {
            times.iter_mut().zip(got).for_each(|(v, g)| v.push(g));
        }
    }
    println!("prefill stages: {} prompt tokens, {reps} reps after a warm-up, median [min..max] s", positions.len());
    let mut json = serde_json::Map::new();
    for (name, v) in NAMES.iter().zip(&times) {
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        println!("{name:>18}: {median:.4} [{:.4}..{:.4}]", sorted[0], sorted[n - 1]);
        json.insert((*name).into(), serde_json::json!(v));
    }
    Ok(serde_json::Value::Object(json))
}
