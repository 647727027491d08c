"""Row-invariant linear layers: a token's output row does not depend on how many rows share the call.

Why: MKL's fp32 `F.linear` picks its kernel by the number of rows M (a GEMV for M = 1, small-M
GEMMs, blocked GEMMs), and those kernels sum over the input features in different orders, so the
same token gets different low bits alone (an AR step) and inside a K+1-row verify block. Measured
on this project's CPU machines (see docs/batch-invariance.md): fp32 `F.linear` disagrees with
itself for M in 1..15 at one thread and for most M at two threads; bf16 `F.linear` for some M at
two threads.

oneDNN's matmul over a weight reordered once into its blocked layout (`_reorder_linear_weight` +
`_linear_pointwise`, the pair PyTorch's own CPU inductor uses for frozen linears) computes every
row with the same kernel whatever M is; on the same machines it was bitwise row-invariant for
M = 2..400, rows at any position, at one and two threads, in fp32 and bf16; M = 1 takes another
kernel for some shapes, so a single row is padded to two. On a Xeon with AMX the bf16 kernel
changes again above 32 rows (some rows' bits differ from M = 33 on), so every call takes at most
MAX_ROWS = 32 rows and longer inputs are split. Its M = 5 costs ~1.05x its M = 2, where
MKL's fp32 `F.linear` costs ~2x its GEMV. `probe_row_invariance` re-checks that on
the machine at hand, for the shapes of the model being served, so the engine never claims an
exactness it did not measure.

Elsewhere (CUDA, or a PyTorch without oneDNN) `linear` is `F.linear`: cuBLAS picks kernels by
shape too, and whether a shape is invariant is whatever the probe measures there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quant import QuantWeight

_PACK_DTYPES = (torch.float32, torch.bfloat16)
MIN_ROWS = 2  # oneDNN's M = 1 kernel sums in another order (measured: the K = 1536 down projection)
# On CPUs with AMX, oneDNN's bf16 matmul changes kernel above 32 rows (measured on a Xeon with AMX:
# every model shape, 1 and 2 threads, rows bitwise equal for M = 2..32, some differ from M = 33),
# so longer inputs go through in calls of at most MAX_ROWS rows.
MAX_ROWS = 32


_BF16_PACKING: list = []  # probed once: [bool]


def bf16_packing_supported() -> bool:
    """oneDNN packs bf16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; on
    others (an AVX2-only CPU) the reorder raises. Probed once with a tiny weight."""
    if not _BF16_PACKING:
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(2, 2, dtype=torch.bfloat16))
            _BF16_PACKING.append(True)
        except (RuntimeError, AttributeError):
            _BF16_PACKING.append(False)
    return _BF16_PACKING[0]


def packing_available(weight: torch.Tensor) -> bool:
    """The row-invariant oneDNN path takes this weight: a 2-D CPU fp32 weight, or bf16 where the
    CPU can pack bf16 (elsewhere bf16 goes through F.linear, and the start-up invariance probe
    says the kernels are not invariant)."""
    return (weight.device.type == "cpu" and weight.dtype in _PACK_DTYPES and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and (weight.dtype != torch.bfloat16 or bf16_packing_supported()))


class PackedWeight:
    """A weight reordered for oneDNN, remembering which tensor (and which version of it) it came
    from so a weight replaced or edited in place is re-packed instead of silently going stale."""

    __slots__ = ("src", "version", "ptr", "packed")

    def __init__(self, weight: torch.Tensor):
        self.src = weight
        self.version = weight._version
        self.ptr = weight.data_ptr()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def fresh_for(self, weight: torch.Tensor) -> bool:
        return self.src is weight and self.version == weight._version and self.ptr == weight.data_ptr()


class LinearPacks:
    """Per-model cache of packed weights, keyed by a name the model chooses."""

    def __init__(self):
        self._packs: dict[str, PackedWeight] = {}

    def get(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        if not packing_available(weight):
            return None
        p = self._packs.get(name)
        if p is None or not p.fresh_for(weight):
            p = self._packs[name] = PackedWeight(weight)
        return p.packed

    def clear(self) -> None:
        self._packs.clear()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           packs: LinearPacks | None = None, name: str = "", invariant: bool = True) -> torch.Tensor:
    """x [..., in] -> [..., out]. With `invariant` and a CPU fp32/bf16 weight, the oneDNN path
    (row-invariant); otherwise F.linear. A QuantWeight (kernels/quant.py) runs its own kernel, which
    is row-invariant by construction."""
    if isinstance(weight, QuantWeight):
        return weight.matmul(x, bias)
    if invariant and packs is not None and x.dtype == weight.dtype:
        packed = packs.get(name, weight)
        if packed is not None:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            parts = [_packed_rows(x2[s:s + MAX_ROWS], packed, bias) for s in range(0, x2.shape[0], MAX_ROWS)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            return out.view(*lead, out.shape[-1])
    return F.linear(x, weight, bias)


def _packed_rows(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One oneDNN call over MIN_ROWS..MAX_ROWS rows (a single row is padded to MIN_ROWS: it would
    take a GEMV-like kernel with its own summation order)."""
    m = x2.shape[0]
    if m < MIN_ROWS:
        x2 = torch.cat([x2, x2.new_zeros(MIN_ROWS - m, x2.shape[1])])
    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")[:m]


def probe_row_invariance(weights: list[torch.Tensor], rows: tuple[int, ...], *, invariant: bool = True,
                         seed: int = 0) -> list[str]:
    """Measure whether `linear` gives a row the same bits for every row count in `rows`, with the
    row at varying positions. Returns human-readable failures (empty = invariant here)."""
    g = torch.Generator().manual_seed(seed)
    failures = []
    for i, w in enumerate(weights):
        packs = LinearPacks()
        probe = (torch.randn(4, w.shape[1], generator=g) * 0.5).to(w.dtype).to(w.device)
        ref = None
        for m in rows:
            x = (torch.randn(m, w.shape[1], generator=g) * 0.5).to(w.dtype).to(w.device)
            pos = [min(m - 1, j * max(1, m // 4)) for j in range(min(m, 4))]
            for j, p in enumerate(pos):
                x[p] = probe[j]
            y = linear(x, w, packs=packs, name="w", invariant=invariant)
            got = torch.stack([y[p] for p in pos])
            if ref is None:
                ref = got
            n = min(len(ref), len(got))
            if not torch.equal(ref[:n], got[:n]):
                failures.append(f"weight {i} {tuple(w.shape)} {w.dtype}: rows differ at M={m}")
                break
            if len(got) > len(ref):
                ref = got
    return failures


def envelope_rows(max_rows: int) -> tuple[int, ...]:
    """Row counts worth probing up to max_rows: every count up to 16, then a geometric ladder."""
    out = list(range(1, min(16, max_rows) + 1))
    m = 16
    while m < max_rows:
        m = min(max_rows, int(math.ceil(m * 1.7)))
        out.append(m)
    return tuple(out)
