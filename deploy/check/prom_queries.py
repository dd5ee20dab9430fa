"""Runs every dashboard panel query and every alert rule against a live Prometheus.

Usage: prom_queries.py PROM_URL DASHBOARD_JSON INSTANCE TIMEOUT_S

INSTANCE is the scraped server's host:port; its /metrics is read once (after the traffic) and the
check first waits until Prometheus has scraped those values, so that no rate is computed from
samples taken before the traffic ended.

Each target expression is run twice through /api/v1/query: with the template variables set to the
scraped server (`$instance` regex-escaped the way Grafana does for multi-value variables, `$model`
read from fitprune_model_info) and set to "All" (`.*`). A query that errors fails at once; a query
with no series, or whose series are all NaN (a quantile or ratio of rates that are zero: the
traffic did not reach that panel), is retried until TIMEOUT_S and then fails.
The template variables' own `label_values(...)` queries are checked through /api/v1/series. Every
loaded alert rule must report health "ok" after an evaluation, and its expression must run.
"""

import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request

PROM, DASH, INSTANCE, TIMEOUT = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
# Grafana's $__rate_interval is max($__interval + scrape, 4 * scrape); the check scrapes every second
# and drives its traffic within the last minute, so a minute covers it. $__range: the time picker.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "10m"}


def api(path, **params):
    url = PROM + path + "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        return None, f"{body.get('errorType')}: {body.get('error')}"
    return body["data"], None


def grafana_regex_escape(value):
    # Grafana's prometheusRegularEscape for multi-value variables: regex metacharacters get a
    # backslash, itself escaped inside the PromQL string literal.
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(expr, values):
    def repl(m):
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


with open(DASH) as f:
    dash = json.load(f)

deadline = time.time() + TIMEOUT
failures = []

# The model the server reports, as the $model variable would list it.
while True:
    data, err = api("/api/v1/query", query=f'fitprune_model_info{{instance="{INSTANCE}"}}')
    if data and data["result"]:
        break
    if time.time() > deadline:
        sys.exit(f"fitprune_model_info{{instance={INSTANCE!r}}} never appeared in Prometheus ({err or 'no series'})")
    time.sleep(1)
MODEL = data["result"][0]["metric"]["model"]

# Wait until Prometheus has the server's current values of series the traffic moved last.
SYNC = ("fitprune_generation_tokens_total", "fitprune_visual_tokens_in_total",
        "fitprune_calibration_duration_seconds_count", "fitprune_evaluation_duration_seconds_count", 'fitprune_requests_cancelled_total{reason="client_gone"}',
        'fitprune_requests_total{route="/admin/recipes",status="200"}')
with urllib.request.urlopen(f"http://{INSTANCE}/metrics", timeout=10) as r:
    exposed = {}
    for line in r.read().decode().splitlines():
        if not line.startswith("#") and " " in line:
            name, value = line.rsplit(" ", 1)
            exposed[name] = float(value)
for series in SYNC:
    want = exposed.get(series)
    if want is None:
        sys.exit(f"the server does not expose {series} after the traffic")
    sel = series.replace("{", f'{{instance="{INSTANCE}",') if "{" in series else f'{series}{{instance="{INSTANCE}"}}'
    while True:
        data, err = api("/api/v1/query", query=sel)
        if data and data["result"] and float(data["result"][0]["value"][1]) >= want:
            break
        if time.time() > deadline:
            sys.exit(f"Prometheus did not scrape {series} = {want} in time ({err or data})")
        time.sleep(0.5)
print(f"prometheus: caught up with the server's counters after the traffic")

# Template variables: label_values(<selector>, <label>) must list the server's value.
concrete = {"instance": grafana_regex_escape(INSTANCE), "model": grafana_regex_escape(MODEL), **BUILTINS}
expect = {"instance": INSTANCE, "model": MODEL}
for v in dash["templating"]["list"]:
    q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
    if not m:
        failures.append(f"variable {v['name']}: unsupported query {q!r}")
        continue
    selector = substitute(m.group(1), concrete)
    data, err = api("/api/v1/series", **{"match[]": selector})
    values = {s.get(m.group(2)) for s in (data or [])}
    if err or expect[v["name"]] not in values:
        failures.append(f"variable {v['name']}: {q} -> {err or sorted(values)}, expected {expect[v['name']]!r}")
print(f"prometheus: template variables resolve (instance={INSTANCE}, model={MODEL})")

queries = []
for p in walk(dash["panels"]):
    for t in p.get("targets", []):
        for label, values in (("selected", concrete), ("All", {"instance": ".*", "model": ".*", **BUILTINS})):
            queries.append((f"panel {p['id']} {p['title']!r} {t['refId']} [{label}]", substitute(t["expr"], values)))
leftover = [(w, q) for w, q in queries if "$" in q]
for w, q in leftover:
    failures.append(f"{w}: unsubstituted variable in {q}")

pending = [(w, q) for w, q in queries if "$" not in q]
results = {}
nan_seen = set()


def all_nan(result):
    return all(math.isnan(float(s["value"][1])) for s in result)


while pending:
    still = []
    for w, q in pending:
        data, err = api("/api/v1/query", query=q)
        if err:
            failures.append(f"{w}: {err}\n      {q}")
        elif not data["result"] or all_nan(data["result"]):
            if data["result"]:
                nan_seen.add(w)
            still.append((w, q))
        else:
            results[w] = data["result"]
    pending = still
    if pending and time.time() > deadline:
        for w, q in pending:
            why = "only NaN" if w in nan_seen else "no series"
            failures.append(f"{w}: {why} after {TIMEOUT:.0f} s\n      {q}")
        break
    if pending:
        time.sleep(1)

print(f"prometheus: {len(results)}/{len(queries)} panel queries returned series with a number")

# Alert rules: loaded from the shipped alerts.yml, evaluated at least once, healthy.
rules = []
while True:
    data, err = api("/api/v1/rules")
    if err:
        failures.append(f"/api/v1/rules: {err}")
        break
    rules = [r for g in data["groups"] for r in g["rules"]]
    if rules and all(r.get("lastEvaluation", "").startswith("0001") is False and r.get("health") != "unknown"
                     for r in rules):
        break
    if time.time() > deadline:
        failures.append("alert rules were not all evaluated in time")
        break
    time.sleep(1)
for r in rules:
    if r.get("health") != "ok":
        failures.append(f"rule {r.get('name')}: health {r.get('health')} {r.get('lastError')}")
    data, err = api("/api/v1/query", query=r["query"])
    if err:
        failures.append(f"rule {r.get('name')}: {err}")
alerts = [r for r in rules if r.get("type") == "alerting"]
firing = [r["name"] for r in alerts if r.get("state") == "firing"]
print(f"prometheus: {len(alerts)} alert rules evaluated with health ok; firing now: {firing or 'none'}")

if failures:
    print("prometheus check FAILED:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
