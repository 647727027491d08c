"""Batch invariance of the kernels, bit for bit: a query token's attention output, and a row's
linear output, must not depend on the other rows of the call, the batch, or masked columns.

Each property has a negative control: a kernel whose summation order follows the call's shape
(as SDPA's and MKL's do) must be caught by the same check."""
import random

import pytest
import torch
import torch.nn.functional as F

from ssd.kernels.attention import attention_invariant
from ssd.kernels.linear import LinearPacks, envelope_rows, linear, probe_row_invariance

from invariance_support import needs_bf16_packing, shape_dependent_attention

DTYPES = [torch.float32, torch.bfloat16]


def attention_mismatches(attn, dtype, trials=30, seed=0, Hq=9, Hkv=3, D=64):
    """Token t of a sequence computed alone (an AR step) vs inside a block of n tokens, next to
    other sequences of other lengths, with masked columns after it."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    L = 400
    K = torch.randn(1, Hkv, L, D, generator=g).to(dtype)
    V = torch.randn(1, Hkv, L, D, generator=g).to(dtype)
    Q = torch.randn(1, Hq, L, D, generator=g).to(dtype)
    bad = []
    for _ in range(trials):
        t = rng.randrange(0, L - 20)
        n = rng.randint(1, 17)
        lo = max(0, t - rng.randrange(0, n))  # the block starts at or before t
        alone_mask = torch.ones(1, 1, t + 1, dtype=torch.bool)
        alone = attn(Q[:, :, t:t + 1], K[:, :, :t + 1], V[:, :, :t + 1], alone_mask)[0, :, 0]
        B = rng.randint(1, 4)
        row = rng.randrange(B)
        S = lo + n + rng.randint(0, 70)  # extra trailing columns, masked for our sequence
        Kb = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        Vb = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        Qb = torch.randn(B, Hq, n, D, generator=g).to(dtype)
        Kb[row, :, :lo + n], Vb[row, :, :lo + n] = K[0, :, :lo + n], V[0, :, :lo + n]
        Qb[row] = Q[0, :, lo:lo + n]
        mask = torch.rand(B, n, S, generator=g) < 0.7
        cols = torch.arange(S)
        mask[row] = cols[None, :] <= (lo + torch.arange(n))[:, None]
        out = attn(Qb, Kb, Vb, mask)[row, :, t - lo]
        if not torch.equal(out, alone):
            bad.append((t, n, B, S))
    return bad


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_attention_is_bitwise_row_batch_and_mask_invariant(dtype, threads):
    assert attention_mismatches(attention_invariant, dtype) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_control_shape_dependent_attention_is_caught(dtype):
    assert len(attention_mismatches(shape_dependent_attention, dtype, trials=20)) > 0


def test_invariant_attention_matches_the_reference_closely():
    from ssd.kernels.attention import attention_reference

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, 7, 32, generator=g), torch.randn(2, 2, 130, 32, generator=g),
               torch.randn(2, 2, 130, 32, generator=g))
    mask = torch.rand(2, 7, 130, generator=g) < 0.5
    mask[1, 2] = False  # a row that sees nothing gives zeros
    out = attention_invariant(q, k, v, mask)
    assert (out - attention_reference(q, k, v, mask)).abs().max() <= 1e-5
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))


def test_invariant_attention_prefill_chunks_rows(monkeypatch):
    # a long prefill is split into several GEMM calls; the split must not change any bit
    import ssd.kernels.attention as A

    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(1, 9, 50, 64, generator=g), torch.randn(1, 3, 50, 64, generator=g), torch.randn(1, 3, 50, 64, generator=g)
    mask = torch.arange(50)[None, None, :] <= torch.arange(50)[None, :, None]
    whole = attention_invariant(q, k, v, mask)
    monkeypatch.setattr(A, "MAX_ROWS", 24)  # 8 tokens x 3 heads per call
    assert torch.equal(A.attention_invariant(q, k, v, mask), whole)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
def test_packed_linear_is_row_invariant(dtype, threads):
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(o, i, generator=g) * 0.05).to(dtype) for o, i in [(960, 576), (576, 1536), (8192, 576)]]
    assert probe_row_invariance(weights, envelope_rows(130)) == []


def test_negative_control_the_row_probe_catches_a_row_dependent_linear(monkeypatch):
    # a linear that sums in another order when it has more than one row (as GEMV vs GEMM do)
    import ssd.kernels.linear as Lmod

    def row_dependent(x, w, b=None):
        if x.shape[0] == 1:
            return F.linear(x, w, b)
        return (x[:, None, :] * w[None]).flip(-1).cumsum(-1)[..., -1]

    monkeypatch.setattr(Lmod, "F", type("F", (), {"linear": staticmethod(row_dependent)}))
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    assert probe_row_invariance([w], (1, 2, 5), invariant=False) != []


def test_packed_weight_follows_in_place_edits_and_replacement():
    packs = LinearPacks()
    w = torch.randn(32, 16)
    x = torch.randn(3, 16)
    y0 = linear(x, w, packs=packs, name="w")
    assert torch.allclose(y0, F.linear(x, w), atol=1e-5)
    w.mul_(2)  # edited in place: the packed copy must not go stale
    assert torch.allclose(linear(x, w, packs=packs, name="w"), 2 * y0, atol=1e-5)
    w2 = torch.randn(32, 16)  # a new tensor under the same name
    assert torch.allclose(linear(x, w2, packs=packs, name="w"), F.linear(x, w2), atol=1e-5)


@needs_bf16_packing
def test_packed_linear_calls_onednn_with_at_most_max_rows(monkeypatch):
    # oneDNN's bf16 kernel changes above 32 rows on AMX CPUs: longer inputs must be split, and a
    # lone tail row padded, wherever this test runs
    import ssd.kernels.linear as Lmod

    if not Lmod.packing_available(torch.zeros(2, 2)):
        pytest.skip("no oneDNN packing on this build")
    seen = []
    real = Lmod._packed_rows

    def record(x2, packed, bias):
        seen.append(x2.shape[0])
        return real(x2, packed, bias)

    monkeypatch.setattr(Lmod, "_packed_rows", record)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 40, generator=g).to(torch.bfloat16)
    packs = Lmod.LinearPacks()
    x = torch.randn(2, 65, 40, generator=g).to(torch.bfloat16)  # 130 rows
    y = Lmod.linear(x, w, packs=packs, name="w")
    assert seen == [32, 32, 32, 32, 2] and y.shape == (2, 65, 48)
    seen.clear()
    rows = torch.cat([Lmod.linear(r[None], w, packs=packs, name="w") for r in x.reshape(-1, 40)])
    assert torch.equal(rows.view(2, 65, 48), y) and seen == [1] * 130


def test_bf16_without_packing_falls_back_to_f_linear(monkeypatch):
    """A CPU that cannot pack bf16 (no AVX-512 BW/VL/DQ or AVX-NE-CONVERT: oneDNN's reorder
    raises there) runs bf16 through F.linear instead of failing; fp32 keeps the packed path."""
    import ssd.kernels.linear as L

    monkeypatch.setattr(L, "_BF16_PACKING", [False])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g)
    assert not L.packing_available(w.to(torch.bfloat16)) and L.packing_available(w) == L.packing_available(w.clone())
    x = torch.randn(3, 16, generator=g).to(torch.bfloat16)
    packs = L.LinearPacks()
    assert torch.equal(L.linear(x, w.to(torch.bfloat16), packs=packs, name="w"),
                       torch.nn.functional.linear(x, w.to(torch.bfloat16)))
