"""The quantized linear kernels (kernels/quant.py, kernels/csrc/quant_linear.cpp) against a plain
reference: the file's blocks de-quantized in fp32 and multiplied densely; both layouts; every row
count of the serving envelope bit for bit; the GGUF reader's q/k row order against the
converted checkpoint."""
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
    out32 = dict(fp32_out=True) if layout == "panels" else {}
    y32 = w.matmul(x, bias, **out32)
    for m in (1, 2, 3, 4, 5, 7, 9, 16, 33, 40):
        assert torch.equal(w.matmul(x[:m], bias), y[:m]), m
        assert torch.equal(w.matmul(x[m - 1:m], bias), y[m - 1:m]), m
        assert torch.equal(w.matmul(x[m - 1:m], bias, **out32), y32[m - 1:m]), m
    assert probe_row_invariance([w], (1, 2, 5, 8, 13, 40)) == []


@pytest.mark.parametrize("kind", quant.KINDS)
def test_panels_round_trip_and_rows(kind):
    if not quant.panels_supported():
        pytest.skip("no AVX-512 BF16 here")
    n, k = 64, 128
    blocks = _random_blocks(kind, n, k, seed=3)
    p = quant.QuantWeight(kind, blocks, (n, k), torch.bfloat16, layout="panels")
    assert torch.equal(quant.from_panels(kind, p.data, (n, k)), blocks)
    ids = torch.tensor([[0, 17], [63, 5]])
    assert torch.equal(p.rows(ids), quant.dequantize(kind, blocks, (n, k))[ids].bfloat16())


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
