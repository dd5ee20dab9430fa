"""LLaVA-HR reference (Luo et al., "Feast Your Eyes: Mixture-of-Resolution Adaptation for Multimodal
LLMs"; luogen1996/LLaVA-HR) for fitprune's HR family: a tiny random checkpoint in the published
layout, its forward, and the authors' FitPrune (ywh187/FitPrune, LLaVA_HR) on top.

Writes tests/fixtures/parity_hr/:
- model/: the checkpoint, laid out like favor123/llava-hr-7b-sft-1024: an original-LLaVA
  config.json (flat Llama fields plus mm_vision_tower, vision_tower_slow, is_multipath_encoder,
  input_image_size, mm_projector_type mlp2x_gelu, image_aspect_ratio pad), the CLIP config in a
  sub-folder named like mm_vision_tower, weights as two pytorch_model-0000N-of-00002.bin pickles
  plus pytorch_model.bin.index.json (tensor names as LlavaLlamaForCausalLM saves them, ConvNeXt
  classifier head and CLIP post_layernorm included although the forward never reads them), and
  the demo tokenizer files written by `fitprune demo-model`;
- expected.json: per case the prompt, its ids (as `tokenizer_image_token` builds them, -200 at
  the image), the visual-token count, first-step top-20 log-probabilities, 8 greedy tokens;
  pruned cases (recipes applied with the authors' scoring) and one calibration;
- the input PNGs.

The forward is the reference's MultiPathCLIPVisionTower, re-expressed on transformers'
CLIPVisionModel and timm's ConvNeXt: expand to square with the mean colour, CLIP processing at S
(bicubic shortest edge, centre crop); slow branch = ConvNeXt stem and its four stages on the
S-pixel image; fast branch = the image resized (bilinear, align_corners) to
F = max(int(S / 32 * patch), clip_image_size) -- the reference hard-codes patch 14 and 336, the
values of CLIP ViT-L/14-336; this tiny CLIP has 4-px patches and a 16-px input, so the same rule
reads them from its config -- CLIP embeddings with the position grid resized (bicubic, antialias)
when F differs from the CLIP input size, CLS dropped, pre_layrnorm, the encoder layers in four
groups with an MR adapter after each of the first three, the last layer's output; then
fast_proj(fast) + slow_proj(slow) and the mlp2x_gelu projector. The decoder is transformers'
LlamaForCausalLM (eager attention, float32) on the merged embeddings.

Cases (same weights, input_image_size rewritten per case as the 1024/1536 variants differ):
- S=128: F=16, the CLIP grid is its own 4x4: no position-embedding resampling (1e-4 check);
- S=64: F=16 again but the ConvNeXt map is 2x2, so the adapters and the merge upsample it;
- S=256: F=32, 8x8 grid from the 4x4 position embeddings: bicubic antialias resampling.

Run after `cargo build` (the tokenizer comes from the project's binary):
    /opt/refenv/bin/pip install timm   # plus the packages next_reference.py lists
    /opt/refenv/bin/python tests/reference/hr_reference.py
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from PIL import Image
from timm.models.convnext import ConvNeXt
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fitprune_reference as fr  # noqa: E402
import fitprune_next_reference as fnr  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity_hr")
MODEL = os.path.join(OUT, "model")

CLIP_DIR = "clip-tiny-patch4-16"
SLOW = "convnext_large_mlp.clip_laion2b_ft_320"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN_INDEX = -200
TOP, GREEDY = 20, 8

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), head_hidden_size=32, num_classes=10)

IMAGES = {"photo": (150, 100), "tall": (60, 130), "square": (128, 128)}
CASES = [
    {"name": "s128_photo", "size": 128, "image": "photo", "text": "What is in the image?", "resampled": False},
    {"name": "s128_tall", "size": 128, "image": "tall", "text": "Describe it briefly.", "resampled": False},
    {"name": "s128_square", "size": 128, "image": "square", "text": "Which colours dominate?", "resampled": False},
    {"name": "s64_upsampled_slow", "size": 64, "image": "photo", "text": "What is this?", "resampled": False},
    {"name": "s256_resampled_pos", "size": 256, "image": "tall", "text": "What is in the image?", "resampled": True},
    {"name": "text_only", "size": 128, "image": None, "text": "Tell me a story.", "resampled": False},
]
RECIPES = [
    {"name": "s128_recipe", "size": 128, "image": "photo", "text": "What is in the image?",
     "recipe": {"deletions": [4, 3, 2, 0], "visual_tokens": 16}},
    {"name": "s256_scaled", "size": 256, "image": "tall", "text": "Describe it briefly.",
     "recipe": {"deletions": [6, 10, 5, 2], "visual_tokens": 48}},
]
CALIBRATION = {
    "size": 128,
    "samples": [
        {"image": "photo", "text": "What is in the image?"},
        {"image": "tall", "text": "Which colours dominate this picture?"},
        {"image": "square", "text": "Describe it."},
    ],
    "budgets": [0.3, 0.5],
    "tolerance": 0.01,
}


# ---------------------------------------------------------------------------------------------
# The checkpoint


class Adapter(nn.Module):
    """The reference's S2FStitchAlignModuleV2 (an MR adapter between CLIP stages)."""

    def __init__(self, fast, slow):
        super().__init__()
        self.slow_conv = nn.Conv2d(slow, slow, 1)
        self.slow_proj = nn.Conv2d(slow, fast, 1)
        self.fast_conv = nn.Conv2d(fast, fast, 7, padding=3, groups=fast)
        self.fast_proj = nn.Conv2d(fast, fast, 1)
        self.gate = nn.Sequential(nn.Linear(2 * fast, fast // 2), nn.GELU(), nn.Linear(fast // 2, 1))

    def forward(self, fast, slow):
        b, _, _, _ = slow.shape
        d = fast.shape[2]
        s = self.slow_proj(F.gelu(self.slow_conv(slow))).reshape(b, d, -1).transpose(1, 2)
        s, side = align(s, fast.shape[1])
        f = fast.transpose(1, 2).reshape(b, d, side, side)
        f = f + self.fast_proj(F.gelu(self.fast_conv(f)))
        f = f.reshape(b, d, side * side).transpose(1, 2)
        gate = self.gate(torch.cat([f, s], -1).mean(1)).unsqueeze(1)
        return f + s * gate.tanh()


class Merge(nn.Module):
    """The reference's MultiPathAlignModule: fast_proj(fast) + slow_proj(slow aligned to fast)."""

    def __init__(self, fast, slow):
        super().__init__()
        self.fast_proj = nn.Linear(fast, fast)
        self.slow_proj = nn.Linear(slow, fast)

    def forward(self, fast, slow):
        b, c, _, _ = slow.shape
        s, _ = align(slow.reshape(b, c, -1).transpose(1, 2), fast.shape[1])
        return self.fast_proj(fast) + self.slow_proj(s)


def align(src, dst_len):
    """Token sequence (b, l, c) on a square grid brought to dst_len tokens: bilinear
    (align_corners) upsampling when smaller, average pooling when larger."""
    b, l, c = src.shape
    src_side, dst_side = int(math.sqrt(l)), int(math.sqrt(dst_len))
    assert l % dst_len == 0 or dst_len % l == 0
    if l == dst_len:
        return src, dst_side
    grid = src.transpose(1, 2).reshape(b, c, src_side, src_side)
    if l < dst_len:
        grid = F.interpolate(grid, size=(dst_side, dst_side), mode="bilinear", align_corners=True)
    else:
        k = src_side // dst_side
        grid = F.avg_pool2d(grid, k, k)
    return grid.reshape(b, c, -1).transpose(1, 2), dst_side


class Tower(nn.Module):
    """fast_vision_tower / slow_vision_tower / align_stages_latent / align_stages, named as the
    published checkpoint names them under model.vision_tower."""

    def __init__(self, clip_cfg):
        super().__init__()
        self.fast_vision_tower = nn.Module()
        self.fast_vision_tower.vision_tower = CLIPVisionModel(clip_cfg)
        self.slow_vision_tower = nn.Module()
        self.slow_vision_tower.vision_tower = ConvNeXt(**CONVNEXT)
        fast, slow = clip_cfg.hidden_size, CONVNEXT["dims"][-1]
        self.align_stages_latent = nn.ModuleList([Adapter(fast, slow) for _ in range(3)])
        self.align_stages = nn.ModuleList([Merge(fast, slow)])

    def forward(self, x, image_size):
        vm = self.fast_vision_tower.vision_tower.vision_model
        cfg = self.fast_vision_tower.vision_tower.config
        convnext = self.slow_vision_tower.vision_tower
        layers = vm.encoder.layers
        group = len(layers) // 4
        assert group * 4 == len(layers)
        fast_size = max(int(image_size / 32 * cfg.patch_size), cfg.image_size)
        y = F.interpolate(x, size=(fast_size, fast_size), mode="bilinear", align_corners=True)
        y = embeddings(vm.embeddings, y)
        y = vm.pre_layrnorm(y[:, 1:])
        s = convnext.stem(x)
        for stage in convnext.stages:
            s = stage(s)
        for g in range(4):
            for layer in layers[g * group:(g + 1) * group]:
                out = layer(y, None, None)
                y = out[0] if isinstance(out, tuple) else out
            if g < 3:
                y = self.align_stages_latent[g](y, s)
        return self.align_stages[0](y, s)


def embeddings(emb, pixels):
    """CLIP embeddings with the reference's position-embedding resampling (bicubic, antialias)
    when the patch count differs from the trained grid."""
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    cls = emb.class_embedding.expand(pixels.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1)
    pos = emb.position_embedding.weight.unsqueeze(0)
    if pos.shape[1] != x.shape[1]:
        old = int(math.sqrt(pos.shape[1] - 1))
        new = int(math.sqrt(x.shape[1] - 1))
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
    return x + pos


class HrModel(nn.Module):
    def __init__(self, text_cfg, clip_cfg):
        super().__init__()
        self.llama = LlamaForCausalLM(text_cfg)
        self.vision_tower = Tower(clip_cfg)
        fast, hidden = clip_cfg.hidden_size, text_cfg.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(fast, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def state_dict_published(self):
        """Tensor names as LlavaLlamaForCausalLM saves them (decoder under model.*, lm_head)."""
        out = {}
        for k, v in self.llama.state_dict().items():
            out[k] = v
        for k, v in self.vision_tower.state_dict().items():
            out[f"model.vision_tower.{published_name(k)}"] = v
        for k, v in self.mm_projector.state_dict().items():
            out[f"model.mm_projector.{k}"] = v
        return {k: v.detach().clone().contiguous() for k, v in out.items()}


def published_name(k):
    """timm >= 0.9 calls a ConvNeXt block's layer scale `gamma`; the timm that LLaVA-HR vendors
    (and so the published checkpoint) calls it `weight`."""
    if k.startswith("slow_vision_tower.") and k.endswith(".gamma"):
        return k[: -len("gamma")] + "weight"
    return k


def timm_name(k):
    """The inverse of published_name for one `model.vision_tower.`-relative key."""
    parts = k.split(".")
    if k.startswith("slow_vision_tower.") and parts[-1] == "weight" and len(parts) > 2 and parts[-3] == "blocks":
        return k[: -len("weight")] + "gamma"
    return k


def randomize(model, seed):
    """Seeded random weights with gains that keep activations O(1), layer scales and adapters
    far from their zero-ish inits (so every branch matters), and peaked decoder attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if name.endswith("weight") and ("norm" in name or "layernorm" in name or "layrnorm" in name):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif name.endswith(".gamma") or name.endswith(".weight"):  # ConvNeXt layer scale, LayerNorm2d
                    p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                continue
            fan_in = p[0].numel()
            gain = 2.5 if ("q_proj" in name or "k_proj" in name) and "llama" in name else 1.0
            p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def build(tokenizer_vocab, bos, eos, pad):
    text_cfg = LlamaConfig(vocab_size=tokenizer_vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                           attn_implementation="eager", **TEXT)
    clip_cfg = CLIPVisionConfig(**CLIP)
    model = HrModel(text_cfg, clip_cfg).eval()
    randomize(model, 1234)
    return model, text_cfg, clip_cfg


def write_checkpoint(model, text_cfg, clip_cfg, tok_dir):
    if os.path.exists(MODEL):
        shutil.rmtree(MODEL)
    os.makedirs(os.path.join(MODEL, CLIP_DIR))
    state = model.state_dict_published()
    names = sorted(state)
    # Two shards like the published checkpoint: the decoder in the first, the rest in the second.
    shards = {"pytorch_model-00001-of-00002.bin": [n for n in names if n.startswith("model.layers.")],
              "pytorch_model-00002-of-00002.bin": [n for n in names if not n.startswith("model.layers.")]}
    weight_map, total = {}, 0
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, os.path.join(MODEL, file))
        for k in keys:
            weight_map[k] = file
            total += state[k].numel() * state[k].element_size()
    with open(os.path.join(MODEL, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    config = {
        "_name_or_path": "tiny-llava-hr", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.31.0",
        "use_cache": True, "vocab_size": text_cfg.vocab_size, "bos_token_id": text_cfg.bos_token_id,
        "eos_token_id": text_cfg.eos_token_id, "pad_token_id": text_cfg.pad_token_id,
        **TEXT,
        "freeze_mm_mlp_adapter": False, "freeze_vision": False, "image_aspect_ratio": "pad",
        "input_image_size": 128, "is_multipath_encoder": True, "mm_hidden_size": clip_cfg.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": CLIP_DIR,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "vision_tower_slow": SLOW,
    }
    with open(os.path.join(MODEL, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    clip_json = dict(clip_cfg.to_dict(), architectures=["CLIPVisionModel"])
    with open(os.path.join(MODEL, CLIP_DIR, "config.json"), "w") as f:
        json.dump(clip_json, f, indent=1)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(MODEL, name))


# ---------------------------------------------------------------------------------------------
# Prompt and image


def vicuna_v1(text, with_image):
    """The vicuna_v1 conversation with one user turn and the open assistant turn."""
    message = ("<image>\n" + text) if with_image else text
    return f"{SYSTEM} USER: {message} ASSISTANT:"


def image_token_ids(tokenizer, prompt):
    """tokenizer_image_token: each text chunk tokenized on its own, the leading BOS kept once,
    IMAGE_TOKEN_INDEX between chunks."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def pixels(path, size):
    """expand2square with the mean colour, then CLIPImageProcessor at `size`."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    proc = CLIPImageProcessor(crop_size={"height": size, "width": size}, do_center_crop=True, do_normalize=True,
                              do_resize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, size=size)
    return proc(images=img, return_tensors="pt")["pixel_values"]


def make_images():
    rng = np.random.default_rng(2468)
    paths = {}
    for name, (w, h) in IMAGES.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin((x + 2 * y) / 9)], axis=-1)
        noise = rng.integers(-30, 30, size=(h, w, 3))
        path = os.path.join(OUT, f"{name}.png")
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(path)
        paths[name] = path
    return paths


def embed(model, tokenizer, images, image, text, size):
    """(embeds (1, T, hidden), is_visual, ids) for one prompt at input size `size`."""
    prompt = vicuna_v1(text, image is not None)
    ids = image_token_ids(tokenizer, prompt)
    llama = model.llama
    with torch.no_grad():
        text_ids = torch.tensor([[max(t, 0) for t in ids]])
        emb = llama.get_input_embeddings()(text_ids)[0]
        if image is None:
            return prompt, ids, emb.unsqueeze(0), [False] * len(ids)
        feats = model.mm_projector(model.vision_tower(pixels(images[image], size), size))[0]
        at = ids.index(IMAGE_TOKEN_INDEX)
        merged = torch.cat([emb[:at], feats, emb[at + 1:]], dim=0).unsqueeze(0)
    is_visual = [False] * at + [True] * feats.shape[0] + [False] * (len(ids) - at - 1)
    return prompt, ids, merged, is_visual


def shim(model):
    """What fitprune_reference's helpers read from a transformers LLaVA, for the HR decoder."""
    llama = model.llama
    return SimpleNamespace(model=SimpleNamespace(language_model=llama.model), lm_head=llama.lm_head,
                           config=SimpleNamespace(text_config=llama.config),
                           get_input_embeddings=llama.get_input_embeddings)


def run_case(model, tokenizer, images, case):
    prompt, ids, embeds, is_visual = embed(model, tokenizer, images, case["image"], case["text"], case["size"])
    with torch.no_grad():
        logits = model.llama(inputs_embeds=embeds).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, TOP)
        gen = model.llama.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                   max_new_tokens=GREEDY, do_sample=False, num_beams=1,
                                   pad_token_id=tokenizer.pad_token_id)
        # The same greedy tokens from the manual loop pruning uses (no deletions): both paths agree.
        _, top0, greedy0 = fr.pruned_generate(shim(model), embeds, list(is_visual), [0] * TEXT["num_hidden_layers"])
    greedy = gen[0].tolist()
    assert torch.allclose(top0.values, top.values, atol=1e-5), "manual decoder loop diverges from transformers"
    assert greedy0 == greedy[:len(greedy0)], (greedy0, greedy)
    return {"prompt": prompt, "input_ids": ids, "visual_tokens": sum(is_visual), "top_ids": top.indices.tolist(),
            "top_logprobs": top.values.tolist(), "greedy": greedy}


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    images = make_images()
    fitprune = os.path.join(ROOT, "target", "debug", "fitprune")
    with tempfile.TemporaryDirectory() as work:
        tok_dir = os.path.join(work, "demo")
        subprocess.run([fitprune, "demo-model", tok_dir], check=True, stdout=subprocess.DEVNULL)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        model, text_cfg, clip_cfg = build(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                          tokenizer.pad_token_id)
        write_checkpoint(model, text_cfg, clip_cfg, tok_dir)
    # Reload what was written, so the expected outputs come from the committed files.
    state = {}
    for file in sorted(f for f in os.listdir(MODEL) if f.endswith(".bin")):
        state.update(torch.load(os.path.join(MODEL, file), map_location="cpu"))
    model.llama.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.vision_tower.")
                                 and not k.startswith("model.mm_projector.")})
    model.vision_tower.load_state_dict({timm_name(k[len("model.vision_tower."):]): v for k, v in state.items()
                                        if k.startswith("model.vision_tower.")})
    model.mm_projector.load_state_dict({k[len("model.mm_projector."):]: v for k, v in state.items()
                                        if k.startswith("model.mm_projector.")})
    model.eval()
    doc = {"generator": "tests/reference/hr_reference.py", "transformers": transformers.__version__,
           "torch": torch.__version__, "timm": timm.__version__, "image_token_index": IMAGE_TOKEN_INDEX,
           "cases": [], "recipes": [], "calibration": None}
    for case in CASES:
        out = run_case(model, tokenizer, images, case)
        doc["cases"].append(dict(case, **out))
        print(case["name"], len(out["input_ids"]), "ids,", out["visual_tokens"], "visual, greedy", out["greedy"])
    lm = shim(model)
    for case in RECIPES:
        _, ids, embeds, is_visual = embed(model, tokenizer, images, case["image"], case["text"], case["size"])
        n = sum(is_visual)
        recipe = case["recipe"]
        deletions = [int(d * n / recipe["visual_tokens"]) for d in recipe["deletions"]]
        trace, top, greedy = fr.pruned_generate(lm, embeds, list(is_visual), deletions)
        doc["recipes"].append(dict(case, input_ids=ids, visual_tokens=n, scaled_deletions=deletions, trace=trace,
                                   top_ids=top.indices.tolist(), top_logprobs=top.values.tolist(), greedy=greedy))
        print(case["name"], n, deletions, [len(t["kept_visual"]) for t in trace], greedy)
    samples = []
    for s in CALIBRATION["samples"]:
        _, _, embeds, is_visual = embed(model, tokenizer, images, s["image"], s["text"], CALIBRATION["size"])
        samples.append((embeds, is_visual))
    fnr.CALIBRATION = CALIBRATION
    counts, results = fnr.calibrate(lm, samples)
    doc["calibration"] = dict(CALIBRATION, visual_tokens=counts, results=results)
    for r in results:
        print("budget", r["budget"], "alpha", r["alpha"], r["deletions"], "counts", counts)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
