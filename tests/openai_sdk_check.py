"""Drive a running `fitprune serve` with the official `openai` Python SDK.

Usage: python tests/openai_sdk_check.py http://127.0.0.1:PORT

Checks, on the SDK's parsed objects: a chat completion with a data-URL image, a stream with
`stream_options.include_usage`, and logprobs with top alternatives and raw bytes. Exits non-zero
(with an assertion message) on any mismatch.
"""

import base64
import struct
import sys
import zlib

import openai


def tiny_png(width: int = 24, height: int = 16) -> bytes:
    """A small RGB gradient PNG, written without third-party packages."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in ((x * 9) % 256, (y * 13) % 256, 128))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

    models = client.models.list()
    model = models.data[0].id
    assert models.data[0].object == "model", models

    image = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                {"type": "text", "text": "What is in this image?"},
            ],
        }
    ]

    # 1. A chat completion with an image.
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert done.object == "chat.completion", done
    assert len(done.choices) == 1
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert done.usage is not None
    assert done.usage.prompt_tokens > 144, done.usage  # image tokens count as prompt tokens
    assert 1 <= done.usage.completion_tokens <= 8, done.usage
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    pruning = (done.model_extra or {}).get("pruning")
    assert pruning is not None and pruning["visual_tokens"] == 144, pruning
    print(f"chat ok: {choice.message.content!r} ({done.usage.completion_tokens} tokens)")

    # 2. The same request streamed, with include_usage.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content, (text, choice.message.content)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason], finishes
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last
    assert last.usage.total_tokens == done.usage.total_tokens, (last.usage, done.usage)
    print(f"stream ok: {len(chunks)} chunks, usage {last.usage.total_tokens} tokens")

    # 3. Logprobs with alternatives and raw bytes.
    lp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = lp.choices[0].logprobs.content
    assert content, lp
    for entry in content:
        assert entry.logprob <= 0.0
        assert isinstance(entry.bytes, list) and all(0 <= b <= 255 for b in entry.bytes)
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True), values
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
    print(f"logprobs ok: {len(content)} tokens, first {content[0].token!r} {content[0].logprob:.3f}")

    # 4. Errors surface as the SDK's typed exceptions.
    try:
        client.chat.completions.create(model=model, messages=messages, n=2)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "n", e.body
    else:
        raise AssertionError("n=2 should be refused")
    print("openai SDK checks passed")


if __name__ == "__main__":
    main()
