"""The speculation cache is what the draft would have drafted for each outcome: every branch
(k, c) of a greedy build must equal just-in-time drafting from ctx + d_1..d_k + c."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ssd.config import SamplingParams, SpeculationConfig
from ssd.engine.draft_runner import DraftRunner, Verifying
from ssd.models.loader import load_model


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner_draft")
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(d)
    return load_model(d)[0]


def _jit_alone(model, spec, ctx):
    r = DraftRunner(model, spec, max_seqs=1, max_model_len=64)
    r.add(0, ctx, SamplingParams())
    return r.jit([0])[0][0].tolist()


@pytest.mark.parametrize("fan_out", ["geometric", "uniform"])
def test_every_branch_equals_jit_from_its_outcome(draft_model, fan_out):
    K = 3
    spec = SpeculationConfig(num_speculative_tokens=K, fan_out_budget=7, fan_out=fan_out)
    runner = DraftRunner(draft_model, spec, max_seqs=2, max_model_len=64)
    ctxs = {10: [1, 5, 7, 9, 11], 11: [3, 4, 8]}
    for i, c in ctxs.items():
        runner.add(i, c, SamplingParams())
    drafted = runner.jit(list(ctxs))
    specs = {i: Verifying(drafted[i][0].tolist(), "miss") for i in ctxs}
    keys_seen = {}
    built = runner.build(specs, on_keys=keys_seen.update)
    for i, ctx in ctxs.items():
        entry = built[i]
        d = specs[i].tokens
        assert sum(entry.fan_out) == 7 and len(entry.keys) == 7
        assert set(keys_seen[i]) == set(entry.keys)
        for (k, c), j in entry.keys.items():
            if k < K:
                assert c != d[k]  # a rejected draft token is never a recovery candidate
            expect = _jit_alone(draft_model, spec, ctx + d[:k] + [c])
            assert entry.token_ids[j].tolist() == expect, (i, k, c)


def test_hit_then_next_round_stays_consistent(draft_model):
    """After an outcome, the next build (glue over the new context) again matches JIT."""
    K = 2
    spec = SpeculationConfig(num_speculative_tokens=K, fan_out_budget=4)
    runner = DraftRunner(draft_model, spec, max_seqs=1, max_model_len=64)
    ctx = [2, 4, 6, 8]
    runner.add(0, ctx, SamplingParams())
    d = runner.jit([0])[0][0].tolist()
    entry = runner.build({0: Verifying(d, "miss")})[0]
    (k, c), j = next(iter(entry.keys.items()))
    runner.on_outcome(0, d[:k] + [c])
    nxt = entry.token_ids[j].tolist()
    entry2 = runner.build({0: Verifying(nxt, "hit")})[0]
    new_ctx = ctx + d[:k] + [c]
    for (k2, c2), j2 in entry2.keys.items():
        assert entry2.token_ids[j2].tolist() == _jit_alone(draft_model, spec, new_ctx + nxt[:k2] + [c2])


def test_abort_between_tree_steps(draft_model):
    spec = SpeculationConfig(num_speculative_tokens=3, fan_out_budget=4)
    runner = DraftRunner(draft_model, spec, max_seqs=1, max_model_len=64)
    runner.add(0, [1, 2, 3], SamplingParams())
    d = runner.jit([0])[0][0].tolist()
    assert runner.build({0: Verifying(d, "miss")}, should_abort=lambda: True) is None
    # the runner stays usable: the next outcome and build work as usual
    runner.on_outcome(0, [d[0], 7])
    d2 = runner.jit([0])[0][0].tolist()
    assert d2 == _jit_alone(draft_model, spec, [1, 2, 3, d[0], 7])
