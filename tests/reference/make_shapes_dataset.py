#!/usr/bin/env python3
"""Synthetic shapes-VQA for the trained demo model (issue 13): coloured shapes on a plain background.

Each image (96x96 PNG, the tiny preset's input size) holds 1-4 non-overlapping shapes, one per
16-px cell; each shape is one of circle/square/triangle in one of red/green/blue/yellow. Three question kinds, in the LLaVA eval
JSONL format `{"question_id", "image", "text", "answer"}`:

- existence (POPE style): "Is there a red circle in the image?" -> "yes" / "no" (each with probability 1/2; the "no"
  cases ask about a shape/colour pair absent from the image, half of them with the shape or the colour
  present elsewhere, so colour or shape alone does not answer it);
- colour: "What colour is the square? Answer with one word." (asked only when exactly one square);
- count: "How many triangles are there? Answer with a number." -> "0".."4".

Seeded (numpy Generator + PIL, no other randomness), so the same arguments give the same files.
`train_demo.py` draws its training split in memory with the same functions (seed 7); the committed
held-out split is the second command below.

    python tests/reference/make_shapes_dataset.py OUT_DIR --split train --count 3000 --seed 1
    python tests/reference/make_shapes_dataset.py tests/fixtures/trained-demo/eval --split eval --count 150 --seed 2
"""

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96
SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
BACKGROUND = (235, 235, 235)
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def place_shapes(rng):
    """1-4 shapes, each inside its own cell of a 6x6 grid of 16-px cells, which are exactly the
    trained model's 16-px patches: a shape (12-14 px, +-1 px jitter) is one visual token, so the
    vision tower recognises shapes from single patches and the rest of the 36 tokens are
    background, which is what visual-token pruning should find."""
    n = int(rng.integers(1, 5))
    cells = rng.choice(36, size=n, replace=False)
    shapes = []
    for c in cells:
        row, col = divmod(int(c), 6)
        size = int(rng.integers(12, 15))
        lo, hi = 1, 16 - size - 1
        x = col * 16 + min(max((16 - size) // 2 + int(rng.integers(-1, 2)), lo), hi)
        y = row * 16 + min(max((16 - size) // 2 + int(rng.integers(-1, 2)), lo), hi)
        kind = SHAPES[int(rng.integers(0, 3))]
        colour = list(COLOURS)[int(rng.integers(0, 4))]
        shapes.append({"kind": kind, "colour": colour, "box": (x, y, x + size, y + size)})
    return shapes


def draw(shapes):
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in shapes:
        x0, y0, x1, y1 = s["box"]
        fill = COLOURS[s["colour"]]
        if s["kind"] == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif s["kind"] == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def existence(rng, shapes):
    present = {(s["colour"], s["kind"]) for s in shapes}
    if rng.random() < 0.5:
        colour, kind = sorted(present)[int(rng.integers(0, len(present)))]
        return f"Is there a {colour} {kind} in the image?", "yes"
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    # Prefer hard negatives: the colour or the shape occurs, just not together.
    hard = [(c, k) for (c, k) in absent if any(c == pc or k == pk for pc, pk in present)]
    pool = hard if hard and rng.random() < 0.5 else absent
    colour, kind = pool[int(rng.integers(0, len(pool)))]
    return f"Is there a {colour} {kind} in the image?", "no"


def colour_question(rng, shapes):
    single = [k for k in SHAPES if sum(s["kind"] == k for s in shapes) == 1]
    if not single:
        return None
    kind = single[int(rng.integers(0, len(single)))]
    colour = next(s["colour"] for s in shapes if s["kind"] == kind)
    return f"What colour is the {kind}? Answer with one word.", colour


def count_question(rng, shapes):
    kind = SHAPES[int(rng.integers(0, 3))]
    n = sum(s["kind"] == kind for s in shapes)
    return f"How many {PLURAL[kind]} are there? Answer with a number.", str(n)


def make(out_dir, split, count, seed):
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    lines = []
    kinds = ["existence", "colour", "count"]
    for i in range(count):
        kind = kinds[i % 3]
        while True:
            shapes = place_shapes(rng)
            qa = {"existence": existence, "colour": colour_question, "count": count_question}[kind](rng, shapes)
            if qa is not None:
                break
        name = f"{split}_{i:05d}.png"
        draw(shapes).save(os.path.join(img_dir, name), optimize=True)
        q, a = qa
        lines.append({"question_id": f"{split}-{i}", "image": f"images/{name}", "text": q, "answer": a,
                      "category": kind})
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--split", default="eval")
    p.add_argument("--count", type=int, default=150)
    p.add_argument("--seed", type=int, default=2)
    a = p.parse_args()
    make(a.out_dir, a.split, a.count, a.seed)


if __name__ == "__main__":
    main()
