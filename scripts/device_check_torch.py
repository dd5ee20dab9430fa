#!/usr/bin/env python3
"""PyTorch transformers' side of the device check: TTFT and decode speed of a llava-hf checkpoint
(sdpa attention), measured like `fitprune bench` measures itself: the prompt is prepared outside
the timing; TTFT = vision tower + projector + prefill + the first token; decode = tokens after the
first over the time after it. Works with transformers 4.x and 5.x (`dtype` vs `torch_dtype`).

With `--prompt-ids FILE` (the prompt token ids fitprune rendered, as `generate --json` prints them)
the processor is not used at all: the ids go in as they are, with random pixel values at the
vision tower's input size, so the timing covers exactly the prompt fitprune timed and does not
depend on which image processors the installed transformers ships."""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import LlavaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer


def load(model_dir, dtype, device):
    kw = {"attn_implementation": "sdpa"}
    major = int(transformers.__version__.split(".")[0])
    kw["dtype" if major >= 5 else "torch_dtype"] = dtype
    return LlavaForConditionalGeneration.from_pretrained(model_dir, **kw).to(device).eval()


def processor_inputs(model_dir, model, question):
    """fitprune bench's prompt through the checkpoint's own processor: one side x (side + 37)
    image before the question."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    side = model.config.vision_config.image_size
    pixels = (torch.rand(side + 37, side, 3) * 255).to(torch.uint8).numpy()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=Image.fromarray(pixels), text=prompt, return_tensors="pt")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock(BaseStreamer):
    """Timestamps each step: generate() hands the streamer the prompt first, then every new token
    (already on the host, so each timestamp follows that step's device work)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed_generate(model, inputs, new_tokens, device):
    """(TTFT, decode tokens/s after the first token) of one greedy generation."""
    clock = Clock()
    sync(device)
    t = time.perf_counter()
    # Random weights emit EOS at random: min_new_tokens keeps every run the same length.
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   num_beams=1, use_cache=True, streamer=clock)
    tokens = clock.times[1:]
    return tokens[0] - t, (len(tokens) - 1) / max(tokens[-1] - tokens[0], 1e-9)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--question", default="What is in the image?")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prompt-ids", help="JSON file with the prompt token ids (skips the processor)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    model = load(args.model, dtype, args.device)
    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            ids = json.load(f)
        side = model.config.vision_config.image_size
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                  "pixel_values": torch.randn(1, 3, side, side)}
    else:
        inputs = dict(processor_inputs(args.model, model, args.question))
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ttft, decode = [], []
    with torch.inference_mode():
        for rep in range(args.reps + 1):
            first, rate = timed_generate(model, inputs, args.decode_tokens + 1, args.device)
            if rep == 0:
                continue  # warm-up
            ttft.append(first)
            decode.append(rate)
    doc = {
        "torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
        "dtype": args.dtype, "attn_implementation": "sdpa", "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "ttft_s": statistics.median(ttft), "decode_tokens_per_s": statistics.median(decode),
        "reps": args.reps, "decode_tokens": args.decode_tokens,
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
