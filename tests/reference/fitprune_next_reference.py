"""FitPrune reference for LLaVA-NeXT: the authors' algorithm (ywh187/FitPrune, LLaVA_NEXT) on
transformers' `LlavaNextForConditionalGeneration`, for fitprune's NeXT demo checkpoints.

Writes tests/fixtures/parity_next/fitprune_expected.json, compared by tests/pruning_parity_next.rs.

The layer-by-layer pruning and calibration code is fitprune_reference.py's (the LLaVA-1.5 port);
what NeXT changes, as in the authors' LLaVA_NEXT code:
- the visual set is each image's whole packed span (base, grid and newline tokens; their
  `origin_img_tk_num`), merged into the embeddings like `LlavaNextModel.forward`;
- a recipe fitted for N visual tokens deletes `int(d_l * n / N)` at layer l for a prompt with n;
- calibration samples may have different n: each sample starts from its own count and the
  budget is checked on the sample average of the FLOPs (and of the unpruned FLOPs).

Run after `cargo build` (see next_reference.py for the environment):
    /opt/refenv/bin/python tests/reference/fitprune_next_reference.py
"""

import json
import os
import sys
import tempfile

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fitprune_reference as fr  # noqa: E402
from next_reference import OUT, ROOT, demo_model, make_images, sha256  # noqa: E402

# Recipes fitted for N tokens, applied to prompts with other counts (tiny NeXT: 4 layers).
RECIPE_CASES = [
    {"name": "photo_scaled", "model": {"seed": 0}, "images": ["photo"], "text": "What is in the image?",
     "recipe": {"deletions": [0, 30, 20, 0], "visual_tokens": 88}},
    {"name": "tile_scaled", "model": {"seed": 1}, "images": ["tile"], "text": "Describe it.",
     "recipe": {"deletions": [10, 25, 5, 3], "visual_tokens": 70}},
    {"name": "two_images", "model": {"seed": 0}, "images": ["portrait", "wide"], "text": "Compare them.",
     "recipe": {"deletions": [5, 40, 20, 10], "visual_tokens": 100}},
    {"name": "mistral_grid", "model": {"seed": 2, "backbone": "mistral"}, "images": ["grid2x2"],
     "text": "Describe it.", "recipe": {"deletions": [20, 20, 20, 0], "visual_tokens": 88}},
]

CALIBRATION = {
    "model": {"seed": 0},
    "samples": [
        {"image": "photo", "text": "What is in the image?"},
        {"image": "tile", "text": "Which colours dominate this picture?"},
        {"image": "portrait", "text": "Describe it."},
        {"image": "grid2x2", "text": "Is there anything unusual here? Answer briefly."},
    ],
    "budgets": [0.3, 0.5],
    "tolerance": 0.01,
}


def load(model_dir):
    processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    model = LlavaNextForConditionalGeneration.from_pretrained(
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
            inputs["pixel_values"], inputs["image_sizes"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        feats = torch.cat(list(feats), dim=0)
        mask = (ids == model.config.image_token_index).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats)
    is_visual = (ids[0] == model.config.image_token_index).tolist()
    return inputs, embeds, is_visual


def calibrate(model, samples):
    """fitprune_reference.calibrate with per-sample visual counts (mean budget check)."""
    lm = model.model.language_model
    L, qkv, att, rest = fr.flops_model(model.config)
    layer_cost = lambda n: qkv(n) + att(n) + rest(n)
    counts = [sum(v) for _, v in samples]
    stats = []
    with torch.no_grad():
        for embeds, is_visual in samples:
            x, pos, st = embeds, list(range(embeds.shape[1])), []
            for l, layer in enumerate(lm.layers):
                q, k, v = fr.attention(layer, lm, x, pos)
                probs = fr.scaled_probs(layer.self_attn, q, k, pos, pos)
                self_s, cross_s, _, cross = fr.visual_scores(probs, is_visual)
                st.append((sum(float(c) for c in cross_s.tolist()) / len(cross), sum(float(s) for s in self_s.tolist())))
                x = fr.finish(layer, x, fr.head_out(layer.self_attn, probs, v))
            stats.append(st)

    def fit(alpha, budget):
        origin = sum(L * layer_cost(n) for n in counts) / len(samples)
        left = list(counts)
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
                    q, k, v = fr.attention(layer, lm, x, pos)
                    probs = fr.scaled_probs(layer.self_attn, q, k, pos, pos)
                    out = fr.head_out(layer.self_attn, probs, v)
                    self_s, cross_s, visual, cross = fr.visual_scores(probs, is_visual)
                    cross_n = (cross_s / float(len(cross))).tolist()
                    wc, ws = stats[s][l]
                    by_cross = set(fr.prefix_deletions(cross_n, wc, alpha))
                    by_self = fr.prefix_deletions(self_s.tolist(), ws, alpha)
                    drop = {visual[j] for j in by_self if j in by_cross}
                    scheme[l] += len(drop)
                    left[s] -= len(drop)
                    already += rest(left[s])
                    keep = [i for i in range(len(pos)) if i not in drop]
                    idx = torch.tensor(keep)
                    x = fr.finish(layer, x[:, idx], out[:, idx])
                    states[s] = (x, [pos[i] for i in keep], [is_visual[i] for i in keep])
        return False, [s // len(samples) for s in scheme]

    results = []
    for budget in CALIBRATION["budgets"]:
        lo, hi, best = 0.0, 1.0, None
        while hi - lo > CALIBRATION["tolerance"] + 1e-6:
            mid = (lo + hi) / 2
            reached, scheme = fit(mid, budget)
            if reached:
                hi, best = mid, (mid, scheme)
            else:
                lo = mid
        if best is None:
            reached, scheme = fit(1.0, budget)
            if reached:
                best = (1.0, scheme)
        results.append({"budget": budget, "alpha": best[0] if best else None, "deletions": best[1] if best else None})
    return counts, results


def main():
    os.makedirs(OUT, exist_ok=True)
    images = make_images()
    doc = {"generator": "tests/reference/fitprune_next_reference.py", "transformers": transformers.__version__,
           "torch": torch.__version__, "recipes": [], "calibration": None}
    fitprune = os.path.join(ROOT, "target", "debug", "fitprune")
    with tempfile.TemporaryDirectory() as work:
        for case in RECIPE_CASES:
            model_dir = demo_model(fitprune, work, case["model"])
            processor, model = load(model_dir)
            inputs, embeds, is_visual = prepare(processor, model, images, case["images"], case["text"])
            n = sum(is_visual)
            recipe = case["recipe"]
            # The authors' LLaVA_NEXT scaling: int(d * origin_img_tk_num / N).
            deletions = [int(d * n / recipe["visual_tokens"]) for d in recipe["deletions"]]
            with torch.no_grad():
                _, top0, _ = fr.pruned_generate(model, embeds, list(is_visual), [0] * len(deletions))
                ref = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
                assert torch.allclose(top0.values, ref[top0.indices], atol=1e-5), "manual loop diverges from HF"
            trace, top, greedy = fr.pruned_generate(model, embeds, list(is_visual), deletions)
            doc["recipes"].append({
                "name": case["name"], "model": case["model"], "images": case["images"], "text": case["text"],
                "recipe": recipe, "visual_tokens": n, "scaled_deletions": deletions,
                "weights_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
                "input_ids": inputs["input_ids"][0].tolist(), "trace": trace,
                "top_ids": top.indices.tolist(), "top_logprobs": top.values.tolist(), "greedy": greedy,
            })
            print(case["name"], n, deletions, [len(t["kept_visual"]) for t in trace], greedy)
        model_dir = demo_model(fitprune, work, CALIBRATION["model"])
        processor, model = load(model_dir)
        samples = []
        for s in CALIBRATION["samples"]:
            _, embeds, is_visual = prepare(processor, model, images, [s["image"]], s["text"])
            samples.append((embeds, is_visual))
        counts, results = calibrate(model, samples)
        doc["calibration"] = dict(CALIBRATION, weights_sha256=sha256(os.path.join(model_dir, "model.safetensors")),
                                  visual_tokens=counts, results=results)
        for r in results:
            print("budget", r["budget"], "alpha", r["alpha"], r["deletions"], "counts", counts)
    with open(os.path.join(OUT, "fitprune_expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
