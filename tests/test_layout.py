"""The repository's top-level folders (kernels/, services/, protos/: installed as ssd.kernels,
ssd.services, ssd.protos) never shadow an installed package of the same name, even in a process
whose sys.path starts with the repository root (`python -m ...` / `python -c ...` from a
checkout): transformers imports Hugging Face's `kernels`, and a shadowing folder stopped every
import of transformers there."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folders the installed distribution maps under ssd (pyproject.toml's package-dir)
MAPPED = ("kernels", "services", "protos")


def _run_in_root(code: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_top_level_folders_defer_to_installed_packages(tmp_path):
    for name in MAPPED:  # stand-ins for installed packages of those names
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = textwrap.dedent("""
        import sys
        assert sys.path[0] == '', sys.path[:2]  # the repository root comes first, as with python -m
        import kernels, services, protos
        import ssd.kernels.rejection, ssd.services.convert
        print(kernels.WHO, services.WHO, protos.WHO, ssd.kernels.rejection.__name__, sep=';')
    """)
    r = _run_in_root(code, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "installed kernels;installed services;installed protos;ssd.kernels.rejection"


def test_without_an_installed_package_the_import_fails_clearly():
    r = _run_in_root("import services")  # no package of that name is installed
    assert r.returncode != 0
    assert "ModuleNotFoundError" in r.stderr and "ssd.services" in r.stderr, r.stderr


def test_transformers_imports_from_the_repository_root():
    r = _run_in_root("import transformers.activations, kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not r.stdout.strip().startswith(str(ROOT / "kernels"))


def test_every_regular_top_level_package_defers():
    """A new top-level folder with an __init__.py must defer too (or be ssd itself / tests)."""
    for d in sorted(ROOT.iterdir()):
        init = d / "__init__.py"
        if d.name in ("ssd", "tests") or not init.exists():
            continue
        assert "defer_to_installed(__name__, __file__)" in init.read_text(), f"{d.name}/__init__.py may shadow an installed package"
