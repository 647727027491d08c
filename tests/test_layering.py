"""The core library imports neither grpc nor redis (services are thin adapters over it)."""
import subprocess
import sys

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
