//! The fused attention path through the model's own call sites, on the CPU: with
//! `fused_attn_emulate` standing in for the CUDA kernels (their contract, not our masks), prefill,
//! pruning, batched (varlen) prefill and decode give what the eager path gives, and the calls go
//! where they should (fused where no probabilities are read and the mask has a fused shape,
//! eager elsewhere).

use candle_core::{DType, Device, IndexOp};
use candle_nn::VarBuilder;

use super::fused_attn::emulate::with_emulation;
use super::llama::{KvCache, Llama, NoHook};
use super::llama_tests::{
    assert_close, cfg, embeds, mixed_cases, model, prefill_batch, rows, weights, FixedPrune, IDS, LAYERS,
};

/// One prompt pruned at layer 1 (holes in the later layers' positions), then three decode steps
/// through `forward`: every hidden row it produced.
fn single(m: &Llama, w: &std::collections::HashMap<String, candle_core::Tensor>) -> Vec<Vec<Vec<f32>>> {
    let mut cache = KvCache::new(LAYERS);
    let pos: Vec<u32> = (0..IDS.len() as u32).collect();
    let mut prune = FixedPrune { layer: 1, keep: vec![0, 1, 3, 6, 7, 8], seen: None };
    let out = m.forward(&embeds(w, &IDS).0, &pos, &mut cache, &mut prune).unwrap();
    let mut got = vec![rows(&out.hidden.i(0).unwrap())];
    for (step, token) in [11u32, 4, 20].into_iter().enumerate() {
        let at = IDS.len() as u32 + step as u32;
        let out = m.forward(&embeds(w, &[token]).0, &[at], &mut cache, &mut NoHook).unwrap();
        got.push(rows(&out.hidden.i(0).unwrap()));
    }
    got
}

/// Three prompts prefilled in one batch (one pruned at layer 0, one at layer 1, one not), then
/// three batched decode steps: every hidden row and logit row.
fn batched(m: &Llama, w: &std::collections::HashMap<String, candle_core::Tensor>) -> Vec<Vec<Vec<f32>>> {
    let cases = mixed_cases();
    let (outs, mut caches, _) = prefill_batch(m, w, &cases);
    let mut got: Vec<Vec<Vec<f32>>> = outs.iter().map(|o| rows(&o.hidden.i(0).unwrap())).collect();
    for step in 0..3u32 {
        let tokens: Vec<u32> = (0..3).map(|i| (step * 7 + i * 3 + 1) % 40).collect();
        let positions: Vec<u32> = cases.iter().map(|c| c.ids.len() as u32 + step).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        got.push(rows(&m.decode_batch(&tokens, &positions, &mut refs).unwrap()));
    }
    got
}

fn assert_all_close(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_close(x, y, 1e-5);
    }
}

#[test]
fn the_fused_path_equals_eager_and_runs_exactly_where_no_probabilities_are_read() {
    let w = weights();
    let m = model(&w);
    let eager = single(&m, &w);
    let (fused, calls) = with_emulation(|| single(&m, &w));
    assert_all_close(&fused, &eager);
    // Prefill: layers 0 and 2 fused, layer 1 (the hook reads its probabilities) eager; each of
    // the 3 decode steps fuses all 3 layers.
    assert_eq!(calls, (2 + 3 * 3, 0));

    let eager = batched(&m, &w);
    let (fused, calls) = with_emulation(|| batched(&m, &w));
    assert_all_close(&fused, &eager);
    // Layer 0: the two sequences not pruning there fused one by one, layer 1 likewise; layer 2
    // (nobody reads probabilities) one varlen call for all three; then 3 steps x 3 layers x 3
    // sequences of decode.
    assert_eq!(calls, (2 + 2 + 3 * 3 * 3, 1));
}

#[test]
fn under_a_sliding_window_pruned_holes_fall_back_to_eager_and_the_rest_is_fused() {
    let w = weights();
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut windowed = cfg();
    windowed.sliding_window = Some(4);
    let m = Llama::load(vb.clone(), Some(vb.pp("lm_head")), &windowed).unwrap();
    let eager = single(&m, &w);
    let (fused, calls) = with_emulation(|| single(&m, &w));
    assert_all_close(&fused, &eager);
    // Layer 0 (contiguous positions) takes the kernel's window; layer 2's kept rows
    // [0, 1, 3, 6, 7, 8] have holes the window bites into, so it stays eager, in prefill and in
    // each decode step, while layers 0 and 1 (full caches) are fused there.
    assert_eq!(calls, (1 + 3 * 2, 0));
    // And the window matters here: without it the outputs differ.
    let plain = single(&model(&w), &w);
    let moved =
        plain.iter().flatten().flatten().zip(eager.iter().flatten().flatten()).any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(moved, "the sliding window changed nothing");

    let eager = batched(&m, &w);
    let (fused, calls) = with_emulation(|| batched(&m, &w));
    assert_all_close(&fused, &eager);
    assert!(calls.0 > 0, "{calls:?}");
}
