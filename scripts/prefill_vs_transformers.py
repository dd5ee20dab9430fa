"""CPU prefill side by side: `fitprune serve` against HF transformers, alternated in one run.

Both run the same bench-preset demo checkpoint (`fitprune demo-model DIR --preset bench`, a
llava-hf directory `LlavaForConditionalGeneration` loads), the same prompt (one image + a
question, 590 tokens of which 576 visual), f32, on the same number of threads. Rounds alternate
so that drifting load on a shared machine hits every contestant alike:

- `serve`: one `POST /v1/chat/completions` with `max_tokens: 1`, so the request time is the
  time to first token (HTTP, PNG decode, preprocessing, vision tower, projector, decoder prefill,
  LM head, sampling). The server is started with `RAYON_NUM_THREADS` = the thread count (candle's
  CPU gemm and its parallel ops size their pools from it).
- `hf sdpa` / `hf eager`: transformers' processor (slow CLIP processor, as the parity fixtures
  use) plus one forward pass that yields the first token's logits, `torch.set_num_threads(N)`,
  `torch.inference_mode()`; the forward alone is reported too.

Prints the medians with [min..max] per contestant and the per-round ratios serve / hf (median
and spread), plus a JSON line for scripts.

With `--stages`, each round also runs `fitprune bench --stages --reps 1` (a fresh process: one
warm-up, one timed pass) beside transformers' same stages: the vision tower + projector
(`get_image_features`) and the decoder alone (`language_model` over the merged embeddings), so
the decoder-prefill ratio is separated from the vision tower's. Absolute times depend on the machine's load; the
ratios much less. Nothing here asserts a time.

Run from the repository root after `cargo build --release`:
    /opt/refenv/bin/python scripts/prefill_vs_transformers.py --rounds 7
"""

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The question `fitprune bench --stages` asks too, so both stage breakdowns see 590 tokens.
QUESTION = "What is in the image?"


def make_image():
    """A deterministic 640x480 gradient with noise (resized and centre-cropped to 336 by both)."""
    rng = np.random.default_rng(7)
    w, h = 640, 480
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    arr = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(base, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"fitprune serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    sys.exit("fitprune serve did not become healthy")


def spread(xs):
    return f"{statistics.median(xs):.4f} [{min(xs):.4f}..{max(xs):.4f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fitprune", default=os.path.join(ROOT, "target", "release", "fitprune"))
    ap.add_argument("--model", help="bench-preset checkpoint (default: written to a temporary directory)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eager", action="store_true", help="skip transformers' eager attention")
    ap.add_argument("--stages", action="store_true", help="also compare vision tower and decoder separately")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model
        if model_dir is None:
            model_dir = os.path.join(work, "bench")
            subprocess.run([args.fitprune, "demo-model", model_dir, "--preset", "bench"], check=True,
                           stdout=subprocess.DEVNULL)
        image = make_image()
        png = io.BytesIO()
        image.save(png, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()

        processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        impls = ["sdpa"] if args.no_eager else ["sdpa", "eager"]
        models = {
            i: LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                             attn_implementation=i).eval()
            for i in impls
        }

        port = free_port()
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), RUST_LOG="warn")
        server = subprocess.Popen([args.fitprune, "serve", "--model", model_dir, "--addr", f"127.0.0.1:{port}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, server)
            body = {
                "model": model_dir,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": QUESTION}]}],
                "max_tokens": 1,
                "temperature": 0,
            }

            def serve_once():
                t = time.perf_counter()
                out = post(base + "/v1/chat/completions", body)
                dt = time.perf_counter() - t
                return dt, out["usage"]["prompt_tokens"]

            def hf_once(model):
                t = time.perf_counter()
                with torch.inference_mode():
                    inputs = processor(images=[image], text=prompt, return_tensors="pt")
                    t_fwd = time.perf_counter()
                    logits = model(**inputs).logits[0, -1]
                    int(torch.argmax(logits))
                end = time.perf_counter()
                return end - t, end - t_fwd, inputs["input_ids"].shape[1]

            def hf_stages(model):
                """Seconds for the vision tower + projector and for the decoder alone."""
                cfg = model.config
                with torch.inference_mode():
                    inputs = processor(images=[image], text=prompt, return_tensors="pt")
                    t = time.perf_counter()
                    feats = model.model.get_image_features(
                        pixel_values=inputs["pixel_values"],
                        vision_feature_layer=cfg.vision_feature_layer,
                        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                    )
                    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
                    t_vision = time.perf_counter() - t
                    ids = inputs["input_ids"]
                    embeds = model.get_input_embeddings()(ids)
                    slots = (ids == cfg.image_token_index).unsqueeze(-1).expand_as(embeds)
                    embeds = embeds.masked_scatter(slots, feats.reshape(-1, embeds.shape[-1]))
                    t = time.perf_counter()
                    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
                    float(hidden[0, -1, 0])
                    t_decoder = time.perf_counter() - t
                return t_vision, t_decoder

            def fitprune_stages():
                with tempfile.NamedTemporaryFile(suffix=".json") as f:
                    subprocess.run([args.fitprune, "bench", "--model", model_dir, "--stages", "--reps", "1",
                                    "--json", f.name], env=env, check=True, stdout=subprocess.DEVNULL)
                    st = json.load(open(f.name))["stages"]
                return st["vision+projector"][0], st["decoder"][0]

            stage_times = {k: [] for k in ["fitprune vision", "fitprune decoder",
                                           *[f"hf {i} {s}" for i in impls for s in ("vision", "decoder")]]}
            times = {"serve": [], **{f"hf {i}": [] for i in impls}, **{f"hf {i} forward": [] for i in impls}}
            ratios = {i: [] for i in impls}
            tokens = {}
            for r in range(args.rounds + 1):
                # Alternate who goes first so neither always runs right after the other.
                order = ["serve", *impls] if r % 2 == 0 else [*impls, "serve"]
                got = {}
                for who in order:
                    if who == "serve":
                        got["serve"], tokens["serve"] = serve_once()
                    else:
                        total, fwd, tokens[who] = hf_once(models[who])
                        got[f"hf {who}"], got[f"hf {who} forward"] = total, fwd
                if args.stages:
                    for who in order:
                        if who == "serve":
                            fv, fd = fitprune_stages()
                        else:
                            got[f"{who} stages"] = hf_stages(models[who])
                if r == 0:
                    continue  # warm-up
                if args.stages:
                    stage_times["fitprune vision"].append(fv)
                    stage_times["fitprune decoder"].append(fd)
                    for i in impls:
                        hv, hd = got.pop(f"{i} stages")
                        stage_times[f"hf {i} vision"].append(hv)
                        stage_times[f"hf {i} decoder"].append(hd)
                for k, v in got.items():
                    times[k].append(v)
                for i in impls:
                    ratios[i].append(got["serve"] / got[f"hf {i}"])
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"prompt tokens: {tokens}; threads: {args.threads}; rounds: {args.rounds} (+1 warm-up)")
    for k, v in times.items():
        print(f"{k:>18}: {spread(v)} s")
    for i in impls:
        print(f"serve / hf {i}: {spread(ratios[i])}")
    stage_ratios = {}
    if args.stages:
        for k, v in stage_times.items():
            print(f"{k:>18}: {spread(v)} s")
        for i in impls:
            for st in ("vision", "decoder"):
                r = [a / b for a, b in zip(stage_times[f"fitprune {st}"], stage_times[f"hf {i} {st}"])]
                stage_ratios[f"{st} fitprune / hf {i}"] = r
                print(f"{st} fitprune / hf {i}: {spread(r)}")
    print(json.dumps({"times": times, "ratios": ratios, "stages": stage_times, "stage_ratios": stage_ratios,
                      "threads": args.threads, "tokens": tokens}))


if __name__ == "__main__":
    main()
