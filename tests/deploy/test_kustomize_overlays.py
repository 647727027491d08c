"""k8s/: the kustomize base is the chart's default render (kept in sync by k8s/render_base.py),
the cpu and gpu overlays build, validate against the Kubernetes 1.35 schemas, and equal the
chart rendered with the same choices."""
from __future__ import annotations

import copy
import importlib.util
import subprocess

import pytest
import yaml
from deploy_support import ROOT, by_kind

K8S = ROOT / "k8s"


def _render_base_module():
    spec = importlib.util.spec_from_file_location("ssd_k8s_render_base", K8S / "render_base.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(kubectl: str, path) -> list[dict]:
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def normalize(docs: list[dict]) -> dict[tuple[str, str], dict]:
    """Compare chart and kustomize output without the metadata each tool adds."""
    out = {}
    for d in docs:
        d = copy.deepcopy(d)
        meta = d["metadata"]
        if "helm.sh/hook" in meta.get("annotations", {}):
            continue
        meta.pop("namespace", None)
        labels = meta.get("labels", {})
        labels.pop("helm.sh/chart", None)
        labels.pop("app.kubernetes.io/managed-by", None)
        out[(d["kind"], meta["name"])] = d
    return out


@pytest.fixture(scope="module")
def overlays(kubectl):
    return {name: build(kubectl, K8S / "overlays" / name) for name in ("cpu", "gpu")} | {"base": build(kubectl, K8S / "base")}


def test_base_is_in_sync_with_the_chart(helm):
    """k8s/base is exactly what k8s/render_base.py writes from the chart's defaults now."""
    mod = _render_base_module()
    expected = mod.write_base(mod.render_chart(helm))
    on_disk = {p.name: p.read_text() for p in (K8S / "base").glob("*.yaml")}
    assert set(on_disk) == set(expected), "files differ: run python k8s/render_base.py"
    stale = [name for name in expected if on_disk[name] != expected[name]]
    assert not stale, f"k8s/base is stale ({stale}): run python k8s/render_base.py"


@pytest.mark.parametrize("name", ["base", "cpu", "gpu"])
def test_overlay_validates(overlays, validate, name):
    docs = overlays[name]
    assert validate(docs) == []
    assert all(d["metadata"].get("namespace") == "ssd" for d in docs)
    rb = by_kind(docs, "RoleBinding")["ssd-gateway-discovery"]
    assert rb["subjects"][0]["namespace"] == "ssd"
    assert not by_kind(docs, "Pod"), "no helm test hook in plain manifests"


@pytest.mark.parametrize("overlay, sets", [("cpu", ()), ("gpu", ("gpu.enabled=true",))])
def test_overlay_equals_the_chart(overlays, render, overlay, sets):
    chart = normalize(render(*sets))
    kust = normalize(overlays[overlay])
    assert set(chart) == set(kust)
    for key in chart:
        assert kust[key] == chart[key], f"{overlay} overlay differs from the chart ({' '.join(sets)}) in {key}"


def test_gpu_overlay_requests_gpus(overlays):
    deps = by_kind(overlays["gpu"], "Deployment")
    for role in ("target", "draft"):
        c = next(c for c in deps[f"ssd-{role}"]["spec"]["template"]["spec"]["containers"] if c["name"] == role)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"] == "ssd-serve:0.1.0-cuda"
    assert "nvidia.com/gpu" not in str(by_kind(overlays["cpu"], "Deployment"))


def test_namespace_recipe_retargets_the_role_binding(kubectl, tmp_path):
    """The overlay docs/kubernetes.md gives for another namespace moves every object and the
    RoleBinding's subject."""
    import shutil

    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    ov = tmp_path / "k8s" / "overlays" / "mine"
    ov.mkdir()
    (ov / "kustomization.yaml").write_text("""resources: [../cpu]
transformers:
  - |-
    apiVersion: builtin
    kind: NamespaceTransformer
    metadata: {name: namespace, namespace: my-namespace}
    setRoleBindingSubjects: allServiceAccounts
    unsetOnly: false
""")
    docs = build(kubectl, ov)
    assert {d["metadata"]["namespace"] for d in docs} == {"my-namespace"}
    rb = by_kind(docs, "RoleBinding")["ssd-gateway-discovery"]
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "ssd-gateway", "namespace": "my-namespace"}]
