"""A request that fails inside a step (its own sampling parameters or numbers) ends alone with
finish reason "error"; every other sequence of the batch finishes exactly as without it."""
import pytest

import ssd.engine.base as base
from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SDEngine
from ssd.models.loader import load_model
from ssd.models.draft import DraftDescription

from engine_support import in_process

PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1], [3, 0, 1]]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
BROKEN_SEED = 666


def _cfg(mode):
    return EngineConfig(mode=mode, max_batch=8, max_model_len=64, target_threads=1, draft_threads=1,
                        speculation=SpeculationConfig(num_speculative_tokens=3, fan_out_budget=4, critical_batch_size=100))


@pytest.fixture
def broken_sampler(monkeypatch):
    """process_logits raises for the request seeded BROKEN_SEED (a stand-in for any per-request
    failure: a bad value that slipped past validation, a numeric blow-up)."""
    real = base.process_logits

    def process(logits, params):
        if params.seed == BROKEN_SEED:
            raise FloatingPointError("injected failure")
        return real(logits, params)
    monkeypatch.setattr(base, "process_logits", process)


def _engine(mode, small_pair, target):
    if mode == "ar":
        return AREngine(_cfg("ar"), target, (3,))
    if mode == "sd":
        return SDEngine(_cfg("sd"), target, load_model(small_pair[1])[0], (3,))
    return in_process(_cfg("ssd"), target, DraftDescription(str(small_pair[1])), (3,))


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
@pytest.mark.parametrize("fail_after", [0, 5])  # at the prefill, or mid-generation
def test_a_failing_sequence_ends_alone(small_pair, broken_sampler, monkeypatch, mode, fail_after):
    target = load_model(small_pair[0])[0]
    ref = [s.output_ids for s in AREngine(_cfg("ar"), target, (3,)).generate(PROMPTS, GREEDY)]
    sampled = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=5)  # verified beside the failing one
    with _engine(mode, small_pair, target) as eng:
        sampled_ref = eng.generate([[1, 2]], sampled)[0].output_ids
    bad = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=BROKEN_SEED + (1 if fail_after else 0))
    with _engine(mode, small_pair, target) as eng:
        good = [eng.add_request(p, GREEDY) for p in PROMPTS[:2]]
        failing = eng.add_request([0, 2], bad)
        neighbour = eng.add_request([1, 2], sampled)
        good += [eng.add_request(p, GREEDY) for p in PROMPTS[2:]]
        steps = 0
        while eng.has_unfinished():
            if steps == fail_after and fail_after:  # from now on its sampling breaks
                object.__setattr__(failing.params, "seed", BROKEN_SEED)
            eng.step()
            steps += 1
        if mode == "ssd":
            assert eng.draft_alive, eng.draft_error
    assert [s.output_ids for s in good] == ref
    assert failing.finish_reason == "error" and "injected failure" in failing.error
    assert all(s.finish_reason == "length" for s in good + [neighbour])
    if mode != "ssd":  # SSD's sampled draft stream depends on timing (README: Seeds)
        assert neighbour.output_ids == sampled_ref
