"""Weight-only quantized linear layers: a GGUF file's own 4-bit and 8-bit blocks, run natively.

A `QuantWeight` holds one linear layer's weight as GGUF blocks of 32 weights (one row of blocks
per output feature):
  q4_1  {fp16 d, fp16 min, 16 bytes of 4-bit q}: w = d * q + min   (the default target's layers)
  q8_0  {fp16 d, 32 int8 q}:                     w = d * q         (its tied embedding and head;
                                                                    `--weights int8` for any model)
`linear` (kernels/linear.py) hands such a weight to the C++ kernels: csrc/quant_linear.cpp
multiplies the activations as they are (bf16 or fp32, widened exactly to fp32; every weight the
file's own number, dequantized in registers, never stored; products summed in fp32), and
csrc/vnni_linear.cpp multiplies 8-bit activations (each row quantized per block of 32 on its own
scale) by the file's integer q with exact integer sums (`choose_layout`, `--activations`). Each
kernel computes each output element with one instruction sequence whatever the number of rows
in the call, so a token gets the same bits alone, in a verify block or in a batch (the property
the engines' exactness rests on; the start-up probe re-measures it).

The extension is compiled with the machine's C++ compiler on first use (`build()`, which
scripts/install.sh calls) into the cache directory; it needs AVX-512 (F, BW, VL) and F16C. Where
either the compiler or those instructions are missing, `available()` says why and the loader
keeps dense weights.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

QK = 32  # weights per block
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
KINDS = tuple(BLOCK_BYTES)
NATIVE = "ssd_native"  # one extension: csrc/native.h lists what it holds
_SOURCES = tuple(Path(__file__).parent / "csrc" / f
                 for f in ("quant_linear.cpp", "vnni_linear.cpp", "layer_ops.cpp", "bindings.cpp"))
_NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "f16c", "fma")
PANEL = 16  # output columns per panel (the bf16 layout)
PANEL_BYTES = {"q4_1": 320, "q8_0": 544}  # one panel x one block of 32 inputs
VNNI_BYTES = {"q4_1": 320, "q8_0": 544}  # the same, in the 8-bit-activation layout (csrc/vnni_linear.cpp)
LAYOUTS = ("blocks", "panels", "vnni")
# the layouts a whole decoder layer runs natively on, and layer_forward's code for each weight kind
# (csrc/layer_ops.cpp)
NATIVE_KINDS = {"panels": {"q4_1": 0, "q8_0": 1}, "vnni": {"q4_1": 2, "q8_0": 3}}
ACTIVATIONS = ("auto", "int8", "bf16")  # ssd/config.py EngineConfig.activations


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _cache_dir() -> Path:
    root = Path(os.environ.get("SSD_CACHE_DIR", Path.home() / ".cache" / "ssd"))
    return root / "kernels" / f"torch-{torch.__version__.replace('+', '-')}"


_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-mfma", "-mavx512bf16", "-ffp-contract=off",
          "-fopenmp"]
_BUILT: dict = {}  # extension name -> (module or None, why not)


def compile_extension(name: str, sources, verbose: bool = False):
    """Compile (or load the already compiled) C++ extension `name` from `sources`, once per
    process. Returns (module, "") or (None, why not)."""
    if name not in _BUILT:
        missing = [f for f in _NEEDED_FLAGS if f not in _cpu_flags()]
        if missing:
            _BUILT[name] = (None, f"this CPU lacks {', '.join(missing)}")
            return _BUILT[name]
        try:
            from torch.utils.cpp_extension import load

            out = _cache_dir() / name
            out.mkdir(parents=True, exist_ok=True)
            mod = load(name=name, sources=[str(p) for p in sources], build_directory=str(out), verbose=verbose,
                       extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
            _BUILT[name] = (mod, "")
        except Exception as e:  # no compiler, no ninja, a failed build: the callers fall back
            _BUILT[name] = (None, f"the {name} extension did not build: {type(e).__name__}: {str(e)[:300]}")
    return _BUILT[name]


def build(verbose: bool = False):
    """The native extension (quantized linears and the layer ops), or None with the reason in
    `why_unavailable()`."""
    return compile_extension(NATIVE, _SOURCES, verbose)[0]


def available() -> bool:
    return build() is not None


def why_unavailable() -> str:
    return compile_extension(NATIVE, _SOURCES)[1]


def panels_supported() -> bool:
    """The bf16 panel kernels run here: the extension built and the CPU has AVX-512 BF16."""
    return available() and "avx512_bf16" in _cpu_flags()


def vnni_supported() -> bool:
    """The 8-bit-activation kernels run here: the extension built and the CPU has AVX-512 VNNI."""
    return available() and "avx512_vnni" in _cpu_flags()


def choose_layout(dtype: torch.dtype, n: int, activations: str = "auto") -> str:
    """The layout a weight [n, K] takes for activations of `dtype` under `activations`:
    auto  8-bit activations (vnni) where the CPU has AVX-512 VNNI, else bf16 panels, else blocks
    int8  8-bit activations, an error where they cannot run
    bf16  the activations as they are: bf16 panels (AVX-512 BF16) or the fp32 block kernels
    Only bf16 activations take either panel layout; fp32 activations always take blocks."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    tiled = dtype == torch.bfloat16 and n % PANEL == 0
    if activations == "int8":
        if not (tiled and vnni_supported()):
            raise ValueError("8-bit activations need bf16 activations, out_features a multiple of 16 and a CPU with "
                             f"AVX-512 VNNI ({why_unavailable() or 'this one lacks avx512_vnni'})")
        return "vnni"
    if activations == "auto" and tiled and vnni_supported():
        return "vnni"
    return "panels" if tiled and panels_supported() else "blocks"


class QuantWeight:
    """One linear layer's weight [N, K] as GGUF blocks of 32, for activations of `dtype`.

    Three layouts of the same numbers: `blocks` (the file's own, uint8 [N, K / 32 * block bytes];
    fp32 kernels), `panels` (sixteen output columns interleaved per block, uint8 [N / 16, K / 32,
    panel bytes]; bf16 activations against the exact integer q with AVX-512 BF16 dot products,
    csrc/quant_linear.cpp) and `vnni` (the same panels laid out for integer dot products: each
    activation row quantized to 8 bits per block of 32, csrc/vnni_linear.cpp). `choose_layout`
    picks one when none is given."""

    __slots__ = ("kind", "data", "layout", "shape", "dtype")

    def __init__(self, kind: str, blocks: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                 layout: str | None = None):
        if kind not in BLOCK_BYTES:
            raise ValueError(f"unknown block kind {kind!r} (known: {KINDS})")
        n, k = shape
        if k % QK:
            raise ValueError(f"in_features {k} is not a multiple of {QK}")
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, k // QK * BLOCK_BYTES[kind]):
            raise ValueError(f"{kind} blocks for [{n}, {k}] must be uint8 [{n}, {k // QK * BLOCK_BYTES[kind]}], "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        if layout is None:
            layout = choose_layout(dtype, n)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout != "blocks" and (dtype != torch.bfloat16 or n % PANEL):
            raise ValueError(f"the {layout} layout takes bf16 activations and out_features a multiple of 16")
        self.kind, self.shape, self.dtype, self.layout = kind, (n, k), dtype, layout
        if layout == "panels":
            self.data = to_panels(kind, blocks, (n, k))
        elif layout == "vnni":
            self.data = to_vnni(kind, blocks, (n, k))
        else:
            self.data = blocks.contiguous()

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, fp32_out: bool = False) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype; fp32_out: the panel kernels' fp32 sums, unrounded
        (the logits of an output head)."""
        mod = build()
        if mod is None:
            raise RuntimeError(f"quantized weights cannot run here: {why_unavailable()}")
        n, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} features, the weight takes in_features {k}")
        lead = x.shape[:-1]
        if self.layout != "blocks":
            if self.layout == "panels":
                fn = mod.q4_1_panel_linear if self.kind == "q4_1" else mod.q8_0_panel_linear
            else:
                fn = mod.q4_1_vnni_linear if self.kind == "q4_1" else mod.q8_0_vnni_linear
            if x.dtype != torch.bfloat16:
                raise TypeError(f"a bf16 {self.layout} weight got {x.dtype} activations")
            return fn(x.reshape(-1, k), self.data, n, k, bias, fp32_out).view(*lead, n)
        fn = mod.q4_1_linear if self.kind == "q4_1" else mod.q8_0_linear
        y = fn(x.reshape(-1, k), self.data, n, k, bias).view(*lead, n)
        return y.float() if fp32_out else y

    def blocks(self) -> torch.Tensor:
        """The file's own blocks [N, K / 32 * block bytes], whatever the layout."""
        if self.layout == "panels":
            return from_panels(self.kind, self.data, self.shape)
        if self.layout == "vnni":
            return from_vnni(self.kind, self.data, self.shape)
        return self.data

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The dense [N, K] weight (the reference the kernels are tested against)."""
        return dequantize(self.kind, self.blocks(), self.shape).to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows (an embedding lookup): ids [...] -> [..., K] in self.dtype."""
        flat = ids.reshape(-1)
        k = self.shape[1]
        if self.layout != "blocks":  # de-interleave the panels holding the rows, keep the rows
            back = from_panels if self.layout == "panels" else from_vnni
            sel = back(self.kind, self.data[flat // PANEL], (flat.numel() * PANEL, k))
            sel = sel.view(flat.numel(), PANEL, -1)[torch.arange(flat.numel()), flat % PANEL]
        else:
            sel = self.data[flat]
        return dequantize(self.kind, sel, (flat.numel(), k)).to(self.dtype).view(*ids.shape, k)

    def __repr__(self) -> str:
        return f"QuantWeight({self.kind}, {list(self.shape)}, {self.dtype}, {self.layout})"


def to_panels(kind: str, blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """File blocks [N, K/32*bytes] -> panels [N/16, K/32, panel bytes] (layout: csrc/quant_linear.cpp)."""
    n, k = shape
    P, nb = n // PANEL, k // QK
    b = blocks.reshape(P, PANEL, nb, BLOCK_BYTES[kind]).transpose(1, 2)  # [P, nb, 16 cols, bytes]
    d = b[..., 0:2].reshape(P, nb, 2 * PANEL)
    if kind == "q4_1":
        m = b[..., 2:4].reshape(P, nb, 2 * PANEL)
        qs = b[..., 4:]  # [P, nb, 16, 16]: k < 16 in low nibbles, k >= 16 in high
        q = torch.cat([qs & 15, qs >> 4], -1)  # [P, nb, j, k = 32]
        q = q.view(P, nb, PANEL, 8, 2, 2).permute(0, 1, 3, 2, 5, 4)  # [P, nb, g, j, t, h]: k = 4g + 2h + t
        packed = (q[..., 0] | (q[..., 1] << 4)).reshape(P, nb, 256)
        return torch.cat([d, m, packed], -1).contiguous()
    q = b[..., 2:]  # [P, nb, j, k]
    q = q.reshape(P, nb, 2, 8, 16, 2).permute(0, 1, 4, 2, 3, 5)  # [P, nb, i, j // 8, j % 8, t]: k = 2i + t
    return torch.cat([d, q.reshape(P, nb, 512)], -1).contiguous()


def from_panels(kind: str, panels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of to_panels: panels -> file blocks [N, K/32*bytes]."""
    n, k = shape
    P, nb = n // PANEL, k // QK
    p = panels.reshape(P, nb, PANEL_BYTES[kind])
    d = p[..., 0:32].reshape(P, nb, PANEL, 2)
    if kind == "q4_1":
        m = p[..., 32:64].reshape(P, nb, PANEL, 2)
        packed = p[..., 64:].reshape(P, nb, 8, PANEL, 2)  # [P, nb, g, j, t]
        q = torch.stack([packed & 15, packed >> 4], -1)  # [P, nb, g, j, t, h]
        q = q.permute(0, 1, 3, 2, 5, 4).reshape(P, nb, PANEL, 32)  # [P, nb, j, k]
        qs = q[..., :16] | (q[..., 16:] << 4)
        b = torch.cat([d, m, qs], -1)
    else:
        q = p[..., 32:].reshape(P, nb, 16, 2, 8, 2).permute(0, 1, 3, 4, 2, 5).reshape(P, nb, PANEL, 32)
        b = torch.cat([d, q], -1)
    return b.transpose(1, 2).reshape(n, k // QK * BLOCK_BYTES[kind]).contiguous()


def to_vnni(kind: str, blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """File blocks [N, K/32*bytes] -> vnni panels [N/16, K/32, VNNI_BYTES] (layout: csrc/vnni_linear.cpp)."""
    n, k = shape
    P, nb = n // PANEL, k // QK
    b = blocks.reshape(P, PANEL, nb, BLOCK_BYTES[kind]).transpose(1, 2)  # [P, nb, 16 cols, bytes]
    d = b[..., 0:2].reshape(P, nb, 2 * PANEL)
    if kind == "q4_1":  # the file's qs bytes as they are: vector i, lane j = qs[j][4i .. 4i + 3]
        m = b[..., 2:4].reshape(P, nb, 2 * PANEL)
        qs = b[..., 4:].reshape(P, nb, PANEL, 4, 4).permute(0, 1, 3, 2, 4).reshape(P, nb, 256)
        return torch.cat([d, m, qs], -1).contiguous()
    q = b[..., 2:] ^ 0x80  # [P, nb, j, 32]: int8 q + 128 as uint8 (the sign bit flipped)
    qv = q.reshape(P, nb, PANEL, 8, 4).permute(0, 1, 3, 2, 4).reshape(P, nb, 512)  # vector g, lane j = q[j][4g ..]
    return torch.cat([d, qv], -1).contiguous()


def from_vnni(kind: str, panels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of to_vnni: vnni panels -> file blocks [N, K/32*bytes]."""
    n, k = shape
    P, nb = n // PANEL, k // QK
    p = panels.reshape(P, nb, VNNI_BYTES[kind])
    d = p[..., 0:32].reshape(P, nb, PANEL, 2)
    if kind == "q4_1":
        m = p[..., 32:64].reshape(P, nb, PANEL, 2)
        qs = p[..., 64:].reshape(P, nb, 4, PANEL, 4).permute(0, 1, 3, 2, 4).reshape(P, nb, PANEL, 16)
        b = torch.cat([d, m, qs], -1)
    else:
        q = p[..., 32:].reshape(P, nb, 8, PANEL, 4).permute(0, 1, 3, 2, 4).reshape(P, nb, PANEL, 32) ^ 0x80
        b = torch.cat([d, q], -1)
    return b.transpose(1, 2).reshape(n, k // QK * BLOCK_BYTES[kind]).contiguous()


def dequantize(kind: str, blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF blocks -> fp32 [N, K], each weight computed as the file's reference dequantizer does."""
    n, k = shape
    b = blocks.reshape(n, k // QK, BLOCK_BYTES[kind])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [n, nb, 1]
    if kind == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(n, k)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    qs = b[..., 4:].to(torch.int32)
    q = torch.cat([qs & 15, qs >> 4], -1).float()  # elements 0..15 from the low nibbles, 16..31 high
    return (q * d + m).reshape(n, k)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """A dense weight [N, K] -> Q8_0 blocks uint8 [N, K / 32 * 34]: per block of 32, d = max|w| / 127
    (stored in fp16) and q = round(w / d), as the GGUF reference quantizer does."""
    n, k = w.shape
    if k % QK:
        raise ValueError(f"in_features {k} is not a multiple of {QK}")
    wb = w.float().reshape(n, k // QK, QK)
    amax = wb.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(wb * inv).clamp_(-127, 127).to(torch.int8)
    head = d.to(torch.float16).view(torch.uint8)  # [n, nb, 2]
    return torch.cat([head, q.view(torch.uint8)], -1).reshape(n, k // QK * BLOCK_BYTES["q8_0"]).contiguous()


def report() -> str:
    """One line for logs: whether the kernels run here and why not."""
    return ("native kernels (quantized linears, attention, RMSNorm): available" if available()
            else f"native kernels: unavailable ({why_unavailable()})")


if __name__ == "__main__":  # `python -m ssd.kernels.quant`: build now (the install step), say the outcome
    print(report(), file=sys.stderr)
