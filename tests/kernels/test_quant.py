"""The quantized linear kernels (kernels/quant.py, kernels/csrc/quant_linear.cpp, vnni_linear.cpp)
against plain references: the file's blocks de-quantized in fp32 and multiplied densely (every
layout), and for 8-bit activations the same quantization and integer sums written out in Python;
every row count of the serving envelope bit for bit."""
from __future__ import annotations

import pytest
import torch

from ssd.kernels import quant
from ssd.kernels.linear import linear, probe_row_invariance

pytestmark = pytest.mark.skipif(not quant.available(), reason=f"{quant.why_unavailable()}")


def _random_blocks(kind: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Valid blocks: finite fp16 scales (and mins), random q."""
    g = torch.Generator().manual_seed(seed)
    nb = k // quant.QK
    d = (torch.rand(n, nb, 1, generator=g) * 0.02 + 1e-3).half().view(torch.uint8)
    if kind == "q8_0":
        q = torch.randint(-127, 128, (n, nb, 32), generator=g, dtype=torch.int8).view(torch.uint8)
        return torch.cat([d, q], -1).reshape(n, -1)
    m = (-torch.rand(n, nb, 1, generator=g) * 0.1).half().view(torch.uint8)
    q = torch.randint(0, 256, (n, nb, 16), generator=g, dtype=torch.uint8)
    return torch.cat([d, m, q], -1).reshape(n, -1)


LAYOUTS = [("q4_1", torch.float32, "blocks"), ("q8_0", torch.float32, "blocks"),
           ("q4_1", torch.bfloat16, "blocks"), ("q8_0", torch.bfloat16, "blocks")]
if quant.panels_supported():
    LAYOUTS += [("q4_1", torch.bfloat16, "panels"), ("q8_0", torch.bfloat16, "panels")]
if quant.vnni_supported():
    LAYOUTS += [("q4_1", torch.bfloat16, "vnni"), ("q8_0", torch.bfloat16, "vnni")]
TILED = [lay for lay in ("panels", "vnni") if any(lay == x[2] for x in LAYOUTS)]


def test_dequantize_follows_the_block_definitions():
    # one Q4_1 block by hand: d = 0.5, min = -1, q[j] = j % 16 for the low nibbles, 15 - j % 16 high
    qs = torch.tensor([(j % 16) | ((15 - j % 16) << 4) for j in range(16)], dtype=torch.uint8)
    blk = torch.cat([torch.tensor([0.5]).half().view(torch.uint8), torch.tensor([-1.0]).half().view(torch.uint8), qs])
    w = quant.dequantize("q4_1", blk[None], (1, 32))[0]
    assert w[:16].tolist() == [0.5 * j - 1 for j in range(16)]
    assert w[16:].tolist() == [0.5 * (15 - j) - 1 for j in range(16)]
    q8 = torch.cat([torch.tensor([0.25]).half().view(torch.uint8), torch.arange(-16, 16, dtype=torch.int8).view(torch.uint8)])
    assert quant.dequantize("q8_0", q8[None], (1, 32))[0].tolist() == [0.25 * j for j in range(-16, 16)]


@pytest.mark.parametrize("kind,dtype,layout", LAYOUTS)
def test_matches_the_dense_reference_and_is_row_invariant(kind, dtype, layout):
    n, k = 48, 96
    w = quant.QuantWeight(kind, _random_blocks(kind, n, k), (n, k), dtype, layout=layout)
    assert w.layout == layout
    dense = w.dequantize()
    x = (torch.randn(40, k, generator=torch.Generator().manual_seed(1))).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = w.matmul(x, bias)
    ref = (x.float() @ dense.T + bias.float()).to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    # every row alone, in blocks, at every position; bit for bit in the fp32 sums too (a bf16
    # output would hide most low-bit differences behind its rounding)
    out32 = dict(fp32_out=True) if layout != "blocks" else {}
    y32 = w.matmul(x, bias, **out32)
    for m in (1, 2, 3, 4, 5, 7, 9, 16, 33, 40):
        assert torch.equal(w.matmul(x[:m], bias), y[:m]), m
        assert torch.equal(w.matmul(x[m - 1:m], bias), y[m - 1:m]), m
        assert torch.equal(w.matmul(x[m - 1:m], bias, **out32), y32[m - 1:m]), m
    assert probe_row_invariance([w], (1, 2, 5, 8, 13, 40)) == []


@pytest.mark.parametrize("layout", TILED)
@pytest.mark.parametrize("kind", quant.KINDS)
def test_panels_round_trip_and_rows(kind, layout):
    n, k = 64, 128
    blocks = _random_blocks(kind, n, k, seed=3)
    p = quant.QuantWeight(kind, blocks, (n, k), torch.bfloat16, layout=layout)
    assert torch.equal(p.blocks(), blocks)
    ids = torch.tensor([[0, 17], [63, 5]])
    assert torch.equal(p.rows(ids), quant.dequantize(kind, blocks, (n, k))[ids].bfloat16())


def _int8_reference(kind: str, blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What csrc/vnni_linear.cpp computes, written out: each row quantized per block of 32 (dx =
    max|x| / 127, q = round(x * (1 / dx)), ties to even), the integer sums exact (int64), then
    (dw * dx) * sum(qw qx) + mw * dx * sum(qx) per block, summed in fp64."""
    n, k = blocks.shape[0], x.shape[1]
    nb = k // quant.QK
    xb = x.float().reshape(-1, nb, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    qx = torch.round(xb * inv).clamp(-127, 127).to(torch.int64)  # [M, nb, 32]
    b = blocks.reshape(n, nb, quant.BLOCK_BYTES[kind])
    dw = b[..., 0:2].contiguous().view(torch.float16).double()[..., 0]  # [n, nb]
    if kind == "q8_0":
        qw = b[..., 2:].contiguous().view(torch.int8).to(torch.int64)
    else:
        qs = b[..., 4:].to(torch.int64)
        qw = torch.cat([qs & 15, qs >> 4], -1)
    isum = torch.einsum("mbk,nbk->mnb", qx, qw).double()  # exact integers
    y = (isum * dw[None] * d[..., 0].double()[:, None]).sum(-1)
    if kind == "q4_1":
        mw = b[..., 2:4].contiguous().view(torch.float16).double()[..., 0]
        sx = d[..., 0].double() * qx.sum(-1).double()  # [M, nb]
        y = y + (mw[None] * sx[:, None]).sum(-1)
    return y


@pytest.mark.skipif(not quant.vnni_supported(), reason="no AVX-512 VNNI here")
@pytest.mark.parametrize("kind", quant.KINDS)
def test_int8_activations_match_their_written_out_reference(kind):
    # a wrong nibble or byte order, a lost Q8_0 offset correction, a wrong scale or rounding all
    # move results by far more than fp32's own rounding (~1e-6 relative here)
    n, k = 48, 160
    blocks = _random_blocks(kind, n, k, seed=7)
    w = quant.QuantWeight(kind, blocks, (n, k), torch.bfloat16, layout="vnni")
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    x[3, 32:64] = 0  # an all-zero block: dx = 0, q = 0
    x[4, :32] *= 40  # a block with a large range
    y = w.matmul(x, fp32_out=True).double()
    ref = _int8_reference(kind, blocks, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and 8-bit activations are close to the exact product (the error of llama.cpp's scheme)
    dense = x.float() @ w.dequantize().T
    assert ((y.float() - dense).norm() / dense.norm()).item() < 2e-2


def test_layouts_are_chosen_and_refused_as_documented():
    assert quant.choose_layout(torch.float32, 64) == "blocks"
    assert quant.choose_layout(torch.bfloat16, 40) == "blocks"  # out_features not a multiple of 16
    if quant.vnni_supported():
        assert quant.choose_layout(torch.bfloat16, 64) == "vnni" == quant.choose_layout(torch.bfloat16, 64, "int8")
    else:
        with pytest.raises(ValueError, match="8-bit activations need"):
            quant.choose_layout(torch.bfloat16, 64, "int8")
    assert quant.choose_layout(torch.bfloat16, 64, "bf16") == ("panels" if quant.panels_supported() else "blocks")
    with pytest.raises(ValueError, match="8-bit activations need"):
        quant.choose_layout(torch.float32, 64, "int8")
    with pytest.raises(ValueError, match="activations must be one of"):
        quant.choose_layout(torch.bfloat16, 64, "fp8")


def test_linear_dispatches_and_threads_do_not_change_bits():
    n, k = 64, 64
    w = quant.QuantWeight("q4_1", _random_blocks("q4_1", n, k, 5), (n, k), torch.bfloat16)
    x = torch.randn(5, k).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, w)
        torch.set_num_threads(2)
        two = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, w.matmul(x))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.QuantWeight("q4_1", torch.zeros(2, 20, dtype=torch.uint8), (2, 40), torch.float32)
    with pytest.raises(ValueError, match="must be uint8"):
        quant.QuantWeight("q8_0", torch.zeros(2, 20, dtype=torch.uint8), (2, 32), torch.float32)
    with pytest.raises(ValueError, match="unknown block kind"):
        quant.QuantWeight("q5_k", torch.zeros(2, 20, dtype=torch.uint8), (2, 32), torch.float32)
    w = quant.QuantWeight("q8_0", _random_blocks("q8_0", 16, 32), (16, 32), torch.float32)
    with pytest.raises(ValueError, match="in_features 32"):
        w.matmul(torch.zeros(1, 64))


def test_int8_quantizer_error_is_half_a_step_plus_the_scale_rounding():
    # as the GGUF reference quantizer: q = round(w * 127 / amax), d = amax / 127 stored in fp16, so
    # |q * d16 - w| <= d / 2 + 127 * |d16 - d| per block
    w = torch.randn(32, 64)
    blocks = quant.quantize_q8_0(w)
    back = quant.dequantize("q8_0", blocks, (32, 64))
    d = w.reshape(32, 2, 32).abs().amax(-1, keepdim=True) / 127
    d16 = blocks.reshape(32, 2, 34)[..., :2].contiguous().view(torch.float16).float()
    bound = d / 2 + 127 * (d16 - d).abs() + 1e-7
    assert ((back - w).reshape(32, 2, 32).abs() <= bound).all()
    assert ((back - w).reshape(32, 2, 32).abs() > d / 4).any()  # it does quantize
