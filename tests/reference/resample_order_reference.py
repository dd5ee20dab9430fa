"""Pillow 13's resize pass order: vertical first when the height shrinks by more than twice as
many pixels as the width (`ImagingResampleInner`), which the intermediate u8 rounding makes
visible. Writes tests/fixtures/preprocess/pass_order.json (same shape as the `resize` list of
expected.json) for src/model/resample.rs: sizes on both sides of the rule, every filter.

Run: /opt/refenv/bin/python tests/reference/resample_order_reference.py
"""

import json
import os

import PIL
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIR = os.path.join(ROOT, "tests", "fixtures", "preprocess")

# (image, width, height): portrait_50x80 and landscape_37x23 resized so that dy > 2*dx (vertical
# first), dy == 2*dx (horizontal first, the boundary), width growing while height shrinks, and a
# NeXT-style base resize of a tall image to a square.
SIZES = [
    ("portrait_50x80.png", 45, 30),
    ("portrait_50x80.png", 40, 60),
    ("portrait_50x80.png", 41, 60),
    ("portrait_50x80.png", 90, 33),
    ("portrait_50x80.png", 32, 32),
    ("landscape_37x23.png", 60, 9),
    ("landscape_37x23.png", 30, 11),
]
FILTERS = [1, 2, 3, 4, 5]


def main():
    cases = []
    for name, w, h in SIZES:
        img = Image.open(os.path.join(DIR, name)).convert("RGB")
        for f in FILTERS:
            out = img.resize((w, h), resample=f)
            cases.append({"image": name, "filter": f, "width": w, "height": h, "hex": out.tobytes().hex()})
    doc = {"generator": "tests/reference/resample_order_reference.py", "pillow": PIL.__version__, "resize": cases}
    with open(os.path.join(DIR, "pass_order.json"), "w") as f:
        json.dump(doc, f)
        f.write("\n")


if __name__ == "__main__":
    main()
