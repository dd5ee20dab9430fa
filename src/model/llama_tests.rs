//! Tests of the decoder hooks against a naive per-head reference written independently of
//! `llama.rs` (explicit loops for RoPE, masking by position and row removal).

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::TextConfig;
use super::llama::{DecoderHook, DecoderOutput, KvCache, Llama, NoHook};
use super::llama_batch::BatchSequence;
use super::Result;

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 48;
pub(super) const LAYERS: usize = 3;
const VOCAB: usize = 40;

pub(super) fn cfg() -> TextConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0
    }))
    .unwrap()
}

pub(super) fn weights() -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        let n: usize = shape.iter().product();
        let d = Normal::new(mean, std).unwrap();
        let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng)).collect();
        w.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    put("embed_tokens.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = format!("layers.{l}");
        put(format!("{p}.self_attn.q_proj.weight"), &[HIDDEN, HIDDEN], 0.4, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.2, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HIDDEN], 0.2, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), &[INTER, HIDDEN], 0.2, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[INTER, HIDDEN], 0.2, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTER], 0.2, 0.0);
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.1, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.1, 1.0);
    }
    put("norm.weight".into(), &[HIDDEN], 0.1, 1.0);
    put("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.3, 0.0);
    w
}

pub(super) fn model(w: &HashMap<String, Tensor>) -> Llama {
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    Llama::load(vb.clone(), Some(vb.pp("lm_head")), &cfg()).unwrap()
}

pub(super) fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn matvec(w: &Tensor, x: &[f32]) -> Vec<f32> {
    let w = rows(w);
    w.iter().map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms(x: &[f32], w: &Tensor) -> Vec<f32> {
    let w = w.to_vec1::<f32>().unwrap();
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(&w).map(|(v, g)| v * r * g).collect()
}

/// Rotates one head vector by RoPE at `pos` (rotate-half convention).
fn rope(v: &[f32], pos: u32) -> Vec<f32> {
    let half = v.len() / 2;
    let mut out = vec![0.0; v.len()];
    for i in 0..half {
        let f = 1.0 / 10000f32.powf((2 * i) as f32 / v.len() as f32);
        let (s, c) = (pos as f32 * f).sin_cos();
        out[i] = v[i] * c - v[i + half] * s;
        out[i + half] = v[i + half] * c + v[i] * s;
    }
    out
}

/// Naive decoder over `xs` (rows at `pos`); at `prune = (layer, keep)` rows not in `keep` are
/// removed after that layer's attention. Returns final-normed rows and the attention
/// probabilities of layer `probe` (heads x rows x rows).
fn reference(
    w: &HashMap<String, Tensor>,
    mut xs: Vec<Vec<f32>>,
    mut pos: Vec<u32>,
    prune: Option<(usize, Vec<usize>)>,
    probe: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let mut probed = Vec::new();
    for l in 0..LAYERS {
        let g = |n: &str| &w[&format!("layers.{l}.{n}")];
        let h: Vec<Vec<f32>> = xs.iter().map(|x| rms(x, g("input_layernorm.weight"))).collect();
        let q: Vec<Vec<f32>> = h.iter().map(|x| matvec(g("self_attn.q_proj.weight"), x)).collect();
        let k: Vec<Vec<f32>> = h.iter().map(|x| matvec(g("self_attn.k_proj.weight"), x)).collect();
        let v: Vec<Vec<f32>> = h.iter().map(|x| matvec(g("self_attn.v_proj.weight"), x)).collect();
        let n = xs.len();
        let mut attn = vec![vec![0.0f32; HIDDEN]; n];
        let mut layer_probs = Vec::new();
        for head in 0..HEADS {
            let kvh = head / (HEADS / KV_HEADS);
            let hq = |i: usize| rope(&q[i][head * HEAD_DIM..(head + 1) * HEAD_DIM], pos[i]);
            let hk = |j: usize| rope(&k[j][kvh * HEAD_DIM..(kvh + 1) * HEAD_DIM], pos[j]);
            let mut head_probs = Vec::new();
            for i in 0..n {
                let qi = hq(i);
                let scores: Vec<f32> = (0..n)
                    .map(|j| {
                        if pos[j] > pos[i] {
                            f32::NEG_INFINITY
                        } else {
                            qi.iter().zip(hk(j)).map(|(a, b)| a * b).sum::<f32>() / (HEAD_DIM as f32).sqrt()
                        }
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                let p: Vec<f32> = e.iter().map(|x| x / z).collect();
                for d in 0..HEAD_DIM {
                    attn[i][head * HEAD_DIM + d] = (0..n).map(|j| p[j] * v[j][kvh * HEAD_DIM + d]).sum();
                }
                head_probs.push(p);
            }
            layer_probs.push(head_probs);
        }
        if l == probe {
            probed = layer_probs;
        }
        if let Some((pl, keep)) = &prune {
            if *pl == l {
                xs = keep.iter().map(|&i| xs[i].clone()).collect();
                attn = keep.iter().map(|&i| attn[i].clone()).collect();
                pos = keep.iter().map(|&i| pos[i]).collect();
            }
        }
        for (x, a) in xs.iter_mut().zip(&attn) {
            let o = matvec(g("self_attn.o_proj.weight"), a);
            x.iter_mut().zip(o).for_each(|(x, o)| *x += o);
            let hn = rms(x, g("post_attention_layernorm.weight"));
            let gate = matvec(g("mlp.gate_proj.weight"), &hn);
            let up = matvec(g("mlp.up_proj.weight"), &hn);
            let act: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| silu(*a) * b).collect();
            let down = matvec(g("mlp.down_proj.weight"), &act);
            x.iter_mut().zip(down).for_each(|(x, d)| *x += d);
        }
    }
    (xs.iter().map(|x| rms(x, &w["norm.weight"])).collect(), probed)
}

/// Prunes to fixed rows at one layer and records the probabilities it was shown.
pub(super) struct FixedPrune {
    pub(super) layer: usize,
    pub(super) keep: Vec<u32>,
    pub(super) seen: Option<Tensor>,
}

impl DecoderHook for FixedPrune {
    fn wants_attention(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn on_attention(&mut self, _: usize, probs: &Tensor, _: &[u32]) -> Result<Option<Vec<u32>>> {
        self.seen = Some(probs.clone());
        Ok(Some(self.keep.clone()))
    }
}

pub(super) fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() <= tol, "{x} vs {y}");
        }
    }
}

pub(super) fn embeds(w: &HashMap<String, Tensor>, ids: &[u32]) -> (Tensor, Vec<Vec<f32>>) {
    let e = w["embed_tokens.weight"].index_select(&Tensor::new(ids, &Device::Cpu).unwrap(), 0).unwrap();
    let r = rows(&e);
    (e.unsqueeze(0).unwrap(), r)
}

pub(super) const IDS: [u32; 9] = [1, 5, 7, 7, 7, 7, 12, 3, 9];

#[test]
fn unpruned_forward_matches_reference_and_exposes_probabilities() {
    let w = weights();
    let m = model(&w);
    let (e, er) = embeds(&w, &IDS);
    let pos: Vec<u32> = (0..IDS.len() as u32).collect();
    let mut hook = FixedPrune { layer: 1, keep: (0..IDS.len() as u32).collect(), seen: None };
    let out = m.forward(&e, &pos, &mut KvCache::new(LAYERS), &mut hook).unwrap();
    let (want, probs) = reference(&w, er, pos.clone(), None, 1);
    assert_close(&rows(&out.hidden.i(0).unwrap()), &want, 1e-4);
    let seen = hook.seen.unwrap();
    assert_eq!(seen.dims(), &[1, HEADS, IDS.len(), IDS.len()]);
    for (h, head) in probs.iter().enumerate() {
        assert_close(&rows(&seen.i((0, h)).unwrap()), head, 1e-5);
    }
}

#[test]
fn rows_removed_mid_way_match_reference_and_caches_differ_by_layer() {
    let w = weights();
    let m = model(&w);
    let (e, er) = embeds(&w, &IDS);
    let pos: Vec<u32> = (0..IDS.len() as u32).collect();
    let keep = vec![0u32, 1, 3, 6, 7, 8];
    let mut hook = FixedPrune { layer: 1, keep: keep.clone(), seen: None };
    let mut cache = KvCache::new(LAYERS);
    let out = m.forward(&e, &pos, &mut cache, &mut hook).unwrap();
    let keep_us: Vec<usize> = keep.iter().map(|&k| k as usize).collect();
    let (want, _) = reference(&w, er, pos, Some((1, keep_us)), 0);
    assert_close(&rows(&out.hidden.i(0).unwrap()), &want, 1e-4);
    assert_eq!(out.positions, keep);
    // Layers up to the pruning one cached every token; later layers only the kept ones.
    assert_eq!(cache.lengths(), vec![9, 9, 6]);
    assert_eq!(cache.layer(2).positions(), keep.as_slice());
}

#[test]
fn decode_after_pruning_continues_at_the_original_length() {
    let w = weights();
    let m = model(&w);
    let (e, _) = embeds(&w, &IDS);
    let n = IDS.len() as u32;
    let pos: Vec<u32> = (0..n).collect();
    let keep = vec![0u32, 2, 5, 6, 8];
    let mut cache = KvCache::new(LAYERS);
    m.forward(&e, &pos, &mut cache, &mut FixedPrune { layer: 0, keep: keep.clone(), seen: None }).unwrap();
    let next = 11u32;
    let (e1, _) = embeds(&w, &[next]);
    let step = m.forward(&e1, &[n], &mut cache, &mut NoHook).unwrap();

    // Reference: one pass over prompt + next token, pruning the same prompt rows.
    let mut all = IDS.to_vec();
    all.push(next);
    let (_, er) = embeds(&w, &all);
    let mut keep_all: Vec<usize> = keep.iter().map(|&k| k as usize).collect();
    keep_all.push(IDS.len());
    let (want, _) = reference(&w, er, (0..=n).collect(), Some((0, keep_all)), 0);
    assert_close(&rows(&step.hidden.i(0).unwrap()), &want[want.len() - 1..], 1e-4);
    assert_eq!(step.positions, vec![n]);
    assert_eq!(cache.lengths(), vec![10, 6, 6]);
}

#[test]
fn forward_rejects_mismatched_positions() {
    let w = weights();
    let m = model(&w);
    let (e, _) = embeds(&w, &IDS);
    assert!(m.forward(&e, &[0, 1], &mut KvCache::new(LAYERS), &mut NoHook).is_err());
}

/// One sequence of the batch tests: ids and the rows to keep at a layer (or no pruning).
pub(super) struct Case {
    pub(super) ids: Vec<u32>,
    pub(super) prune: Option<(usize, Vec<u32>)>,
}

pub(super) fn hook(c: &Case) -> FixedPrune {
    match &c.prune {
        Some((layer, keep)) => FixedPrune { layer: *layer, keep: keep.clone(), seen: None },
        None => FixedPrune { layer: usize::MAX, keep: Vec::new(), seen: None },
    }
}

/// Three prompts of different lengths: one pruned at layer 1, one unpruned, one pruned at layer 0.
pub(super) fn mixed_cases() -> [Case; 3] {
    [
        Case { ids: IDS.to_vec(), prune: Some((1, vec![0, 1, 3, 6, 7, 8])) },
        Case { ids: vec![4, 2, 9, 1, 3], prune: None },
        Case { ids: vec![8, 8, 3, 1, 0, 5, 2], prune: Some((0, vec![0, 2, 3, 6])) },
    ]
}

/// Prefills `cases` in one batch from empty caches: the outputs, the caches it filled and the
/// hooks (with what they saw).
pub(super) fn prefill_batch(
    m: &Llama,
    w: &HashMap<String, Tensor>,
    cases: &[Case],
) -> (Vec<DecoderOutput>, Vec<KvCache>, Vec<FixedPrune>) {
    let mut caches: Vec<KvCache> = cases.iter().map(|_| KvCache::new(LAYERS)).collect();
    let mut hooks: Vec<FixedPrune> = cases.iter().map(hook).collect();
    let mut seqs: Vec<BatchSequence> = cases
        .iter()
        .zip(caches.iter_mut().zip(hooks.iter_mut()))
        .map(|(c, (cache, hook))| BatchSequence {
            embeds: embeds(w, &c.ids).0,
            positions: (0..c.ids.len() as u32).collect(),
            cache,
            hook,
        })
        .collect();
    let outs = m.forward_batch(&mut seqs).unwrap();
    drop(seqs);
    (outs, caches, hooks)
}

#[test]
fn batched_prefill_matches_each_sequence_alone_and_decodes_from_its_caches() {
    let w = weights();
    let m = model(&w);
    let cases = mixed_cases();
    let (batched, mut caches, hooks) = prefill_batch(&m, &w, &cases);
    for (i, c) in cases.iter().enumerate() {
        let mut cache = KvCache::new(LAYERS);
        let mut alone = hook(c);
        let pos: Vec<u32> = (0..c.ids.len() as u32).collect();
        let want = m.forward(&embeds(&w, &c.ids).0, &pos, &mut cache, &mut alone).unwrap();
        assert_eq!(batched[i].positions, want.positions, "sequence {i}: kept rows");
        assert_close(&rows(&batched[i].hidden.i(0).unwrap()), &rows(&want.hidden.i(0).unwrap()), 1e-5);
        assert_eq!(caches[i].lengths(), cache.lengths(), "sequence {i}: cache lengths");
        for l in 0..LAYERS {
            assert_eq!(caches[i].layer(l).positions(), cache.layer(l).positions());
        }
        match (&hooks[i].seen, &alone.seen) {
            (Some(a), Some(b)) => {
                assert_eq!(a.dims(), b.dims());
                for h in 0..HEADS {
                    assert_close(&rows(&a.i((0, h)).unwrap()), &rows(&b.i((0, h)).unwrap()), 1e-5);
                }
            }
            (None, None) => {}
            _ => panic!("sequence {i}: the hook saw attention in one path only"),
        }
        // The caches the batch filled serve decode steps like the single-sequence ones.
        let (next, _) = embeds(&w, &[11]);
        let n = c.ids.len() as u32;
        let got = m.forward(&next, &[n], &mut caches[i], &mut NoHook).unwrap();
        let want = m.forward(&next, &[n], &mut cache, &mut NoHook).unwrap();
        assert_close(&rows(&got.hidden.i(0).unwrap()), &rows(&want.hidden.i(0).unwrap()), 1e-5);
    }
}

#[test]
fn bad_hook_answers_and_used_caches_are_errors_not_panics() {
    let w = weights();
    let m = model(&w);
    let (e, _) = embeds(&w, &IDS);
    let pos: Vec<u32> = (0..IDS.len() as u32).collect();
    for keep in [vec![0u32, 99], vec![3, 1], vec![]] {
        let mut bad = FixedPrune { layer: 0, keep: keep.clone(), seen: None };
        assert!(m.forward(&e, &pos, &mut KvCache::new(LAYERS), &mut bad).is_err(), "{keep:?}");
        let mut bad = FixedPrune { layer: 0, keep: keep.clone(), seen: None };
        let (mut c1, mut c2, mut other) = (KvCache::new(LAYERS), KvCache::new(LAYERS), NoHook);
        let mut seqs = vec![
            BatchSequence { embeds: e.clone(), positions: pos.clone(), cache: &mut c1, hook: &mut bad },
            BatchSequence { embeds: e.clone(), positions: pos.clone(), cache: &mut c2, hook: &mut other },
        ];
        assert!(m.forward_batch(&mut seqs).is_err(), "{keep:?}");
    }
    let mut used = KvCache::new(LAYERS);
    m.forward(&e, &pos, &mut used, &mut NoHook).unwrap();
    let mut none = NoHook;
    let mut seqs = vec![BatchSequence { embeds: e.clone(), positions: pos.clone(), cache: &mut used, hook: &mut none }];
    assert!(m.forward_batch(&mut seqs).is_err());
}

#[test]
fn decoding_past_the_cache_headroom_matches_one_pass() {
    let w = weights();
    let m = model(&w);
    // 300 decode steps outgrow the first KV buffer (prompt + 256 tokens) at least once.
    let ids: Vec<u32> =
        (0..IDS.len() + 300).map(|i| if i < IDS.len() { IDS[i] } else { (i * 7 % VOCAB) as u32 }).collect();
    let mut cache = KvCache::new(LAYERS);
    let n = IDS.len();
    m.forward(&embeds(&w, &ids[..n]).0, &(0..n as u32).collect::<Vec<_>>(), &mut cache, &mut NoHook).unwrap();
    let mut last = None;
    for (p, &id) in ids.iter().enumerate().skip(n) {
        last = Some(m.forward(&embeds(&w, &[id]).0, &[p as u32], &mut cache, &mut NoHook).unwrap());
    }
    assert_eq!(cache.lengths(), vec![ids.len(); LAYERS]);
    let all: Vec<u32> = (0..ids.len() as u32).collect();
    let one_pass = m.forward(&embeds(&w, &ids).0, &all, &mut KvCache::new(LAYERS), &mut NoHook).unwrap();
    let want = rows(&one_pass.hidden.i(0).unwrap());
    assert_close(&rows(&last.unwrap().hidden.i(0).unwrap()), &want[want.len() - 1..], 1e-4);
}

#[test]
fn batched_decode_matches_each_sequence_alone_over_caches_of_different_lengths() {
    let w = weights();
    let m = model(&w);
    // Different prompt lengths, pruned at different layers, one unpruned: after prefill the
    // caches differ per sequence and per layer.
    let cases = mixed_cases();
    let prefill = |c: &Case| {
        let mut cache = KvCache::with_growth(LAYERS, 4);
        let pos: Vec<u32> = (0..c.ids.len() as u32).collect();
        m.forward(&embeds(&w, &c.ids).0, &pos, &mut cache, &mut hook(c)).unwrap();
        cache
    };
    let mut batched: Vec<KvCache> = cases.iter().map(prefill).collect();
    let mut alone: Vec<KvCache> = cases.iter().map(prefill).collect();
    assert_ne!(batched[0].lengths(), batched[2].lengths());
    for step in 0..6u32 {
        let tokens: Vec<u32> = (0..cases.len() as u32).map(|i| (step * 5 + i * 3) % VOCAB as u32).collect();
        let positions: Vec<u32> = cases.iter().map(|c| c.ids.len() as u32 + step).collect();
        let lengths: Vec<Vec<usize>> = batched.iter().map(KvCache::lengths).collect();
        let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
        let logits = rows(&m.decode_batch(&tokens, &positions, &mut refs).unwrap());
        for i in 0..cases.len() {
            // Alone: the old single-sequence path, one row through `forward`.
            let (e, _) = embeds(&w, &tokens[i..i + 1]);
            let out = m.forward(&e, &positions[i..i + 1], &mut alone[i], &mut NoHook).unwrap();
            let want = rows(&m.last_logits(&out.hidden).unwrap());
            assert_close(&logits[i..i + 1], &want, 1e-5);
            let grown: Vec<usize> = lengths[i].iter().map(|l| l + 1).collect();
            assert_eq!(batched[i].lengths(), grown, "sequence {i} step {step}");
        }
    }
    // Prefill reserved rows + 4; the 5th decode step outgrew that and reallocated needed + 4
    // (= rows + 5 + 4), and the logits above stayed exact across the reallocation.
    for (i, c) in cases.iter().enumerate() {
        let pruned_rows = c.prune.as_ref().map_or(c.ids.len(), |(_, keep)| keep.len());
        for l in 0..LAYERS {
            let first = match &c.prune {
                Some((layer, _)) if l > *layer => pruned_rows,
                _ => c.ids.len(),
            };
            assert_eq!(batched[i].layer(l).capacity(), first + 5 + 4, "sequence {i} layer {l}");
        }
    }
}

#[test]
fn a_truncated_cache_decodes_as_if_the_undone_step_never_ran() {
    let w = weights();
    let m = model(&w);
    let pos: Vec<u32> = (0..IDS.len() as u32).collect();
    let mut cache = KvCache::with_growth(LAYERS, 8);
    m.forward(&embeds(&w, &IDS).0, &pos, &mut cache, &mut NoHook).unwrap();
    let before = cache.lengths();
    let n = IDS.len() as u32;
    let first = rows(&m.decode_batch(&[3], &[n], &mut [&mut cache]).unwrap());
    m.decode_batch(&[7], &[n + 1], &mut [&mut cache]).unwrap();
    cache.truncate(&before);
    assert_eq!(cache.lengths(), before);
    let again = rows(&m.decode_batch(&[3], &[n], &mut [&mut cache]).unwrap());
    assert_close(&again, &first, 0.0);
    assert!(m.decode_batch(&[3, 4], &[n], &mut [&mut cache]).is_err());
}

#[test]
fn batched_decode_enforces_a_sliding_window_like_the_single_sequence_path() {
    let w = weights();
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut windowed = cfg();
    windowed.sliding_window = Some(4);
    let m = Llama::load(vb.clone(), Some(vb.pp("lm_head")), &windowed).unwrap();
    let plain = model(&w);
    let prompts = [IDS.to_vec(), vec![4, 2, 9, 1, 3, 7, 7]];
    let prefill = |m: &Llama, ids: &[u32]| {
        let mut cache = KvCache::with_growth(LAYERS, 4);
        let pos: Vec<u32> = (0..ids.len() as u32).collect();
        m.forward(&embeds(&w, ids).0, &pos, &mut cache, &mut NoHook).unwrap();
        cache
    };
    let mut batched: Vec<KvCache> = prompts.iter().map(|p| prefill(&m, p)).collect();
    let mut alone: Vec<KvCache> = prompts.iter().map(|p| prefill(&m, p)).collect();
    let mut unwindowed: Vec<KvCache> = prompts.iter().map(|p| prefill(&plain, p)).collect();
    let tokens = [5u32, 6];
    let positions: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
    let got = rows(&m.decode_batch(&tokens, &positions, &mut refs).unwrap());
    let mut refs: Vec<&mut KvCache> = unwindowed.iter_mut().collect();
    let without = rows(&plain.decode_batch(&tokens, &positions, &mut refs).unwrap());
    for i in 0..prompts.len() {
        let (e, _) = embeds(&w, &tokens[i..i + 1]);
        let out = m.forward(&e, &positions[i..i + 1], &mut alone[i], &mut NoHook).unwrap();
        assert_close(&got[i..i + 1], &rows(&m.last_logits(&out.hidden).unwrap()), 1e-5);
        // The window hides keys here, so ignoring it would give other logits.
        let differs = got[i].iter().zip(&without[i]).any(|(a, b)| (a - b).abs() > 1e-3);
        assert!(differs, "sequence {i}: the sliding window changed nothing");
    }
}

#[test]
fn device_mask_equals_the_rule_it_encodes() {
    use super::visibility::position_mask;
    // Prefill rows with pruning gaps, decode rows, keys from a pruned cache; with and without a window.
    let cases: Vec<(Vec<u32>, Vec<u32>)> = vec![
        ((0..9).collect(), (0..9).collect()),
        (vec![0, 1, 4, 7, 8, 12], vec![0, 1, 4, 7, 8, 12]),
        (vec![13, 14], vec![0, 2, 3, 9, 12, 13, 14]),
        (vec![20], (0..21).collect()),
    ];
    for (rows, keys) in &cases {
        for window in [None, Some(3), Some(6), Some(100)] {
            let visible = |r: u32, k: u32| k <= r && window.is_none_or(|w| r - k < w);
            let want: Vec<Vec<f32>> = rows
                .iter()
                .map(|&r| keys.iter().map(|&k| if visible(r, k) { 0.0 } else { f32::NEG_INFINITY }).collect())
                .collect();
            let got = position_mask(rows, keys, window, &Device::Cpu).unwrap();
            match got {
                Some(m) => assert_eq!(rows_of(&m), want, "rows {rows:?} keys {keys:?} window {window:?}"),
                None => assert!(want.iter().flatten().all(|&v| v == 0.0), "None for a mask that hides keys"),
            }
        }
    }
}

#[test]
fn device_rope_table_equals_host_tables_inside_and_past_the_table() {
    use super::llama::{host_tables, Rotary};
    let mut c = cfg();
    c.max_position_embeddings = 64;
    let rotary = Rotary::new(&c, DType::F32, &Device::Cpu).unwrap();
    for positions in [vec![0u32, 1, 2, 5, 63], vec![7, 3, 40], vec![10, 64, 500]] {
        let (cos, sin) = rotary.tables(&positions, &Device::Cpu).unwrap();
        let (want_cos, want_sin) = host_tables(&rotary.inv_freq, &positions, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(rows_of(&cos), rows_of(&want_cos), "{positions:?}");
        assert_eq!(rows_of(&sin), rows_of(&want_sin), "{positions:?}");
    }
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn stacked_qkv_projection_equals_the_three_projections_bit_for_bit() {
    use super::llama::Attention;
    let mut c = cfg();
    c.attention_bias = true;
    let dev = Device::Cpu;
    let rows = 37;
    let mut w = HashMap::new();
    for (name, out) in
        [("q_proj", HIDDEN), ("k_proj", KV_HEADS * HEAD_DIM), ("v_proj", KV_HEADS * HEAD_DIM), ("o_proj", HIDDEN)]
    {
        w.insert(format!("{name}.weight"), Tensor::randn(0f32, 0.3, (out, HIDDEN), &dev).unwrap());
        w.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.3, out, &dev).unwrap());
    }
    let attn = Attention::load(VarBuilder::from_tensors(w.clone(), DType::F32, &dev), &c).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, rows, HIDDEN), &dev).unwrap();
    let cos = Tensor::randn(0f32, 1.0, (rows, HEAD_DIM / 2), &dev).unwrap();
    let sin = Tensor::randn(0f32, 1.0, (rows, HEAD_DIM / 2), &dev).unwrap();
    let (q, k, v) = attn.project(&x, &cos, &sin).unwrap();
    let one = |name: &str, heads: usize| {
        let lin =
            candle_nn::Linear::new(w[&format!("{name}.weight")].clone(), Some(w[&format!("{name}.bias")].clone()));
        let y = candle_nn::Module::forward(&lin, &x).unwrap();
        y.reshape((2, rows, heads, HEAD_DIM)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
    };
    let bits = |t: &Tensor| {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
    };
    let rope = |t: Tensor| candle_nn::rotary_emb::rope(&t, &cos, &sin).unwrap();
    assert_eq!(bits(&q), bits(&rope(one("q_proj", HEADS))));
    assert_eq!(bits(&k), bits(&rope(one("k_proj", KV_HEADS))));
    assert_eq!(bits(&v), bits(&one("v_proj", KV_HEADS)));
}
