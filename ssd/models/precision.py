"""Which dtype a model runs in: `--dtype auto|bfloat16|float32`.

`auto` picks bf16 where the hardware computes it natively (CUDA with bf16 support; a CPU with
AVX-512 BF16 or AMX-BF16, or Arm's BF16 extension) and fp32 elsewhere: on a CPU without those
instructions oneDNN emulates bf16 and it is slower than fp32 (measured in
docs/results/benchmarks-journal-to-2026-12-05.md, "Numerics").
The KV cache is kept in the model's dtype.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ssd.config import DTYPES
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX, Arm FEAT_BF16


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(val.split())
    return flags


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    return bool(cpu_flags(cpuinfo) & _NATIVE_BF16_FLAGS)


def resolve_dtype(name: str, device: str = "cpu", cpuinfo: str | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for a --dtype value on a device."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name != "auto":
        return getattr(torch, name), "requested"
    if str(device).startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA device with bf16"
        return torch.float32, "auto: CUDA device without bf16"
    if cpu_has_native_bf16(cpuinfo):
        return torch.bfloat16, "auto: CPU has native bf16 (AVX-512 BF16 / AMX / Arm BF16)"
    return torch.float32, "auto: CPU without native bf16 instructions (bf16 would be emulated, slower)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
