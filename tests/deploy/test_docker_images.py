"""docker/Dockerfile.{cpu,cuda} and .dockerignore, checked without a Docker engine: every COPY
source exists in the repository and reaches the build context, the images are multi-stage and
non-root, and ENTRYPOINT + CMD form a real `ssd` command line."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pytest
from deploy_support import ROOT

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule set closely enough for this tree: a path is excluded when it or a parent
    matches a pattern ('**' spans directories); later '!' patterns re-include."""
    parts = rel.split("/")
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if fnmatch.fnmatch(sub, p) or (p.startswith("**/") and fnmatch.fnmatch(sub.split("/")[-1], p[3:])):
                result = not neg
                break
    return result


def test_there_are_cpu_and_cuda_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(path):
    patterns = dockerignore_patterns()
    copies = 0
    for word, rest in instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        assert word == "COPY", "use COPY, not ADD"
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        if "--from=" in rest:
            continue  # from another stage
        *sources, _dest = args
        for src in sources:
            copies += 1
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
            assert not ignored(src.rstrip("/"), patterns), f"{path.name}: COPY {src} is excluded by .dockerignore"
    assert copies >= 5


def test_dockerignore_keeps_what_the_package_needs():
    patterns = dockerignore_patterns()
    for needed in ("pyproject.toml", "README.md", "ssd/cli.py", "services/protos.py", "protos/ssd/v1/ssd.proto",
                   "kernels/attention.py", "ssd/data/drafts/smollm2-135m-draft-l2/model.safetensors"):
        assert (ROOT / needed).exists(), needed
        assert not ignored(needed, patterns), needed
    for dropped in (".git", "tests/test_cli.py", "ssd/__pycache__/x.pyc", "bench-results/a.json"):
        assert ignored(dropped, patterns), dropped


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_and_non_root(path):
    ins = instructions(path)
    froms = [rest for w, rest in ins if w == "FROM"]
    assert len(froms) >= 2 and " AS build" in froms[0] and " AS runtime" in froms[-1]
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    users = [rest for w, rest in ins[last_from:] if w == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "the final stage runs as uid 10001 (the chart's runAsUser)"
    text = path.read_text()
    assert 'pip install -e "/opt/ssd[serve,k8s]"' in text or 'pip install -e "/opt/ssd[serve,k8s,gpu]"' in text, \
        "editable install with the services' extras: services/protos.py reads protos/ from the source tree"
    assert "default_target_path" in text and "generate()" in text, "model and stubs pre-built into the image"
    assert re.search(r'torch==\$\{TORCH_VERSION\}', text) and "ARG TORCH_VERSION=2.13.0" in text
    # no package index or registry host is spelled out: indexes come in as build args
    assert not re.search(r"https?://", "\n".join(rest for _, rest in ins)), "no URLs in instructions"


def test_cuda_image_has_flash_attn():
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert "nvidia/cuda:" in text and "devel" in text and "runtime" in text
    assert "flash-attn==" in text and "import flash_attn" in text


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), "exec form (JSON array)"
    return value


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_and_cmd_are_a_real_cli_command(path, monkeypatch):
    ins = instructions(path)
    entry = _exec_form([rest for w, rest in ins if w == "ENTRYPOINT"][-1])
    cmd = _exec_form([rest for w, rest in ins if w == "CMD"][-1])
    assert entry == ["ssd"], "one image, the role is the first argument"
    # `ssd` is the console script of pyproject.toml
    assert 'ssd = "ssd.cli:main"' in (ROOT / "pyproject.toml").read_text()
    import ssd.cli
    import ssd.services.run as run

    seen = []
    monkeypatch.setattr(run, "run_role", lambda ns, cfg: seen.append(ns) or 0)
    try:
        assert ssd.cli.main(cmd) == 0
    except SystemExit as e:
        pytest.fail(f"`ssd {' '.join(cmd)}` does not parse (exit {e.code})")
    assert seen and seen[0].cmd == "service" and seen[0].host == "0.0.0.0"
