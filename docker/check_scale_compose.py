"""Checks the resolved scale-out compose files (docker/test.sh runs it; stdlib, plus PyYAML when present).

    python docker/check_scale_compose.py SCALE_CPU.json SCALE_GPU.json SCALE_GPUS.json

The arguments are `docker compose config --format json` of docker-compose.yml + docker-compose.cpu.yml +
docker-compose.scale.yml, of docker-compose.yml + docker-compose.scale.yml, and of that + docker-compose.gpus.yml.
Prints each problem; exit status 1 if there is one.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

DRAIN_S = 30  # the server's default --shutdown-timeout: a stop_grace_period must exceed it


def seconds(v: object) -> int:
    """A compose duration ("40s", "1m5s") in seconds."""
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", str(v)))


def devices(s: dict[str, Any]) -> list[dict[str, Any]]:
    return (s.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])


def check_scale(name: str, cfg: dict[str, Any]) -> list[str]:
    problems = []
    s, lb = cfg["services"]["server"], cfg["services"]["lb"]
    if s.get("ports"):
        problems.append(f"{name}: the replicas are published ({s['ports']}): only the LB should be")
    if (s.get("deploy") or {}).get("replicas") != 2:
        problems.append(f"{name}: server replicas {(s.get('deploy') or {}).get('replicas')}, want the default 2")
    if sorted(int(p["target"]) for p in lb.get("ports", [])) != [8080, 8404]:
        problems.append(f"{name}: the LB must publish 8080 (the API) and 8404 (stats page and metrics)")
    if lb.get("stop_signal") != "SIGUSR1" or seconds(lb.get("stop_grace_period")) <= 60:
        problems.append(f"{name}: lb needs stop_signal SIGUSR1 (soft stop) and a grace period above its 60 s")
    if lb["build"]["context"].rstrip("/").split("/")[-2:] != ["docker", "haproxy"]:
        problems.append(f"{name}: lb builds from {lb['build']['context']}, not docker/haproxy")
    if not any(v.get("source", "").endswith("docker/prometheus.scale.yml")
               for v in cfg["services"]["prometheus"]["volumes"]):
        problems.append(f"{name}: Prometheus does not read docker/prometheus.scale.yml")
    return problems


def check_gpus(cfg: dict[str, Any]) -> list[str]:
    problems = []
    replicas = {n: s for n, s in cfg["services"].items() if n == "server" or n.startswith("server-")}
    ids = [tuple(d.get("device_ids") or ()) for s in replicas.values() for d in devices(s)]
    if len(replicas) < 2 or len(ids) != len(replicas) or len(set(ids)) != len(ids) or any(len(i) != 1 for i in ids):
        problems.append(f"gpus: each replica needs its own single GPU by device id, got {ids}")
    for n, s in replicas.items():
        aliases = ((s.get("networks") or {}).get("default") or {}).get("aliases") or []
        if n != "server" and "server" not in aliases:
            problems.append(f"gpus: {n} lacks the network alias `server` (the LB and Prometheus find replicas by it)")
        if s.get("ports"):
            problems.append(f"gpus: {n} is published")
        if seconds(s.get("stop_grace_period", "10s")) <= DRAIN_S or not s.get("healthcheck"):
            problems.append(f"gpus: {n} needs the healthcheck and a stop_grace_period above the {DRAIN_S} s drain")
        if (s.get("deploy") or {}).get("replicas", 1) != 1:
            problems.append(f"gpus: {n} must be one container (one GPU each)")
        if s.get("environment", {}).get("TZD_DEVICE") != "cuda":
            problems.append(f"gpus: {n} does not serve with TZD_DEVICE=cuda")
    return problems


def check_prometheus(path: str = "docker/prometheus.scale.yml") -> list[str]:
    try:
        import yaml
    except ImportError:
        text = open(path).read()
        return [] if "dns_sd_configs" in text and "lb:8404" in text else [f"{path}: no DNS discovery or no LB job"]
    jobs = {j["job_name"]: j for j in yaml.safe_load(open(path))["scrape_configs"]}
    problems = []
    sd = jobs.get("tzd", {}).get("dns_sd_configs", [])
    if not any(c.get("names") == ["server"] and c.get("port") == 8000 and c.get("type") == "A" for c in sd):
        problems.append(f"{path}: the tzd job must find every replica (dns_sd_configs: server, type A, port 8000)")
    if not any("lb:8404" in t for c in jobs.get("tzd-lb", {}).get("static_configs", []) for t in c["targets"]):
        problems.append(f"{path}: the LB's metrics (lb:8404) are not scraped")
    return problems


def main(argv: list[str]) -> int:
    cpu, gpu, gpus = (json.load(open(p)) for p in argv[1:4])
    problems = check_scale("cpu", cpu) + check_scale("gpu", gpu) + check_gpus(gpus) + check_prometheus()
    if devices(cpu["services"]["server"]):
        problems.append("cpu: the replicas still reserve a GPU under the CPU override")
    if not devices(gpu["services"]["server"]):
        problems.append("gpu: the replicas lost their GPU reservation")
    print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
