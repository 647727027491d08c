"""The speculation index inside the SSD engine: a repeated request finds the first one's draft
work by content (no JIT wait), output unchanged; aborted requests free their entries."""
from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.models.loader import load_model
from ssd.speculation.index import LocalIndex
from ssd.models.draft import DraftDescription
from engine_support import in_process

PROMPT = [0, 1, 2, 1]


def _cfg():
    # gate=False: every step speculates (the paths tested here; the gate is tested in test_greedy_lossless.py)
    return EngineConfig(mode="ssd", max_batch=4, max_model_len=64,
                        speculation=SpeculationConfig(gate=False, num_speculative_tokens=2, fan_out_budget=2, critical_batch_size=100))


def test_retry_hits_the_index_and_output_is_unchanged(small_pair):
    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    index = LocalIndex()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with in_process(_cfg(), target, DraftDescription(str(d_dir)), (3,), index=index) as eng:
        first = eng.generate([PROMPT], params)[0].output_ids
        jit_first, index_first = eng.stats.n_jit, eng.stats.index_hit
        assert index_first == 0 and len(index) > 0
        second = eng.generate([PROMPT], params)[0].output_ids
        assert second == first
        assert eng.stats.index_hit > 0
        assert eng.stats.n_jit - jit_first < jit_first  # the retry waited for the draft less often


def test_abort_frees_index_entries(small_pair):
    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    index = LocalIndex()
    with in_process(_cfg(), target, DraftDescription(str(d_dir)), (3,), index=index) as eng:
        seq = eng.add_request(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
        for _ in range(4):
            eng.step()
        assert len(index) > 0
        eng.abort(seq)
        assert len(index) == 0


def test_the_engines_own_index_keeps_entries_index_ttl_s(small_pair):
    """No index passed: the engine's in-process map keeps a speculation --index-ttl-s seconds; a
    retry after that finds nothing of the first request's (output unchanged all the same)."""
    import time

    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with in_process(_cfg().replace(index_ttl_s=0.5), target, DraftDescription(str(d_dir)), (3,)) as eng:
        assert eng.index.ttl_s == 0.5
        first = eng.generate([PROMPT], params)[0].output_ids
        time.sleep(0.6)
        assert eng.generate([PROMPT], params)[0].output_ids == first
        assert eng.stats.index_hit == 0
