"""Expected LLaVA outputs from HF transformers for fitprune's demo checkpoints.

Writes tests/fixtures/parity/expected.json (and the input PNGs beside it), which
tests/parity.rs compares against without any Python in CI.

For each case the script generates the checkpoint with the project's own binary
(`fitprune demo-model`, deterministic for a seed), loads it with
`LlavaForConditionalGeneration` + `AutoProcessor` (slow CLIP image processor, eager
attention, float32), and records: the rendered prompt, prompt token ids, the number of
image tokens, the top-20 log-probabilities of the first generated position, and 8
greedy tokens from `model.generate`.

Run (from the repository root, after `cargo build`):
    python -m venv /opt/refenv && /opt/refenv/bin/pip install torch transformers==4.57.6 pillow numpy safetensors
    /opt/refenv/bin/python tests/reference/model_reference.py --fitprune target/debug/fitprune
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
from transformers import AutoProcessor, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity")

# Each case: demo-model flags, images (by name), the user text, an optional system message.
CASES = [
    {"name": "tiny", "model": {"seed": 0}, "images": ["wide"], "text": "What is in the image?"},
    {"name": "mha", "model": {"seed": 1, "kv_heads": 4}, "images": ["square"], "text": "Describe it."},
    {"name": "mqa", "model": {"seed": 2, "kv_heads": 1}, "images": ["square"], "text": "Describe it."},
    {"name": "resize_crop", "model": {"seed": 0}, "images": ["tall"], "text": "Which colours dominate?"},
    {"name": "two_images", "model": {"seed": 3}, "images": ["wide", "tall"], "text": "Compare the two pictures.",
     "system": "You are a careful assistant."},
    {"name": "select_full", "model": {"seed": 4, "select_strategy": "full"}, "images": ["square"], "text": "What is this?"},
    {"name": "text_only", "model": {"seed": 0}, "images": [], "text": "Tell me a story about a cat."},
]

TOP = 20
GREEDY = 8


def make_images():
    """Small deterministic RGB images: a gradient with noise (wide), a tall one, a square one."""
    rng = np.random.default_rng(1234)
    images = {}
    for name, (w, h) in {"wide": (150, 100), "tall": (70, 131), "square": (96, 96)}.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        noise = rng.integers(-40, 40, size=(h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = os.path.join(OUT, f"{name}.png")
        Image.fromarray(arr, "RGB").save(path)
        images[name] = path
    return images


def demo_model(fitprune, workdir, spec):
    key = "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
    path = os.path.join(workdir, key)
    if not os.path.exists(path):
        cmd = [fitprune, "demo-model", path, "--seed", str(spec["seed"])]
        if "kv_heads" in spec:
            cmd += ["--kv-heads", str(spec["kv_heads"])]
        if "select_strategy" in spec:
            cmd += ["--select-strategy", spec["select_strategy"]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_case(case, model_dir, images):
    processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    model = LlavaForConditionalGeneration.from_pretrained(
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
    ids = inputs["input_ids"][0].tolist()
    image_token = model.config.image_token_index
    return {
        "prompt": prompt,
        "input_ids": ids,
        "image_tokens": sum(1 for t in ids if t == image_token),
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
                "weights_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
            })
            results.append(out)
            print(case["name"], len(out["input_ids"]), "tokens,", out["image_tokens"], "image tokens, greedy", out["greedy"])
    doc = {
        "generator": "tests/reference/model_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": results,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
