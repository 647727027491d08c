import pytest
import torch

from ssd.kv_cache import KVCache, append_batch, tree_step_batch
from ssd.models.llama import LlamaModel, ModelConfig

torch.set_num_threads(2)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position=256, attention_bias=True, rms_norm_eps=1e-6)
    m = LlamaModel(cfg)
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def recompute(model, tokens: list[int]) -> torch.Tensor:
    # logits [n, V] of one sequence prefilled alone into a fresh cache
    cache = model.new_cache(1, len(tokens) + 1)
    return model(torch.tensor([tokens]), append_batch([cache.allocate()], [0], len(tokens)), cache)[0]


def rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def padded(rows: list[list[int]]) -> torch.Tensor:
    n = max(map(len, rows))
    return torch.tensor([r + [0] * (n - len(r)) for r in rows])  # [B, n]


def test_prefill_then_decode_equals_recompute(model):
    seq = rand_tokens(12, 1)
    cache = model.new_cache(2, 16)
    cache.allocate()
    s = cache.allocate()  # slot 1: a non-zero slot
    model(torch.tensor([seq[:5]]), append_batch([s], [0], 5), cache)
    cache.truncate(s, 5)
    ref = recompute(model, seq)
    for i in range(5, 12):
        out = model(torch.tensor([[seq[i]]]), append_batch([s], [cache.lengths[s]], 1), cache)
        cache.truncate(s, i + 1)
        assert (out[0, 0] - ref[i]).abs().max() <= ATOL


@pytest.mark.parametrize("slot_order", ["contiguous", "scattered"])
def test_batched_verify_with_per_sequence_lengths(model, slot_order):
    prompts = [rand_tokens(n, 10 + n) for n in (3, 8, 5)]
    drafts = [rand_tokens(k, 20 + k) for k in (4, 2, 3)]  # K+1 = 4, rows shorter are padded
    cache = model.new_cache(5, 20)
    slots = [cache.allocate() for _ in range(5)]
    slots = slots[:3] if slot_order == "contiguous" else [slots[3], slots[0], slots[2]]
    # batched prefill with right padding, then one batched verify of the drafts
    model(padded(prompts), append_batch(slots, [0, 0, 0], [len(p) for p in prompts]), cache)
    for s, p in zip(slots, prompts):
        cache.truncate(s, len(p))
    lengths = [cache.lengths[s] for s in slots]
    out = model(padded(drafts), append_batch(slots, lengths, [len(d) for d in drafts]), cache)
    for b, (p, d) in enumerate(zip(prompts, drafts)):
        ref = recompute(model, p + d)[len(p):]
        assert (out[b, :len(d)] - ref).abs().max() <= ATOL


def test_rollback_then_append_equals_recompute(model):
    seq, rejected, fresh = rand_tokens(6, 3), rand_tokens(4, 4), rand_tokens(3, 5)
    cache = model.new_cache(1, 16)
    s = cache.allocate()
    model(torch.tensor([seq + rejected]), append_batch([s], [0], 10), cache)
    cache.truncate(s, 7)  # keep the first draft token only
    out = model(torch.tensor([fresh]), append_batch([s], [7], 3), cache)
    ref = recompute(model, seq + rejected[:1] + fresh)[7:]
    assert (out[0] - ref).abs().max() <= ATOL
    # without the rollback the stale columns would be visible and the result different
    stale = model(torch.tensor([fresh]), append_batch([s], [10], 3), cache)
    assert (stale[0] - ref).abs().max() > 1e-2


def test_tree_decode_equals_recompute(model):
    K = 3
    rows = [  # prefix length, fork depth of each branch (depth k: the fork token replaces glue token k)
        dict(L=5, forks=[0, 1, 3]),
        dict(L=9, forks=[2, 2]),
    ]
    cache = model.new_cache(4, 32)
    all_slots = [cache.allocate() for _ in range(4)]
    slots = [all_slots[2], all_slots[0]]
    free_before = cache.num_free
    for i, r in enumerate(rows):
        r["prefix"] = rand_tokens(r["L"], 30 + i)
        r["glue"] = rand_tokens(K + 1, 40 + i)
        r["branches"] = [rand_tokens(K, 50 + 10 * i + j) for j in range(len(r["forks"]))]  # step-t tokens
    model(padded([r["prefix"] + r["glue"] for r in rows]), append_batch(slots, [0, 0], [r["L"] + K + 1 for r in rows]), cache)
    snapshot = cache.k.clone()
    region = [r["L"] + K + 1 for r in rows]
    outs = []
    for t in range(K):
        batch = tree_step_batch(
            slots, visible_prefix=[[r["L"] + k for k in r["forks"]] for r in rows], region_start=region,
            num_branches=[len(r["forks"]) for r in rows], step=t,
            base_positions=[[r["L"] + k for k in r["forks"]] for r in rows])
        outs.append(model(padded([[br[t] for br in r["branches"]] for r in rows]), batch, cache))  # [B, n, V]
    assert cache.k.shape[1] == 4 and cache.num_free == free_before  # no slot per branch
    for b, (r, s) in enumerate(zip(rows, slots)):
        glue_cols = r["L"] + K + 1  # prefix and glue columns are never overwritten by the tree
        assert torch.equal(cache.k[:, s, :, :glue_cols], snapshot[:, s, :, :glue_cols])
        for j, (k, br) in enumerate(zip(r["forks"], r["branches"])):
            ref = recompute(model, r["prefix"] + r["glue"][:k] + br)[r["L"] + k:]  # [K, V]
            got = torch.stack([outs[t][b, j] for t in range(K)])
            assert (got - ref).abs().max() <= ATOL, (b, j)


def test_tree_step_batch_layout():
    b = tree_step_batch([0, 1], visible_prefix=[[4, 6], [3]], region_start=[8, 5], num_branches=[2, 1],
                        step=1, base_positions=[[4, 6], [3]])
    assert b.write_cols.tolist() == [[10, 11], [6, 7]]  # row 1's padding writes into its next step's column
    assert b.positions.tolist()[0] == [5, 7]
    assert b.kv_len == 12
    m = b.mask.tolist()
    assert [c for c in range(12) if m[0][0][c]] == [0, 1, 2, 3, 8, 10]
    assert [c for c in range(12) if m[0][1][c]] == [0, 1, 2, 3, 4, 5, 9, 11]
    assert [c for c in range(12) if m[1][0][c]] == [0, 1, 2, 5, 6]
    assert not any(m[1][1])  # padding token sees nothing


def test_append_batch_layout():
    b = append_batch([3, 4], [2, 5], [3, 1])
    assert b.write_cols.tolist() == [[2, 3, 4], [5, 6, 7]] and b.positions.tolist() == b.write_cols.tolist()
    assert b.kv_len == 8 and b.slot_start == 3 and b.write_start is None
    assert b.prefix_lens.tolist() == [2, 5]
    assert b.mask[1, 0].tolist() == [True] * 6 + [False] * 2
    assert b.mask[0, 2].tolist() == [True] * 5 + [False] * 3
    assert append_batch([0, 2], [4, 4], 1).slot_start is None


def test_slot_allocation():
    c = KVCache(1, 2, 1, 4, 8)
    a, b = c.allocate(), c.allocate()
    with pytest.raises(RuntimeError):
        c.allocate()
    c.truncate(a, 5)
    c.free(a)
    assert c.allocate() == a and c.lengths[a] == 0
    with pytest.raises(ValueError):
        c.free(7)
    with pytest.raises(ValueError):
        c.truncate(b, 9)
