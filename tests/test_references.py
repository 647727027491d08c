"""Every file a doc or a code comment points to exists: a path that starts with one of the
repository's top-level folders (docs/, tests/, ssd/, services/, kernels/, ...), written in any
tracked text file, resolves from the repository's root or from the folder of the file that names
it (helm/README.md says `ssd/values.yaml` for helm/ssd/values.yaml). A `::name` after a test
file and a `.{a,b}` alternative after a stem are read as such; globs and placeholders are not
paths."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("docs", "tests", "ssd", "services", "kernels", "protos", "helm", "k8s", "docker", "scripts", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*<>-]*[\w/*>])(\.\{[\w,]+\})?" % "|".join(map(re.escape, FOLDERS)))
TEXT = (".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt", ".proto")
# tokens shaped like paths that name something else, each with what it is
NOT_PATHS = {
    "helm/helm": "the helm binary inside the release archive (scripts/install_deploy_tools.sh)",
    "helm/kubectl": "'helm/kubectl binaries': two tools, not a path",
    "ssd/ar": "the report's ratio names (ssd/ar, ssd/sd)",
    "ssd/sd": "the report's ratio names",
    "ssd/__pycache__/x.pyc": "a file the docker-context test creates to see it excluded",
    "docker/dockerfile": "the Dockerfile syntax image (# syntax=docker/dockerfile:1)",
    "ssd/v1/ssd.proto": "relative to the proto import root protos/ (services/protos.py)",
}


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split() if (f.endswith(TEXT) or Path(f).name.startswith("Dockerfile"))
            and f != "tests/test_references.py"]  # this file names wrong paths on purpose


def _resolves(ref: str, alternatives: str | None, where: Path) -> bool:
    ref = ref.rstrip(".").split("::")[0]
    names = [ref + "." + a for a in alternatives[2:-1].split(",")] if alternatives else [ref]
    return all((ROOT / n).exists() or (where.parent / n).exists() for n in names)


def broken_references(files) -> list[str]:
    bad = []
    for f in files:
        for i, line in enumerate(f.read_text(errors="ignore").splitlines(), 1):
            for ref, alt in PATH.findall(line):
                if ref in NOT_PATHS or any(c in ref for c in "*<>$"):
                    continue
                if not _resolves(ref, alt, f):
                    bad.append(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}:{i}: {ref}{alt}")
    return bad


def test_every_path_named_in_docs_and_comments_exists():
    files = _tracked()
    assert len(files) > 100
    assert broken_references(files) == []


def test_a_wrong_path_is_caught(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("See docs/engine.md, tests/test_cli.py::test_x and docs/bench/channel/channel.{json,png};\n"
                   "docs/no-such-file.md and tests/test_cli.{py,nope} are wrong.\n")
    assert [b.split(": ", 1)[1] for b in broken_references([doc])] == ["docs/no-such-file.md", "tests/test_cli.{py,nope}"]
