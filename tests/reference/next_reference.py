"""Expected LLaVA-NeXT outputs from HF transformers for fitprune's NeXT demo checkpoints.

Writes tests/fixtures/parity_next/expected.json (and the input PNGs beside it), which
tests/parity_next.rs compares against without any Python in CI.

For each case the script generates the checkpoint with the project's own binary
(`fitprune demo-model --family next`, Llama or Mistral backbone, deterministic for a seed),
loads it with `LlavaNextForConditionalGeneration` + `AutoProcessor` (the slow, PIL-based
`LlavaNextImageProcessor`, eager attention, float32) and records: the rendered prompt, prompt
token ids, the visual-token count of each image, the top-20 log-probabilities of the first
generated position, and 8 greedy tokens from `model.generate`. Image sizes cover the tile size
itself (no resampling anywhere), 2x2 tiles, a 4:3 photo shape, odd sizes and 1xN / Nx1 extremes
(one of which unpads to zero grid rows), alone and several per prompt.

Run (from the repository root, after `cargo build`):
    python -m venv /opt/refenv && /opt/refenv/bin/pip install torch transformers==4.57.6 pillow numpy safetensors
    /opt/refenv/bin/python tests/reference/next_reference.py --fitprune target/debug/fitprune
"""

import argparse
import hashlib
import json
import os
import subprocess
import tempfile

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity_next")

# The tiny NeXT preset has 32-px tiles of 8-px patches. Name -> (width, height).
IMAGES = {
    "tile": (32, 32),      # exactly one tile: the base and the grid need no resampling
    "grid2x2": (64, 64),   # 2x2 grid, base resampled
    "photo": (64, 48),     # 4:3 landscape: unpadding removes grid rows
    "portrait": (45, 61),  # odd sizes, taller than wide
    "wide": (200, 20),     # 1x3 grid, 2 rows survive unpadding
    "sliver": (200, 6),    # 1x3 grid, unpads to zero rows: base tokens only
    "tall": (9, 150),      # 3x1 grid
}

LLAMA = {"seed": 0}
CASES = [
    {"name": "llama_tile", "model": LLAMA, "images": ["tile"], "text": "What is in the image?"},
    {"name": "llama_grid2x2", "model": LLAMA, "images": ["grid2x2"], "text": "Describe it."},
    {"name": "llama_photo", "model": {"seed": 1}, "images": ["photo"], "text": "Which colours dominate?"},
    {"name": "llama_portrait", "model": LLAMA, "images": ["portrait"], "text": "What is this?"},
    {"name": "llama_wide", "model": LLAMA, "images": ["wide"], "text": "Describe it."},
    {"name": "llama_sliver", "model": LLAMA, "images": ["sliver"], "text": "Describe it."},
    {"name": "llama_tall", "model": LLAMA, "images": ["tall"], "text": "Describe it."},
    {"name": "llama_three_images", "model": {"seed": 1}, "images": ["photo", "tile", "tall"],
     "text": "Compare the pictures.", "system": "You are a careful assistant."},
    {"name": "mistral_tile", "model": {"seed": 2, "backbone": "mistral"}, "images": ["tile"], "text": "What is in the image?"},
    {"name": "mistral_photo", "model": {"seed": 2, "backbone": "mistral"}, "images": ["photo"], "text": "Describe it."},
    # A window shorter than the prompt: the sliding mask matters in prefill and in decoding.
    {"name": "mistral_window_tile", "model": {"seed": 3, "backbone": "mistral", "sliding_window": 24},
     "images": ["tile"], "text": "What is in the image?"},
    {"name": "mistral_window_two", "model": {"seed": 3, "backbone": "mistral", "sliding_window": 24},
     "images": ["wide", "portrait"], "text": "Compare the two pictures."},
    {"name": "mistral_text_only", "model": {"seed": 2, "backbone": "mistral"}, "images": [], "text": "Tell me a story."},
]

TOP = 20
GREEDY = 8


def make_images():
    """Deterministic RGB images: gradients with noise, one per size."""
    rng = np.random.default_rng(4321)
    paths = {}
    for name, (w, h) in IMAGES.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        noise = rng.integers(-40, 40, size=(h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = os.path.join(OUT, f"{name}.png")
        Image.fromarray(arr, "RGB").save(path)
        paths[name] = path
    return paths


def demo_model(fitprune, workdir, spec):
    key = "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
    path = os.path.join(workdir, key)
    if not os.path.exists(path):
        cmd = [fitprune, "demo-model", path, "--family", "next", "--seed", str(spec["seed"])]
        if "backbone" in spec:
            cmd += ["--backbone", spec["backbone"]]
        if spec.get("sliding_window") is not None:
            cmd += ["--sliding-window", str(spec["sliding_window"])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_case(case, model_dir, images):
    processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    model = LlavaNextForConditionalGeneration.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    messages = []
    if case.get("system"):
        messages.append({"role": "system", "content": [{"type": "text", "text": case["system"]}]})
    content = [{"type": "image"} for _ in case["images"]] + [{"type": "text", "text": case["text"]}]
    messages.append({"role": "user", "content": content})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    pil = [Image.open(images[n]).convert("RGB") for n in case["images"]]
    inputs = processor(images=pil or None, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, TOP)
        gen = model.generate(**inputs, max_new_tokens=GREEDY, do_sample=False, num_beams=1)
        per_image = []
        if pil:
            # Packed features per image, as the model side counts them.
            feats = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-2,
                vision_feature_select_strategy="default")
            per_image = [int(f.shape[0]) for f in feats]
    ids = inputs["input_ids"][0].tolist()
    image_token = model.config.image_token_index
    assert sum(per_image) == sum(1 for t in ids if t == image_token), "processor/model count mismatch"
    return {
        "prompt": prompt,
        "input_ids": ids,
        "image_tokens": per_image,
        "top_ids": top.indices.tolist(),
        "top_logprobs": top.values.tolist(),
        "greedy": gen[0, len(ids):].tolist(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fitprune", default=os.path.join(ROOT, "target", "debug", "fitprune"))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    images = make_images()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for case in CASES:
            model_dir = demo_model(args.fitprune, work, case["model"])
            out = run_case(case, model_dir, images)
            out.update({
                "name": case["name"],
                "model": case["model"],
                "images": case["images"],
                "text": case["text"],
                "system": case.get("system"),
                # Only the tile-sized image needs no resampling anywhere (base and grid).
                "resampled": any(IMAGES[n] != (32, 32) for n in case["images"]),
                "weights_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
            })
            results.append(out)
            print(case["name"], len(out["input_ids"]), "tokens, image tokens", out["image_tokens"], "greedy", out["greedy"])
    doc = {
        "generator": "tests/reference/next_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": results,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
