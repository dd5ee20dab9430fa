"""FitPrune reference: the authors' algorithm (ywh187/FitPrune, LLaVA_1.5) ported onto HF
transformers' LLaVA, for fitprune's demo checkpoints.

Writes tests/fixtures/parity/fitprune_expected.json, compared by tests/pruning_parity.rs.

Inference (the authors' patched `modeling_llama.py`): at a layer whose recipe entry d > 0,
take the head-wise max of the softmax attention, score visual token j by
cross_j * self_j (cross: summed over the text rows after the image; self: summed over visual
rows / n), delete the d lowest (torch.sort ascending, stable) from the attention output and
the residual before o_proj; kept tokens keep their position ids; each layer's KV cache keeps
what it saw; decoding continues at the original prompt length. The authors hard-code 35 system
tokens and 576 visual tokens; here the image span comes from the prompt.

Calibration (the authors' `statistical_analysis.py`): statistics W_cross / W_self on the unpruned
model, then the binary search over alpha with layer-by-layer pruned passes. Deviations, all
shared with the Rust implementation and stated in DESIGN.md §3: the deletion-count rule is the
longest ascending prefix whose removal keeps the mass at or above W - W*alpha (the authors' loop
takes i-1 at the first breaking i, identical, and leaves the count undefined if no i breaks;
we take len-1 then); prefix sums and W are accumulated in float64 from float32 scores; the
recipe kept is the one of the smallest alpha that reached the budget (the authors print the
last one tried).

Run after `cargo build` (see model_reference.py for the environment):
    /opt/refenv/bin/python tests/reference/fitprune_reference.py
"""

import json
import math
import os
import sys
import tempfile

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_reference import OUT, ROOT, demo_model, make_images, sha256  # noqa: E402

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv  # noqa: E402

TOP = 20
GREEDY = 8

# Fixed recipes for the tiny preset (4 layers, 144 visual tokens).
RECIPE_CASES = [
    {"name": "tiny_mid", "model": {"seed": 0}, "images": ["wide"], "text": "What is in the image?",
     "deletions": [0, 40, 30, 0]},
    {"name": "tiny_early", "model": {"seed": 0}, "images": ["tall"], "text": "Which colours dominate?",
     "deletions": [60, 20, 10, 5]},
    {"name": "mha_heavy", "model": {"seed": 1, "kv_heads": 4}, "images": ["square"], "text": "Describe it.",
     "deletions": [100, 30, 0, 0]},
    {"name": "two_images", "model": {"seed": 3}, "images": ["wide", "tall"], "text": "Compare the two pictures.",
     "deletions": [50, 50, 50, 20]},
]

CALIBRATION = {
    "model": {"seed": 0},
    "samples": [
        {"image": "wide", "text": "What is in the image?"},
        {"image": "tall", "text": "Which colours dominate this picture?"},
        {"image": "square", "text": "Describe it."},
        {"image": "wide", "text": "Is there anything unusual here? Answer briefly."},
    ],
    "budgets": [0.3, 0.5, 0.7],
    "tolerance": 0.01,
}


def load(model_dir):
    processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    return processor, model


def prepare(processor, model, images, image_names, text):
    content = [{"type": "image"} for _ in image_names] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pil = [Image.open(images[n]).convert("RGB") for n in image_names]
    inputs = processor(images=pil or None, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if pil:
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        feats = feats.reshape(-1, embeds.shape[-1])
        mask = (ids == model.config.image_token_index).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats)
    is_visual = (ids[0] == model.config.image_token_index).tolist()
    return inputs, embeds, is_visual


def roles(is_visual):
    first = is_visual.index(True) if True in is_visual else None
    visual = [i for i, v in enumerate(is_visual) if v]
    cross = [i for i, v in enumerate(is_visual) if not v and first is not None and i > first]
    return visual, cross


def attention(layer, lm, x, pos):
    """Eager attention of one decoder layer on rows x at position ids pos. Returns
    (attn_output before o_proj (1, rows, hidden), probs (1, heads, rows, keys), k, v)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    b, q_len, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(b, q_len, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, q_len, -1, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, q_len, -1, hd).transpose(1, 2)
    pos_t = torch.tensor([pos])
    cos, sin = lm.rotary_emb(v, pos_t)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def scaled_probs(attn, q, k_all, q_pos, k_pos):
    groups = q.shape[1] // k_all.shape[1]
    kk = repeat_kv(k_all, groups)
    scores = torch.matmul(q, kk.transpose(2, 3)) / math.sqrt(attn.head_dim)
    mask = torch.tensor([[0.0 if kp <= qp else float("-inf") for kp in k_pos] for qp in q_pos])
    return torch.softmax(scores + mask, dim=-1, dtype=torch.float32)


def finish(layer, x, out):
    x = x + layer.self_attn.o_proj(out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def head_out(attn, probs, v_all):
    groups = probs.shape[1] // v_all.shape[1]
    out = torch.matmul(probs, repeat_kv(v_all, groups))
    b, _, rows, _ = out.shape
    return out.transpose(1, 2).reshape(b, rows, -1)


def visual_scores(probs, is_visual):
    a = probs.max(dim=1).values[0]
    visual, cross = roles(is_visual)
    vis = torch.tensor(visual)
    cols = a[:, vis]
    self_s = cols[vis].sum(dim=0) / len(visual)
    cross_s = cols[torch.tensor(cross)].sum(dim=0) if cross else torch.zeros(len(visual))
    return self_s, cross_s, visual, cross


def pruned_generate(model, embeds, is_visual, deletions):
    lm = model.model.language_model
    n = embeds.shape[1]
    x = embeds
    pos = list(range(n))
    cache = []
    trace = []
    with torch.no_grad():
        for l, layer in enumerate(lm.layers):
            q, k, v = attention(layer, lm, x, pos)
            cache.append([k, v, list(pos)])
            probs = scaled_probs(layer.self_attn, q, k, pos, pos)
            out = head_out(layer.self_attn, probs, v)
            nvis = sum(is_visual)
            if deletions[l] > 0 and nvis > 0:
                self_s, cross_s, visual, _ = visual_scores(probs, is_visual)
                order = torch.sort(cross_s * self_s, stable=True).indices[:deletions[l]].tolist()
                drop = {visual[j] for j in order}
                keep = [i for i in range(len(pos)) if i not in drop]
                idx = torch.tensor(keep)
                out, x = out[:, idx], x[:, idx]
                pos = [pos[i] for i in keep]
                is_visual = [is_visual[i] for i in keep]
                trace.append({"layer": l, "kept_visual": [p for p, v in zip(pos, is_visual) if v]})
            x = finish(layer, x, out)
        logits = model.lm_head(lm.norm(x))[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, TOP)
        greedy = []
        token = int(torch.argmax(logits))
        eos = model.config.text_config.eos_token_id
        for step in range(GREEDY):
            greedy.append(token)
            if token == eos or step == GREEDY - 1:
                break
            x = model.get_input_embeddings()(torch.tensor([[token]]))
            p = n + step
            for l, layer in enumerate(lm.layers):
                q, k, v = attention(layer, lm, x, [p])
                cache[l][0] = torch.cat([cache[l][0], k], dim=2)
                cache[l][1] = torch.cat([cache[l][1], v], dim=2)
                cache[l][2].append(p)
                probs = scaled_probs(layer.self_attn, q, cache[l][0], [p], cache[l][2])
                x = finish(layer, x, head_out(layer.self_attn, probs, cache[l][1]))
            token = int(torch.argmax(model.lm_head(lm.norm(x))[0, -1]))
    return trace, top, greedy


def flops_model(cfg):
    t = cfg.text_config
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    d, m, dkv, L = t.hidden_size, t.intermediate_size, t.num_key_value_heads * hd, t.num_hidden_layers
    qkv = lambda n: n * d * (d + 2 * dkv)
    att = lambda n: 2 * n * n * d
    rest = lambda n: n * d * d + 3 * n * d * m
    return L, qkv, att, rest


def prefix_deletions(values, reference, alpha):
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    total = sum(float(v) for v in values)
    bound = reference - reference * alpha
    removed = 0.0
    count = max(len(values) - 1, 0)
    for i, j in enumerate(order):
        if total - removed < bound:
            count = max(i - 1, 0)
            break
        removed += float(values[j])
    return order[:count]


def calibrate(model, samples):
    lm = model.model.language_model
    L, qkv, att, rest = flops_model(model.config)
    layer_cost = lambda n: qkv(n) + att(n) + rest(n)
    N = sum(samples[0][1])
    stats = []
    with torch.no_grad():
        for embeds, is_visual in samples:
            x, pos, st = embeds, list(range(embeds.shape[1])), []
            for l, layer in enumerate(lm.layers):
                q, k, v = attention(layer, lm, x, pos)
                probs = scaled_probs(layer.self_attn, q, k, pos, pos)
                self_s, cross_s, _, cross = visual_scores(probs, is_visual)
                st.append((sum(float(c) for c in cross_s.tolist()) / len(cross), sum(float(s) for s in self_s.tolist())))
                x = finish(layer, x, head_out(layer.self_attn, probs, v))
            stats.append(st)

    def fit(alpha, budget):
        origin = L * layer_cost(N)
        left = [N] * len(samples)
        states = [(e, list(range(e.shape[1])), list(v)) for e, v in samples]
        scheme = [0] * L
        already = 0
        with torch.no_grad():
            for l, layer in enumerate(lm.layers):
                forecast = 0
                for n in left:
                    already += qkv(n) + att(n)
                    forecast += rest(n) + (L - 1 - l) * layer_cost(n)
                if (already + forecast) / len(samples) <= origin * (1 - budget):
                    return True, [s // len(samples) for s in scheme]
                for s, (x, pos, is_visual) in enumerate(states):
                    q, k, v = attention(layer, lm, x, pos)
                    probs = scaled_probs(layer.self_attn, q, k, pos, pos)
                    out = head_out(layer.self_attn, probs, v)
                    self_s, cross_s, visual, cross = visual_scores(probs, is_visual)
                    cross_n = (cross_s / float(len(cross))).tolist()
                    wc, ws = stats[s][l]
                    by_cross = set(prefix_deletions(cross_n, wc, alpha))
                    by_self = prefix_deletions(self_s.tolist(), ws, alpha)
                    drop = {visual[j] for j in by_self if j in by_cross}
                    scheme[l] += len(drop)
                    left[s] -= len(drop)
                    already += rest(left[s])
                    keep = [i for i in range(len(pos)) if i not in drop]
                    idx = torch.tensor(keep)
                    x = finish(layer, x[:, idx], out[:, idx])
                    states[s] = (x, [pos[i] for i in keep], [is_visual[i] for i in keep])
        return False, [s // len(samples) for s in scheme]

    results = []
    for budget in CALIBRATION["budgets"]:
        lo, hi, best, tried = 0.0, 1.0, None, []
        while hi - lo > CALIBRATION["tolerance"] + 1e-6:
            mid = (lo + hi) / 2
            reached, scheme = fit(mid, budget)
            tried.append({"alpha": mid, "reached": reached, "deletions": scheme})
            if reached:
                hi, best = mid, (mid, scheme)
            else:
                lo = mid
        if best is None:
            reached, scheme = fit(1.0, budget)
            if reached:
                best = (1.0, scheme)
        results.append({
            "budget": budget,
            "alpha": best[0] if best else None,
            "deletions": best[1] if best else None,
            "search": tried,
        })
    return stats, results


def main():
    os.makedirs(OUT, exist_ok=True)
    images = make_images()
    doc = {"generator": "tests/reference/fitprune_reference.py", "transformers": transformers.__version__,
           "torch": torch.__version__, "recipes": [], "calibration": None}
    fitprune = os.path.join(ROOT, "target", "debug", "fitprune")
    with tempfile.TemporaryDirectory() as work:
        for case in RECIPE_CASES:
            model_dir = demo_model(fitprune, work, case["model"])
            processor, model = load(model_dir)
            inputs, embeds, is_visual = prepare(processor, model, images, case["images"], case["text"])
            with torch.no_grad():
                # The manual layer loop must agree with transformers' own forward when nothing is pruned.
                _, top0, _ = pruned_generate(model, embeds, list(is_visual), [0] * len(case["deletions"]))
                ref = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
                assert torch.allclose(top0.values, ref[top0.indices], atol=1e-5), "manual loop diverges from HF"
            trace, top, greedy = pruned_generate(model, embeds, list(is_visual), case["deletions"])
            doc["recipes"].append({
                "name": case["name"], "model": case["model"], "images": case["images"], "text": case["text"],
                "deletions": case["deletions"], "weights_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
                "input_ids": inputs["input_ids"][0].tolist(), "trace": trace,
                "top_ids": top.indices.tolist(), "top_logprobs": top.values.tolist(), "greedy": greedy,
            })
            print(case["name"], [len(t["kept_visual"]) for t in trace], greedy)
        model_dir = demo_model(fitprune, work, CALIBRATION["model"])
        processor, model = load(model_dir)
        samples = []
        for s in CALIBRATION["samples"]:
            _, embeds, is_visual = prepare(processor, model, images, [s["image"]], s["text"])
            samples.append((embeds, is_visual))
        stats, results = calibrate(model, samples)
        doc["calibration"] = dict(CALIBRATION, weights_sha256=sha256(os.path.join(model_dir, "model.safetensors")),
                                  stats=stats, results=results)
        for r in results:
            print("budget", r["budget"], "alpha", r["alpha"], r["deletions"])
    with open(os.path.join(OUT, "fitprune_expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
