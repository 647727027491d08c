"""gRPC stubs of protos/ssd/v1/*.proto, generated on first use (never committed).

The stubs are compiled with grpc_tools into a cache directory keyed by the hash of the .proto
sources, then imported from there: editing a .proto regenerates them, and an installed copy
of ssd never carries stale generated code. Import `ssd.services.protos.pb` / `pb_grpc`. Lives in services/: the core library never imports grpc.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_FILES = ("ssd/v1/ssd.proto",)


def _cache_dir(digest: str) -> Path:
    root = Path(os.environ.get("SSD_CACHE_DIR", Path.home() / ".cache" / "ssd"))
    return root / "protos" / digest


def generate(out: Path | None = None) -> Path:
    """Compile the protos (idempotent). Returns the directory to put on sys.path."""
    from grpc_tools import protoc

    sources = [PROTO_ROOT / f for f in PROTO_FILES]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out = out or _cache_dir(digest)
    if (out / "ssd_pb" / "v1" / "ssd_pb2_grpc.py").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".protos-", dir=out.parent))
    # the generated package is "ssd_pb" (not "ssd") so it cannot shadow this package
    staging = tmp / "src" / "ssd_pb" / "v1"
    staging.mkdir(parents=True)
    for p in sources:
        (staging / p.name).write_text(p.read_text())
    args = ["grpc_tools.protoc", f"-I{tmp / 'src'}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
    args += [str(Path("ssd_pb") / "v1" / p.name) for p in sources]
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args.insert(1, f"-I{include}")
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}")
    for d in (tmp / "ssd_pb", tmp / "ssd_pb" / "v1"):
        (d / "__init__.py").touch()
    import shutil

    shutil.rmtree(tmp / "src")
    try:
        tmp.rename(out)
    except OSError:  # a concurrent process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load():
    path = str(generate())
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("ssd_pb.v1.ssd_pb2"), importlib.import_module("ssd_pb.v1.ssd_pb2_grpc")


pb, pb_grpc = load()
