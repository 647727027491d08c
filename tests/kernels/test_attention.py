import pytest
import torch

from ssd.kernels.attention import AttnBatch, attention, attention_reference
from ssd.kv_cache import append_batch, tree_step_batch

torch.set_num_threads(2)


def rand_qkv(B, Hq, Hkv, n, S, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return r(B, Hq, n, D), r(B, Hkv, S, D), r(B, Hkv, S, D)


@pytest.fixture(params=[True, False], ids=["invariant", "fast"])
def invariant(request):
    return request.param


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 1)])
def test_append_masks_with_padding_rows(Hq, Hkv, invariant):
    batch = append_batch([0, 1, 2], [3, 0, 6], [4, 2, 1])  # rows 1, 2 are right-padded
    q, k, v = rand_qkv(3, Hq, Hkv, 4, batch.kv_len, 16)
    out = attention(q, k, v, batch, invariant)
    assert out.shape == q.shape and not out.isnan().any()
    assert (out - attention_reference(q, k, v, batch.mask)).abs().max() <= 1e-5


def test_prefix_lens_only_builds_the_append_mask(invariant):
    batch = append_batch([0, 1], [2, 5], 3)
    q, k, v = rand_qkv(2, 4, 2, 3, batch.kv_len, 8, seed=1)
    bare = AttnBatch(batch.slots, batch.positions, batch.write_cols, None, batch.kv_len, batch.prefix_lens)
    assert (attention(q, k, v, bare, invariant) - attention_reference(q, k, v, batch.mask)).abs().max() <= 1e-5


def test_single_token_decode_fast_path(invariant):
    batch = append_batch([0], [9], 1)
    q, k, v = rand_qkv(1, 6, 2, 1, batch.kv_len, 32, seed=2)
    assert (attention(q, k, v, batch, invariant) - attention_reference(q, k, v, batch.mask)).abs().max() <= 1e-5


def test_tree_mask_and_fully_masked_rows_give_zeros(invariant):
    batch = tree_step_batch([0, 1], visible_prefix=[[4, 6, 2], [3]], region_start=[8, 5], num_branches=[3, 1],
                            step=2, base_positions=[[4, 6, 2], [3]])
    q, k, v = rand_qkv(2, 4, 2, 3, batch.kv_len, 16, seed=3)
    out = attention(q, k, v, batch, invariant)
    ref = attention_reference(q, k, v, batch.mask)
    assert not out.isnan().any()
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(out[1, :, 1:], torch.zeros_like(out[1, :, 1:]))  # padding branches


def test_random_masks_bf16(invariant):
    g = torch.Generator().manual_seed(4)
    q, k, v = rand_qkv(2, 4, 2, 5, 11, 16, seed=4, dtype=torch.bfloat16)
    mask = torch.rand(2, 5, 11, generator=g) < 0.5
    mask[0, 3] = False
    batch = AttnBatch(torch.arange(2), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long),
                      mask, 11, None)
    out = attention(q, k, v, batch, invariant)
    assert out.dtype == torch.bfloat16
    assert (out.float() - attention_reference(q, k, v, mask).float()).abs().max() <= 3e-2


def test_reference_is_softmax_attention():
    q, k, v = rand_qkv(1, 1, 1, 1, 3, 2, seed=5)
    mask = torch.tensor([[[True, False, True]]])
    s = (q[0, 0, 0] @ k[0, 0].T) / 2 ** 0.5
    w = torch.softmax(s[[0, 2]], 0)
    assert torch.allclose(attention_reference(q, k, v, mask)[0, 0, 0], w[0] * v[0, 0, 0] + w[1] * v[0, 0, 2], atol=1e-6)


def test_shape_checks():
    batch = append_batch([0], [2], 1)
    q, k, v = rand_qkv(1, 4, 3, 1, batch.kv_len, 8)
    with pytest.raises(ValueError):
        attention(q, k, v, batch)  # 4 heads over 3 kv heads
    q, k, v = rand_qkv(1, 4, 2, 1, batch.kv_len + 1, 8)
    with pytest.raises(ValueError):
        attention(q, k, v, batch)
