"""Expected ids of the demo tokenizer as HF transformers loads it, for `src/model/demo_tokenizer.rs` tests.

DIR holds the files `write_demo_tokenizer(DIR, 512)` writes, e.g. from `fitprune demo-model DIR`
with the tiny preset (vocab_target 512). The script loads DIR with `AutoTokenizer` (and with
`AutoProcessor` when DIR has the processor configs), checks that nothing encodes to `<unk>`, that
text without special tokens round-trips (except leading whitespace, which the Llama-style `▁`
prefix absorbs), that the chat template loads, and writes tests/fixtures/demo_tokenizer_expected.json.
With --check it compares against that file instead (e.g. under another transformers version).

    python tests/reference/tokenizer_reference.py DIR [--check]
"""

import argparse
import json
import sys
from pathlib import Path

import transformers
from transformers import AutoProcessor, AutoTokenizer

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tokenizer_expected.json"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "USER: <image>\nWhat is this? ASSISTANT:",
    "USER: <image>\n<image>\nCompare these two images. ASSISTANT: The first one.",
    "<image><image>",
    "<image>" * 5 + "\nDescribe",
    "a<image>b",
    "<s>already special</s>",
    "line one\nline two\r\n\ttabbed\n\n",
    "naïve café, Zürich — 東京 🦙🚀 ∑ \u0000 \u00ff \U0010ffff",
    "Numbers 1234567890 and symbols <>&{}[]|\\^~`@#$%*+=_",
    "Zebra QUIZ: Jumping Vexed Kangaroos!",
    "  leading and trailing spaces  ",
    " ",
    "",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--check", action="store_true", help="compare with the committed fixture")
    args = parser.parse_args()

    tok = AutoTokenizer.from_pretrained(args.dir)
    assert len(tok) == tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           [("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>"), ("image", "<image>")]}
    assert tok.bos_token_id == ids["bos"] and tok.eos_token_id == ids["eos"] and tok.pad_token_id == ids["pad"]

    cases = []
    for text in TEXTS:
        with_special = tok(text).input_ids
        plain = tok(text, add_special_tokens=False).input_ids
        assert with_special == [ids["bos"]] + plain, text
        assert ids["unk"] not in with_special, f"<unk> in {text!r}"
        decoded = tok.decode(plain, skip_special_tokens=False)
        if not text[:1].isspace():
            assert decoded == text, f"{text!r} decodes to {decoded!r}"
        cases.append({
            "text": text,
            "ids": with_special,
            "tokens": tok.convert_ids_to_tokens(with_special),
            "decoded": decoded,
            "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
        })
    assert tok.encode("<image><image>", add_special_tokens=False) == [ids["image"]] * 2

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "USER: <image>\nWhat is this? ASSISTANT:", prompt
    if (args.dir / "preprocessor_config.json").exists():
        processor = AutoProcessor.from_pretrained(args.dir)
        assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
        for case in cases:
            assert processor.tokenizer(case["text"]).input_ids == case["ids"], case["text"]

    doc = {
        "generated_by": "tests/reference/tokenizer_reference.py",
        "transformers": transformers.__version__,
        "vocab_size": len(tok),
        "special_ids": ids,
        "chat_prompt": prompt,
        "cases": cases,
    }
    if args.check:
        want = json.loads(OUT.read_text(encoding="utf-8"))
        for key in ("vocab_size", "special_ids", "chat_prompt", "cases"):
            assert want[key] == doc[key], f"{key} differs from {OUT} (transformers {transformers.__version__})"
        print(f"transformers {transformers.__version__} agrees with {OUT}", file=sys.stderr)
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
