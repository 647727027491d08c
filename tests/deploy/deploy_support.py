"""Shared constants and object helpers of tests/deploy (a uniquely named module, so test files
import it unambiguously next to the other conftest.py files of the suite)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ssd"
K8S_VERSION = "1.35.0"
RELEASE = "ssd"
NAMESPACE = "ssd"
# Custom resources: their CRD schemas are not in kubernetes-validate's bundle, so they are
# checked by the Python assertions only. Anything else without a schema is an error.
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


# ---- object helpers ---------------------------------------------------------------------------
def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    objs = by_kind(docs, kind)
    assert name in objs, f"no {kind}/{name}; have {sorted(objs)}"
    return objs[name]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """(kind/name) -> pod spec of every workload and bare pod."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            out[f"Pod/{d['metadata']['name']}"] = d["spec"]
    return out


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
