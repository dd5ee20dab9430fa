"""Drives traffic at a running `fitprune serve` so that every series the dashboard plots exists.

Usage: traffic.py BASE_URL ADMIN_TOKEN IMAGE_PNG [PROMETHEUS_URL]

Unpruned and pruned chats with a data-URL image, a calibration job and an evaluation job polled to
completion (the calibration's recipes make the pruned chats prune), a streamed chat dropped mid-stream (a client_gone
cancellation), and a few 4xx errors. Standard library only; every wait is bounded.
"""

import base64
import http.client
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BASE, TOKEN, IMAGE = sys.argv[1], sys.argv[2], sys.argv[3]
PROM = sys.argv[4] if len(sys.argv) > 4 else None
with open(IMAGE, "rb") as f:
    DATA_URL = "data:image/png;base64," + base64.b64encode(f.read()).decode()


def call(method, path, body=None, token=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def metric_value(name_and_labels):
    with urllib.request.urlopen(BASE + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name_and_labels + " "):
                return float(line.split()[-1])
    return None


def wait_succeeded(path, what, timeout=120):
    """Polls an admin job at `path` until it succeeds (returns it); exits on failure or timeout."""
    deadline = time.time() + timeout
    while True:
        status, j = call("GET", path, token=TOKEN)
        assert status == 200, j
        if j["status"] == "succeeded":
            return j
        if j["status"] in ("failed", "cancelled"):
            sys.exit(f"{what} ended {j['status']}: {j}")
        if time.time() > deadline:
            sys.exit(f"{what} still {j['status']} after {timeout} s")
        time.sleep(0.5)


def main():
    t0 = time.time()
    # The served model name (the `model` field is checked against it).
    status, models = call("GET", "/v1/models")
    assert status == 200, models
    model = models["data"][0]["id"]

    # 1. Unpruned chats.
    for _ in range(2):
        r = call("POST", "/v1/chat/completions", chat_body(model, "off"))
        expect(r, 200, "unpruned chat")
    print(f"traffic: unpruned chats ok ({time.time() - t0:.1f}s)", flush=True)

    # 2. A calibration job, polled to completion.
    samples = [{"image": DATA_URL, "prompt": p} for p in ("What is in this picture?", "Describe the colours.")]
    status, job = call("POST", "/admin/calibrate", {"budgets": [0.3, 0.5], "samples": samples, "name": "deploy-check"},
                       token=TOKEN)
    if status != 202:
        sys.exit(f"POST /admin/calibrate answered {status}: {job}")
    wait_succeeded(f"/admin/jobs/{job['id']}", "calibration job")
    print(f"traffic: calibration job {job['id']} succeeded ({time.time() - t0:.1f}s)", flush=True)

    # 2b. An evaluation job at the budgets the calibration just fitted, polled to completion.
    labelled = [{"image": DATA_URL, "prompt": "Is there a shape? Answer yes or no.", "answer": "yes"}]
    status, ev = call("POST", "/admin/evaluations", {"budgets": [0, 0.5], "methods": ["fitprune", "random"],
                                                    "samples": labelled, "max_new_tokens": 4, "name": "deploy-check"},
                      token=TOKEN)
    if status != 202:
        sys.exit(f"POST /admin/evaluations answered {status}: {ev}")
    e = wait_succeeded(f"/admin/evaluations/{ev['id']}", "evaluation job")
    print(f"traffic: evaluation job {ev['id']} succeeded with {len(e.get('rows') or [])} rows "
          f"({time.time() - t0:.1f}s)", flush=True)

    # 3. Pruned chats (the job stored recipes for budgets 0.3 and 0.5). The first pruned prefill
    # creates the pruned="true" histogram series; Prometheus' first sample of a series is only a
    # baseline for rate(), so the rest come after Prometheus has scraped it, to show up in rates.
    for i, budget in enumerate((0.5, 0.3, 0.5)):
        if i == 1:
            wait_for_scrape('fitprune_prefill_duration_seconds_count{pruned="true"}')
            # Likewise the fidelity probe of that first pruned chat (the server runs with
            # FITPRUNE_FIDELITY_SAMPLE_RATE=1; the probe completes once the engine is idle).
            wait_for_scrape('fitprune_fidelity_kl_count{recipe!=""}')
        r = call("POST", "/v1/chat/completions", chat_body(model, {"budget": budget}))
        reply = expect(r, 200, f"pruned chat (budget {budget})")
        p = reply.get("pruning") or {}
        if not p.get("recipe_id") or not p.get("visual_tokens_kept", 0) < p.get("visual_tokens", 0):
            sys.exit(f"budget {budget} did not prune: {p}")
    print(f"traffic: pruned chats ok ({time.time() - t0:.1f}s)", flush=True)

    # 4. A streamed chat dropped after its first event: a client_gone cancellation.
    before = metric_value('fitprune_requests_cancelled_total{reason="client_gone"}') or 0
    u = urllib.parse.urlsplit(BASE)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = chat_body(model, "off", max_tokens=512)
    body["stream"] = True
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        sys.exit(f"streamed chat answered {resp.status}: {resp.read()[:500]}")
    first = resp.readline()
    if not first.startswith(b"data:"):
        sys.exit(f"streamed chat: unexpected first line {first[:200]!r}")
    conn.sock.close()
    conn.close()
    deadline = time.time() + 30
    while (metric_value('fitprune_requests_cancelled_total{reason="client_gone"}') or 0) <= before:
        if time.time() > deadline:
            sys.exit("the dropped stream was not counted as cancelled within 30 s")
        time.sleep(0.2)
    print(f"traffic: dropped stream counted as cancelled ({time.time() - t0:.1f}s)", flush=True)

    # 5. Errors: a bad request, an unknown recipe, a missing admin token.
    bad = chat_body(model, "off")
    bad["temperature"] = "hot"
    expect(call("POST", "/v1/chat/completions", bad), 400, "bad request")
    expect(call("POST", "/v1/chat/completions", chat_body(model, {"recipe_id": "no-such-recipe"})), 404,
           "unknown recipe")
    expect(call("GET", "/admin/recipes"), 401, "admin without token")
    status, recipes = call("GET", "/admin/recipes", token=TOKEN)
    assert status == 200 and recipes["data"], recipes

    # 6. Sharing recipes between replicas (deploy/README.md): export one, delete it, import the
    # exported JSON as another replica would, and serve with it.
    rid = recipes["data"][0]["id"]
    exported = expect(call("GET", f"/admin/recipes/{rid}", token=TOKEN), 200, "export recipe")
    expect(call("DELETE", f"/admin/recipes/{rid}", token=TOKEN), 200, "delete recipe")
    imported = expect(call("POST", "/admin/recipes", exported, token=TOKEN), 201, "import exported recipe")
    reply = expect(call("POST", "/v1/chat/completions", chat_body(model, {"recipe_id": imported["id"]})), 200,
                   "chat with the imported recipe")
    if (reply.get("pruning") or {}).get("recipe_id") != imported["id"]:
        sys.exit(f"the imported recipe was not applied: {reply.get('pruning')}")
    print(f"traffic: recipe exported, re-imported and applied ({time.time() - t0:.1f}s)", flush=True)
    print(f"traffic: done in {time.time() - t0:.1f}s", flush=True)


def wait_for_scrape(series, timeout=30):
    """Waits until Prometheus (if given) has a sample of `series` from this server."""
    if PROM is None:
        time.sleep(2.5)
        return
    instance = urllib.parse.urlsplit(BASE).netloc
    sel = series.replace("{", f'{{instance="{instance}",', 1)
    url = PROM + "/api/v1/query?" + urllib.parse.urlencode({"query": sel})
    deadline = time.time() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=10) as r:
            if json.loads(r.read())["data"]["result"]:
                return
        if time.time() > deadline:
            sys.exit(f"Prometheus did not scrape {series} within {timeout} s")
        time.sleep(0.2)


def chat_body(model, pruning, max_tokens=6):
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "pruning": pruning,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": DATA_URL}},
            {"type": "text", "text": "What is in this picture?"}]}],
    }


def expect(result, status, what):
    got, body = result
    if got != status:
        sys.exit(f"{what}: expected {status}, got {got}: {body}")
    return body


if __name__ == "__main__":
    main()
