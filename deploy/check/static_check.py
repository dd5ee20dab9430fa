"""Structural checks of deploy/ that need no Docker engine, Grafana or cluster.

Usage: static_check.py DEPLOY_DIR

- the dashboard JSON: schemaVersion, uid, unique panel ids, gridPos, every datasource reference
  resolving to the provisioned datasource uid, targets with refIds and expressions, the
  `instance` and `model` template variables;
- Grafana provisioning: the datasource points at the compose service `prometheus` on its port,
  the dashboard provider's path is where compose mounts deploy/grafana/dashboards;
- docker-compose.yml: services, ports, named volumes, bind-mount sources that exist, the GPU
  reservation, the scrape target matching the fitprune service and port;
- the Dockerfiles: multi-stage, non-root USER, EXPOSE 8080, HEALTHCHECK on /health, VOLUMEs;
- deploy/k8s: Deployment/Service/PVC wiring (ports, probes, PVC names, GPU limit, annotations).
"""

import json
import os
import re
import sys

import yaml

DEPLOY = sys.argv[1]
errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def load_yaml(rel, many=False):
    with open(os.path.join(DEPLOY, rel)) as f:
        return list(yaml.safe_load_all(f)) if many else yaml.safe_load(f)


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


# Grafana provisioning.
ds_file = load_yaml("grafana/provisioning/datasources/prometheus.yml")
check(ds_file.get("apiVersion") == 1, "datasource provisioning: apiVersion must be 1")
datasources = ds_file.get("datasources", [])
check(len(datasources) == 1, "datasource provisioning: exactly one datasource expected")
ds = datasources[0]
DS_UID = ds.get("uid")
check(ds.get("type") == "prometheus" and DS_UID, "datasource: type prometheus with a uid")
check(ds.get("url") == "http://prometheus:9090", f"datasource url {ds.get('url')!r} is not the compose service")
prov = load_yaml("grafana/provisioning/dashboards/fitprune.yml")
check(prov.get("apiVersion") == 1, "dashboard provisioning: apiVersion must be 1")
providers = prov.get("providers", [])
check(len(providers) == 1 and providers[0].get("type") == "file", "dashboard provisioning: one file provider")
provider_path = providers[0].get("options", {}).get("path")

# The dashboard.
with open(os.path.join(DEPLOY, "grafana/dashboards/fitprune.json")) as f:
    dash = json.load(f)
check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36,
      f"schemaVersion {dash.get('schemaVersion')!r} (Grafana 9+ expected)")
check(dash.get("uid") and len(dash["uid"]) <= 40, "dashboard uid missing or longer than 40")
check(dash.get("title"), "dashboard title missing")
check("id" not in dash or dash["id"] is None, "provisioned dashboards must not carry a numeric id")


def check_ds(ref, where):
    if ref is None:
        return
    if isinstance(ref, str):
        check(ref in (DS_UID, ds.get("name")), f"{where}: datasource {ref!r} is not provisioned")
        return
    if ref.get("type") == "grafana" or ref.get("uid") == "-- Grafana --":
        return
    check(ref.get("uid") == DS_UID, f"{where}: datasource uid {ref.get('uid')!r} != provisioned {DS_UID!r}")
    check(ref.get("type") == "prometheus", f"{where}: datasource type {ref.get('type')!r}")


ids = [p.get("id") for p in walk_panels(dash["panels"])]
check(all(isinstance(i, int) for i in ids), "every panel needs an integer id")
check(len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}")
titles = set()
n_targets = 0
for p in walk_panels(dash["panels"]):
    where = f"panel {p.get('id')} {p.get('title')!r}"
    check(p.get("title"), f"{where}: no title")
    gp = p.get("gridPos", {})
    check(all(isinstance(gp.get(k), int) for k in "hwxy") and gp["x"] + gp["w"] <= 24, f"{where}: bad gridPos {gp}")
    if p.get("type") == "row":
        continue
    check((p.get("title"), gp.get("y")) not in titles, f"{where}: duplicate title in the same row")
    titles.add((p.get("title"), gp.get("y")))
    check_ds(p.get("datasource"), where)
    targets = p.get("targets", [])
    check(targets, f"{where}: no targets")
    refs = [t.get("refId") for t in targets]
    check(len(refs) == len(set(refs)) and all(refs), f"{where}: refIds must be unique and set")
    for t in targets:
        check_ds(t.get("datasource"), f"{where} target {t.get('refId')}")
        check(t.get("expr"), f"{where} target {t.get('refId')}: no expr")
        n_targets += 1
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
for name in ("instance", "model"):
    v = variables.get(name)
    if check(v, f"template variable ${name} missing"):
        check_ds(v.get("datasource"), f"variable {name}")
        check(v.get("type") == "query", f"variable {name}: type query expected")
used = set(re.findall(r"\$(\w+)", json.dumps([t["expr"] for p in walk_panels(dash["panels"]) for t in p.get("targets", [])])))
builtin = {"__rate_interval", "__range", "__interval"}
check(used - builtin <= set(variables), f"expressions use undefined variables: {used - builtin - set(variables)}")
check({"instance", "model"} <= used, "panels must be templated on $instance and $model")

# docker-compose.yml.
compose = load_yaml("docker-compose.yml")
services = compose.get("services", {})
check(set(services) == {"fitprune", "prometheus", "grafana"}, f"compose services: {sorted(services)}")
named_volumes = set((compose.get("volumes") or {}).keys())


def mounts(svc):
    out = []
    for v in services[svc].get("volumes", []):
        src, dst = v.split(":")[:2]
        out.append((src, dst))
        if src.startswith("."):
            check(os.path.exists(os.path.join(DEPLOY, src)), f"compose {svc}: bind source {src} does not exist")
        else:
            check(src in named_volumes, f"compose {svc}: volume {src} is not declared")
    return dict((dst, src) for src, dst in out)


def container_ports(svc):
    return {str(p).rsplit(":", 1)[-1] for p in services[svc].get("ports", [])}


fp = services.get("fitprune", {})
fp_mounts = mounts("fitprune")
check("/data" in fp_mounts and "/cache" in fp_mounts, "compose fitprune: /data and /cache volumes expected")
check("8080" in container_ports("fitprune"), "compose fitprune: container port 8080 not published")
check(fp.get("build", {}).get("dockerfile") == "deploy/Dockerfile" and fp["build"].get("context") == "..",
      "compose fitprune: build deploy/Dockerfile with the repository root as context")
devices = fp.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
check(any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices),
      "compose fitprune: GPU reservation missing")
env = fp.get("environment", {})
check(isinstance(env, dict), "compose fitprune: environment as a map")
check("${FITPRUNE_MODEL" in str(env.get("FITPRUNE_MODEL")), "compose fitprune: FITPRUNE_MODEL must come from the environment")
check("FITPRUNE_ADMIN_TOKEN" in env and env["FITPRUNE_ADMIN_TOKEN"] is None,
      "compose fitprune: FITPRUNE_ADMIN_TOKEN must be passed through from the environment (no value)")
for key, value in env.items():
    # fitprune refuses empty values (clap parses them): an empty default would break the start.
    check(value is None or not re.search(r"\$\{\w+:?-\}", str(value)) and str(value) != "",
          f"compose fitprune: {key} has an empty default; pass it through without a value instead")
prom = services.get("prometheus", {})
prom_mounts = mounts("prometheus")
check(prom_mounts.get("/etc/prometheus/prometheus.yml") == "./prometheus/prometheus.yml", "compose prometheus: config mount")
check(prom_mounts.get("/etc/prometheus/alerts.yml") == "./prometheus/alerts.yml", "compose prometheus: alerts mount")
check("9090" in container_ports("prometheus"), "compose prometheus: port 9090")
check("--config.file=/etc/prometheus/prometheus.yml" in prom.get("command", []), "compose prometheus: --config.file")
graf = services.get("grafana", {})
graf_mounts = mounts("grafana")
check(graf_mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning", "compose grafana: provisioning mount")
check(graf_mounts.get(provider_path) == "./grafana/dashboards",
      f"compose grafana: dashboards must be mounted at the provider path {provider_path}")
genv = graf.get("environment", {})
check(str(genv.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() == "false", "compose grafana: anonymous access must be off")
check("${" in str(genv.get("GF_SECURITY_ADMIN_PASSWORD", "")), "compose grafana: admin password from the environment")
check("3000" in container_ports("grafana"), "compose grafana: port 3000")

# Prometheus scrape config matches the compose service.
pcfg = load_yaml("prometheus/prometheus.yml")
jobs = {j["job_name"]: j for j in pcfg.get("scrape_configs", [])}
if check("fitprune" in jobs, "prometheus.yml: job fitprune missing"):
    targets = [t for sc in jobs["fitprune"].get("static_configs", []) for t in sc.get("targets", [])]
    check(targets == ["fitprune:8080"], f"prometheus.yml: fitprune targets {targets}")
    check(jobs["fitprune"].get("scrape_interval") == "5s", "prometheus.yml: fitprune scraped every 5s")
check(pcfg.get("rule_files") == ["alerts.yml"], "prometheus.yml: rule_files [alerts.yml]")

# Dockerfiles (no hadolint here: the rules that matter to this deployment).
for name, base in (("Dockerfile", "nvidia/cuda:"), ("Dockerfile.cpu", "")):
    with open(os.path.join(DEPLOY, name)) as f:
        text = f.read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    check(len(froms) >= 2, f"{name}: multi-stage build expected")
    if base:
        check(all(base in l for l in froms), f"{name}: stages must build on {base}")
        check("-devel-" in froms[0] and "-runtime-" in froms[-1], f"{name}: devel builder, runtime final stage")
        check("--features cuda" in text and "ARG CUDA_COMPUTE_CAP" in text, f"{name}: cuda feature and CUDA_COMPUTE_CAP")
    final = lines[lines.index(froms[-1]):]
    users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
    check(users and users[-1] not in ("root", "0"), f"{name}: final stage must run as a non-root USER")
    check("EXPOSE 8080" in final, f"{name}: EXPOSE 8080")
    check(any(l.startswith("HEALTHCHECK") and "/health" in l for l in final), f"{name}: HEALTHCHECK on /health")
    check(any(l.startswith("VOLUME") and "/data" in l and "/cache" in l for l in final), f"{name}: VOLUME /data /cache")
    check(any(l.startswith("COPY --from=") for l in final), f"{name}: final stage copies only the binary")
    check(os.path.exists(os.path.join(DEPLOY, name + ".dockerignore")), f"{name}.dockerignore missing")

# Kubernetes.
docs = []
for fname in sorted(os.listdir(os.path.join(DEPLOY, "k8s"))):
    if fname.endswith(".yaml"):
        docs += [(fname, d) for d in load_yaml("k8s/" + fname, many=True) if d]
by_kind = {}
for fname, d in docs:
    check(d.get("apiVersion") and d.get("kind"), f"k8s/{fname}: apiVersion and kind required")
    by_kind.setdefault(d["kind"], []).append(d)
kust = by_kind.get("Kustomization", [{}])[0]
for res in kust.get("resources", []):
    check(os.path.exists(os.path.join(DEPLOY, "k8s", res)), f"kustomization: {res} missing")
pvcs = {d["metadata"]["name"] for d in by_kind.get("PersistentVolumeClaim", [])}
dep = by_kind.get("Deployment", [None])[0]
if check(dep, "k8s: a Deployment is required"):
    spec = dep["spec"]
    tmpl = spec["template"]
    check(spec["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items(), "k8s: selector/labels mismatch")
    ann = tmpl["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "8080"
          and ann.get("prometheus.io/path") == "/metrics", "k8s: pod scrape annotations")
    c = tmpl["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("http") == 8080, "k8s: container port http 8080")
    check(str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1", "k8s: one GPU per replica")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        hg = c.get(probe, {}).get("httpGet", {})
        check(hg.get("path") == "/health" and hg.get("port") in ("http", 8080), f"k8s: {probe} on /health")
    vols = {v["name"]: v for v in tmpl["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = vols.get(m["name"])
        if check(v, f"k8s: volumeMount {m['name']} has no volume"):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            check(claim is None or claim in pvcs, f"k8s: PVC {claim} not defined")
    mounted = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    check("/data" in mounted and "persistentVolumeClaim" in vols[mounted["/data"]], "k8s: /data on a PVC")
    envs = {e["name"]: e for e in c.get("env", [])}
    check(envs.get("FITPRUNE_DATABASE_URL", {}).get("value", "").startswith("sqlite:///data/"), "k8s: database on /data")
    check(envs.get("FITPRUNE_ADDR", {}).get("value", "").endswith(":8080"), "k8s: FITPRUNE_ADDR on 8080")
    check("secretKeyRef" in envs.get("FITPRUNE_ADMIN_TOKEN", {}).get("valueFrom", {}), "k8s: admin token from a Secret")
    check(spec.get("replicas") == 1, "k8s: one replica (one GPU, one SQLite database)")
svc = by_kind.get("Service", [None])[0]
if check(svc, "k8s: a Service is required") and dep:
    check(svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
          "k8s: Service selector does not match the pods")
    sp = svc["spec"]["ports"][0]
    check(sp.get("targetPort") in ("http", 8080) and sp.get("port") == 8080, "k8s: Service port 8080 -> http")

if errors:
    print("static check FAILED:", *errors, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"static check: ok ({len(ids)} panels, {n_targets} targets, {len(services)} compose services, "
      f"{len(docs)} k8s documents)")
