"""A dead draft never changes the output and never stalls a sequence."""

import pytest

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SSDEngine
from ssd.engine.protocol import RoundRequest
from ssd.models.loader import load_model
from ssd.models.draft import DraftDescription

pytestmark = pytest.mark.slow  # a real draft process, killed or hung mid-run

PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1]]


def _cfg():
    # gate=False: every step speculates (the paths tested here; the gate is tested in test_greedy_lossless.py)
    return EngineConfig(mode="ssd", max_batch=4, max_model_len=64,
                        speculation=SpeculationConfig(gate=False, num_speculative_tokens=2, fan_out_budget=3, critical_batch_size=100))


def test_draft_killed_mid_generation_output_unchanged(small_pair):
    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref = [s.output_ids for s in AREngine(_cfg().replace(mode="ar"), target, (3,)).generate(PROMPTS, params)]
    with SSDEngine(_cfg(), target, DraftDescription(str(d_dir)), (3,)) as eng:
        seqs = [eng.add_request(p, params) for p in PROMPTS]
        for _ in range(3):
            eng.step()
        assert eng.draft_alive and any(s.output_ids for s in seqs)
        eng.link.kill()
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            assert steps < 200  # never stalls
        assert not eng.draft_alive and eng.stats.n_backup > 0
    assert [s.output_ids for s in seqs] == ref


def test_abort_releases_target_and_draft_slots(small_pair):
    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    with SSDEngine(_cfg(), target, DraftDescription(str(d_dir)), (3,)) as eng:
        a = eng.add_request([0, 1], SamplingParams(max_tokens=30, ignore_eos=True))
        b = eng.add_request([1, 2], SamplingParams(max_tokens=30, ignore_eos=True))
        eng.step()
        eng.step()
        free_before = eng.target.cache.num_free
        eng.abort(a)
        assert a.finish_reason == "abort" and eng.target.cache.num_free == free_before + 1
        while eng.has_unfinished():
            eng.step()
        assert b.finish_reason == "length" and len(b.output_ids) == 30
        assert eng.target.cache.num_free == eng.target.cache.num_slots
        eng._flush_ops()
        # the draft process freed both sequences: its reply to a probe round lists no one
        eng.link.send(RoundRequest(eng.round_id))
        assert eng.link.recv().entries == {}


def test_a_cache_that_was_not_there_when_verify_ended_counts_late_not_hit(small_pair):
    # the draft process is only asked whether its cache is ready; here it never is when the target
    # looks, so every cache hit is a late one (the target had to wait for it) and none is counted
    # on time; the output is the same either way
    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = [s.output_ids for s in AREngine(_cfg().replace(mode="ar"), target, (3,)).generate(PROMPTS, params)]
    with SSDEngine(_cfg(), target, DraftDescription(str(d_dir)), (3,)) as eng:
        eng.link.ready = lambda: False
        out = [s.output_ids for s in eng.generate(PROMPTS, params)]
        st = eng.stats
    assert out == ref
    assert st.cache_late > 0 and st.cache_hit == st.index_hit
