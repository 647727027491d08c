"""One SSD target serves each request in the mode it asks for (RequestOptions.mode: ar | sd | ssd),
side by side in one batch: greedy output identical to AR in all three, AR requests never reach
the draft and sample exactly as the AR engine does, SD requests never take a cached speculation."""
import pytest

from ssd.config import EngineConfig, RequestOptions, SamplingParams, SpeculationConfig
from ssd.engine import AREngine
from ssd.models.loader import load_model
from ssd.models.draft import DraftDescription
from engine_support import in_process

PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1], [3, 0, 1]]


def _cfg(mode="ssd", **spec):
    # gate=False: every step speculates (the paths tested here; the gate is tested in test_greedy_lossless.py)
    return EngineConfig(mode=mode, max_batch=8, max_model_len=64, target_threads=1, draft_threads=1,
                        speculation=SpeculationConfig(gate=False, num_speculative_tokens=3, fan_out_budget=4,
                                                      critical_batch_size=100, **spec))


@pytest.fixture(scope="module")
def target(small_pair):
    return load_model(small_pair[0])[0]


def test_modes_side_by_side_greedy_identical(small_pair, target):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = [s.output_ids for s in AREngine(_cfg("ar"), target, (3,)).generate(PROMPTS * 3, params)]
    modes = ["ar"] * 4 + ["sd"] * 4 + ["ssd"] * 4
    with in_process(_cfg(), target, DraftDescription(str(small_pair[1])), (3,)) as eng:
        seqs = [eng.add_request(p, params, RequestOptions(mode=m)) for p, m in zip(PROMPTS * 3, modes)]
        while eng.has_unfinished():
            eng.step()
        assert eng.draft_alive, eng.draft_error
    assert [s.output_ids for s in seqs] == ref
    ar, sd, ssd = seqs[:4], seqs[4:8], seqs[8:]
    assert all(s.spec_stats.num_drafts == 0 and s.spec_stats.num_rounds == 29 for s in ar)
    assert all(s.spec_stats.num_drafts > 0 and s.spec_stats.cache_hit + s.spec_stats.cache_late == 0 for s in sd)
    assert sum(s.spec_stats.cache_hit + s.spec_stats.cache_late for s in ssd) > 0
    assert sum(s.spec_stats.num_accepted_tokens for s in sd) > 0


def test_rounds_of_ar_requests_alone_keep_the_draft(small_pair, target):
    """A round in which every request is served as AR asks the draft for nothing; the draft
    answers with its (empty) cache reply only, and the target must not take that for a protocol
    error (which used to drop the draft and leave SSD requests to the backup)."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with in_process(_cfg(), target, DraftDescription(str(small_pair[1])), (3,)) as eng:
        first = eng.add_request(PROMPTS[0], params, RequestOptions(mode="ar"))
        while not first.finished:
            eng.step()
            assert eng.draft_alive, eng.draft_error
        later = eng.add_request(PROMPTS[1], params, RequestOptions(mode="ssd"))
        while eng.has_unfinished():
            eng.step()
        assert eng.draft_alive, eng.draft_error
    assert later.spec_stats.cache_hit + later.spec_stats.cache_late > 0 and eng.stats.n_backup == 0


def test_sampled_ar_request_equals_the_ar_engine(small_pair, target):
    params = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=100 + i) for i in range(4)]
    ref = [s.output_ids for s in AREngine(_cfg("ar"), target, (3,)).generate(PROMPTS, params)]
    with in_process(_cfg(), target, DraftDescription(str(small_pair[1])), (3,)) as eng:
        seqs = [eng.add_request(p, sp, RequestOptions(mode="ar")) for p, sp in zip(PROMPTS, params)]
        others = [eng.add_request(p, SamplingParams(temperature=1.0, max_tokens=20, seed=7)) for p in PROMPTS]
        while eng.has_unfinished():
            eng.step()
    assert [s.output_ids for s in seqs] == ref
    assert all(len(s.output_ids) > 0 for s in others)


def test_draft_builds_no_cache_for_sd_requests(small_pair):
    from ssd.engine.draft_runner import DraftRunner
    from ssd.engine.draft_worker import RoundServer
    from ssd.engine.protocol import AddSequence, CacheKeys, JitReply, RoundRequest
    from ssd.models.draft import load_draft

    runner = DraftRunner(load_draft(DraftDescription(str(small_pair[1]))), _cfg().speculation, max_seqs=4, max_model_len=64)
    server, sent = RoundServer(runner), []
    ops = [AddSequence(1, [0, 1, 2], SamplingParams(), RequestOptions(mode="sd")),
           AddSequence(2, [0, 1, 2], SamplingParams())]
    server.handle(RoundRequest(0, ops, jit_ids=[1, 2]), sent.append, lambda: False, None)
    assert set(next(m for m in sent if isinstance(m, JitReply)).speculations) == {1, 2}
    keys = next(m for m in sent if isinstance(m, CacheKeys)).keys
    assert 2 in keys and 1 not in keys
