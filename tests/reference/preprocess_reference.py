"""Reference outputs for `src/model/preprocess.rs` and `src/model/resample.rs`.

Builds a few small test images deterministically, saves them as PNG into
`tests/fixtures/preprocess/`, and records what transformers' slow, PIL-based
`CLIPImageProcessor` (and `LlavaImageProcessor` with `do_pad`, the "pad to square"
variant) and Pillow's `Image.resize` produce for them in
`tests/fixtures/preprocess/expected.json`:

* `cases`: small images through the full pipeline; `resized` is the u8 HWC output of
  the PIL resize step (compared byte for byte), `pixel_values` the CHW float32 result.
  u8 arrays are hex strings; float32 arrays are big-endian IEEE bits, 8 hex digits each.
* `resize`: Pillow `Image.resize` alone, for every filter, up- and down-scaling, and
  one-axis-only changes (compared byte for byte).
* `procedural`: realistic sizes (336 px, llava-1.5 config) on images that the Rust
  test regenerates from the same integer formula, so no large PNG is committed;
  the resize output is compared by FNV-1a 64 hash and `pixel_values` at sampled indices.

Run from the repository root (needs only numpy, pillow and transformers; no torch):

    python -m venv /tmp/prevenv
    /tmp/prevenv/bin/pip install pillow numpy transformers==4.57.6
    /tmp/prevenv/bin/python tests/reference/preprocess_reference.py

Produced with transformers 4.57.6, Pillow 13.0.0, numpy 2.4 (recorded under "versions" in the
JSON); rerunning gives identical files. Consumers: the tests in `src/model/resample.rs` and
`src/model/preprocess/tests.rs`.
"""

import json
import os

import numpy as np
import PIL
import transformers
from PIL import Image
from transformers import CLIPImageProcessor, LlavaImageProcessor
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import ChannelDimension, to_numpy_array

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "fixtures", "preprocess")

LLAVA15 = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "CLIPImageProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def build_images():
    """Small images covering RGB, RGBA, L, P and 16-bit grayscale PNGs."""
    rng = np.random.default_rng(20240611)
    images = {}

    # 37x23 landscape: smooth gradients plus noise, so resampling sees edges and ramps.
    y, x = np.mgrid[0:23, 0:37]
    base = np.stack([x * 7, y * 11, (x + y) * 5], axis=-1)
    noise = rng.integers(0, 60, size=(23, 37, 3))
    images["landscape_37x23.png"] = Image.fromarray(((base + noise) % 256).astype(np.uint8))

    # 50x80 portrait with saturated blocks, which make bicubic overshoot and clip.
    portrait = rng.integers(0, 256, size=(80, 50, 3)).astype(np.uint8)
    portrait[10:40, 5:30] = [255, 0, 255]
    portrait[50:70, 20:45] = [0, 0, 0]
    images["portrait_50x80.png"] = Image.fromarray(portrait)

    # RGBA: convert("RGB") must drop alpha without premultiplying.
    rgba = rng.integers(0, 256, size=(31, 29, 4)).astype(np.uint8)
    images["rgba_29x31.png"] = Image.fromarray(rgba)

    # Grayscale L: replicated into three channels.
    y, x = np.mgrid[0:27, 0:40]
    gray = ((x * 6 + y * 3) % 256 + rng.integers(0, 20, size=(27, 40))).clip(0, 255)
    images["gray_40x27.png"] = Image.fromarray(gray.astype(np.uint8))

    # Palette image: decoders expand it, PIL converts through the palette.
    pal = Image.fromarray(rng.integers(0, 256, size=(34, 21, 3)).astype(np.uint8))
    images["palette_21x34.png"] = pal.quantize(colors=16, method=Image.Quantize.MEDIANCUT)

    # 16-bit grayscale: PIL opens it as I;16 and convert("RGB") clamps values above 255.
    g16 = rng.integers(0, 1000, size=(26, 19)).astype(np.uint16)
    images["gray16_19x26.png"] = Image.frombytes("I;16", (19, 26), g16.astype("<u2").tobytes())
    return images


def procedural(width, height):
    """Integer pattern with ramps and hard wraps; mirrored by `procedural_image` in Rust."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    chans = [(x * x * 3 + y * 5 + x * y + c * 71 + ((x ^ y) & 31) * 4) % 256 for c in range(3)]
    return Image.fromarray(np.stack(chans, axis=-1).astype(np.uint8))


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def make_processor(config, pad_to_square):
    cfg = {k: v for k, v in config.items() if k != "image_processor_type"}
    if pad_to_square:
        return LlavaImageProcessor.from_dict({**cfg, "do_pad": True})
    return CLIPImageProcessor.from_dict(cfg)


def run_pipeline(img, config, pad_to_square):
    """Returns (resized u8 HWC or None, pixel_values CHW float32)."""
    proc = make_processor(config, pad_to_square)
    expected = proc.preprocess(img, return_tensors="np")["pixel_values"][0]

    # Re-run the steps of the slow `preprocess` by hand to capture the resize output.
    fmt = ChannelDimension.LAST
    arr = to_numpy_array(convert_to_rgb(img))
    if pad_to_square:
        mean_colour = tuple(int(x * 255) for x in proc.image_mean)
        arr = proc.pad_to_square(arr, background_color=mean_colour, input_data_format=fmt)
    resized = None
    if proc.do_resize:
        arr = proc.resize(arr, size=proc.size, resample=proc.resample, input_data_format=fmt)
        resized = arr.copy()
    if proc.do_center_crop:
        arr = proc.center_crop(arr, size=proc.crop_size, input_data_format=fmt)
    if proc.do_rescale:
        arr = proc.rescale(arr, scale=proc.rescale_factor, input_data_format=fmt)
    if proc.do_normalize:
        arr = proc.normalize(arr, mean=proc.image_mean, std=proc.image_std, input_data_format=fmt)
    manual = np.transpose(arr, (2, 0, 1))
    assert manual.shape == expected.shape and np.array_equal(manual, expected), "step replay drifted"
    return resized, expected.astype(np.float32)


def f32_hex(a):
    """Big-endian IEEE bits of each float32, 8 hex digits per value: exact and compact."""
    return np.asarray(a, dtype=">f4").ravel().tobytes().hex()


def u8_hex(a):
    return np.asarray(a, dtype=np.uint8).ravel().tobytes().hex()


SMALL = {
    "crop_size": {"height": 16, "width": 16},
    "size": {"shortest_edge": 16},
    "resample": 3,
    "image_mean": LLAVA15["image_mean"],
    "image_std": LLAVA15["image_std"],
}

CASES = [
    # (name, image, config, pad_to_square)
    *[(f"bicubic16_{n[:-4]}", n, SMALL, False) for n in [
        "landscape_37x23.png", "portrait_50x80.png", "rgba_29x31.png",
        "gray_40x27.png", "palette_21x34.png", "gray16_19x26.png"]],
    ("bilinear_crop_12x14", "landscape_37x23.png",
     {"size": {"shortest_edge": 20}, "crop_size": {"height": 12, "width": 14}, "resample": 2}, False),
    ("crop_pads_mixed", "landscape_37x23.png",
     {**SMALL, "size": {"shortest_edge": 12}, "crop_size": {"height": 10, "width": 24}}, False),
    ("crop_pads_both", "portrait_50x80.png",
     {**SMALL, "size": {"shortest_edge": 9}, "crop_size": {"height": 17, "width": 12}}, False),
    ("upscale30", "landscape_37x23.png", {**SMALL, "size": {"shortest_edge": 30}, "crop_size": 24}, False),
    ("legacy_int_sizes", "portrait_50x80.png", {"size": 18, "crop_size": 14}, False),
    ("exact_size_no_crop", "landscape_37x23.png",
     {**SMALL, "size": {"height": 14, "width": 18}, "do_center_crop": False}, False),
    ("no_resize_crop_pads", "landscape_37x23.png", {**SMALL, "do_resize": False, "crop_size": 20}, False),
    ("no_rescale_no_normalize", "gray_40x27.png", {**SMALL, "do_rescale": False, "do_normalize": False}, False),
    ("pad_square_landscape", "landscape_37x23.png", SMALL, True),
    ("pad_square_portrait", "portrait_50x80.png", SMALL, True),
    ("pad_square_rgba", "rgba_29x31.png", SMALL, True),
]

# (image, filter id, width, height): all PIL filters, down/up-scaling, one axis only.
RESIZES = [
    ("landscape_37x23.png", 3, 37, 11),
    ("landscape_37x23.png", 3, 13, 23),
    ("landscape_37x23.png", 3, 53, 31),
    ("portrait_50x80.png", 2, 17, 29),
    ("portrait_50x80.png", 2, 50, 33),
    ("portrait_50x80.png", 0, 17, 29),
    ("landscape_37x23.png", 0, 45, 29),
    ("landscape_37x23.png", 1, 19, 12),
    ("landscape_37x23.png", 1, 41, 29),
    ("landscape_37x23.png", 4, 12, 9),
    ("landscape_37x23.png", 5, 14, 30),
]

PROCEDURAL = [
    # (name, width, height, config, pad_to_square)
    ("llava15_1200x900", 1200, 900, LLAVA15, False),
    ("llava15_pad_500x700", 500, 700, LLAVA15, True),
    ("llava15_upscale_300x200", 300, 200, LLAVA15, False),
]


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, img in build_images().items():
        img.save(os.path.join(OUT_DIR, name))
    # Always work from the files on disk, exactly as the Rust test will.
    loaded = {}
    for name in build_images():
        with Image.open(os.path.join(OUT_DIR, name)) as im:
            im.load()
            loaded[name] = im.copy()

    cases = []
    for name, image, config, pad in CASES:
        resized, pixels = run_pipeline(loaded[image], config, pad)
        cases.append({
            "name": name,
            "image": image,
            "pad_to_square": pad,
            "config": config,
            "resized": None if resized is None else {
                "height": resized.shape[0], "width": resized.shape[1],
                "hex": u8_hex(resized),
            },
            "pixel_values": {"shape": list(pixels.shape), "f32_hex": f32_hex(pixels)},
        })

    resizes = []
    for image, filt, w, h in RESIZES:
        out = np.asarray(loaded[image].convert("RGB").resize((w, h), resample=filt))
        resizes.append({"image": image, "filter": filt, "width": w, "height": h,
                        "hex": u8_hex(out)})

    procs = []
    for name, w, h, config, pad in PROCEDURAL:
        resized, pixels = run_pipeline(procedural(w, h), config, pad)
        flat = pixels.ravel()
        idx = np.linspace(0, flat.size - 1, 256).astype(np.int64)
        procs.append({
            "name": name, "width": w, "height": h, "config": config, "pad_to_square": pad,
            "resized_height": resized.shape[0], "resized_width": resized.shape[1],
            "resized_fnv1a64": fnv1a64(resized.astype(np.uint8).tobytes()),
            "shape": list(pixels.shape),
            "sum": float(flat.astype(np.float64).sum()),
            "sample_indices": idx.tolist(),
            "sample_f32_hex": f32_hex(flat[idx]),
        })

    doc = {
        "generator": "tests/reference/preprocess_reference.py",
        "versions": {"transformers": transformers.__version__, "pillow": PIL.__version__,
                     "numpy": np.__version__},
        "cases": cases,
        "resize": resizes,
        "procedural": procs,
    }
    with open(os.path.join(OUT_DIR, "expected.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
