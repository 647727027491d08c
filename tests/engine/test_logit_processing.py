"""Penalties, logit_bias, min_tokens and logprobs: applied to the target's distribution the same
way in AR, SD and SSD, so speculation stays exact for the adjusted distribution.

`reference_adjust` is an independent, one-position-at-a-time statement of the semantics
(ssd/sampling.py adjust_logits is the vectorised one used in verify blocks)."""
import itertools
import math

import pytest
import torch

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SDEngine
from ssd.models.loader import load_model
from ssd.sampling import adjust_logits, process_logits
from ssd.models.draft import DraftDescription

from sampling_support import ALPHA, N_OUT, PROMPT, chi_square_pvalue
from engine_support import in_process

EOS = (3,)
PENALISED = dict(presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.4, logit_bias={1: 0.8, 2: -0.6})


def reference_adjust(row: list[float], params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    x = list(row)
    for v in range(len(x)):
        n = output.count(v)
        if params.repetition_penalty != 1.0 and (n or v in prompt):
            x[v] = x[v] / params.repetition_penalty if x[v] > 0 else x[v] * params.repetition_penalty
        x[v] -= params.frequency_penalty * n + params.presence_penalty * (n > 0)
    for t, b in params.logit_bias:
        x[t] += b
    if len(output) < params.min_tokens and not params.ignore_eos:
        for t in EOS:
            x[t] = -math.inf
    return x


def test_adjust_logits_matches_the_per_position_reference():
    g = torch.Generator().manual_seed(0)
    vocab = 12
    params = SamplingParams(temperature=1.0, max_tokens=20, min_tokens=6, **PENALISED)
    prompt, output, drafted = [5, 7, 7, 1], [2, 9, 2, 3], [9, 4, 4, 11]
    logits = torch.randn(len(drafted) + 1, vocab, generator=g) * 3
    got = adjust_logits(logits, params, prompt, output, drafted, EOS)
    for i in range(len(drafted) + 1):
        want = reference_adjust(logits[i].tolist(), params, prompt, output + drafted[:i])
        assert got[i].tolist() == pytest.approx(want, abs=1e-5), i
    # rows 0 and 1 are before min_tokens (4 and 5 generated), rows 2.. are not
    assert got[1, 3] == -math.inf and got[2, 3] > -math.inf
    assert adjust_logits(logits, SamplingParams(), prompt, output, drafted, EOS) is logits  # nothing to adjust


def test_sampling_params_refuse_bad_values():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")), dict(repetition_penalty=0.0),
                dict(logit_bias={1: 101.0}), dict(logit_bias={-1: 1.0}), dict(min_tokens=200), dict(logprobs=21),
                dict(logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(logit_bias={5: 1.0, 2: -1.0}).logit_bias == ((2, -1.0), (5, 1.0))


def _cfg(mode):
    # gate=False: every step speculates (the paths tested here; the gate is tested in test_greedy_lossless.py)
    return EngineConfig(mode=mode, max_batch=8, max_model_len=48, target_threads=1, draft_threads=1,
                        speculation=SpeculationConfig(gate=False, num_speculative_tokens=3, fan_out_budget=4, critical_batch_size=100))


@pytest.fixture(scope="module")
def models(small_pair):
    t_dir, d_dir, hf = small_pair
    return t_dir, d_dir, hf, load_model(t_dir)[0], load_model(d_dir)[0]


def _generate(mode, models, prompts, params):
    t_dir, d_dir, hf, target, draft = models
    if mode == "ar":
        return AREngine(_cfg("ar"), target, EOS).generate(prompts, params)
    if mode == "sd":
        return SDEngine(_cfg("sd"), target, draft, EOS).generate(prompts, params)
    with in_process(_cfg("ssd"), target, DraftDescription(str(d_dir)), EOS) as eng:
        seqs = eng.generate(prompts, params)
        assert eng.stats.num_accepted_tokens > 0
        return seqs


PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1], [3, 0, 1], [0, 0]]


def test_greedy_adjusted_output_and_logprobs_identical_in_ar_sd_ssd(models):
    params = [SamplingParams(max_tokens=24, min_tokens=10, logprobs=2, **PENALISED),
              SamplingParams(max_tokens=24, logprobs=0, logit_bias={0: -100.0}),
              SamplingParams(max_tokens=24, min_tokens=24),
              SamplingParams(max_tokens=24, repetition_penalty=1.8, logprobs=3),
              SamplingParams(max_tokens=24)]
    runs = {m: _generate(m, models, PROMPTS, params) for m in ("ar", "sd", "ssd")}
    ref = runs["ar"]
    for m in ("sd", "ssd"):
        assert [s.output_ids for s in runs[m]] == [s.output_ids for s in ref], m
        assert [s.logprobs for s in runs[m]] == [s.logprobs for s in ref], m  # bit-identical target rows
    plain = AREngine(_cfg("ar"), models[3], EOS).generate(PROMPTS, [SamplingParams(max_tokens=24)] * len(PROMPTS))
    assert [s.output_ids for s in ref] != [s.output_ids for s in plain]  # the adjustments changed something
    assert 3 not in ref[0].output_ids[:10] and 3 not in ref[2].output_ids[:23]  # min_tokens
    assert 0 not in ref[1].output_ids  # a -100 bias removes the token
    assert len(ref[0].logprobs) == len(ref[0].output_ids) and all(len(alts) == 2 for _, alts in ref[0].logprobs)
    assert ref[4].logprobs == []  # not asked


def test_logprobs_are_the_targets_own(models):
    """Each committed token's log-probability is the target's log-softmax at its position
    (a full forward of prompt + output, in Hugging Face's implementation), raw: before the
    request's penalties and temperature; alternatives are the most likely tokens, in order."""
    hf = models[2]
    params = SamplingParams(temperature=0.8, max_tokens=12, seed=5, logprobs=3, ignore_eos=True, **PENALISED)
    (seq,) = _generate("ssd", models, [PROMPTS[0]], [params])
    ids = torch.tensor([seq.prompt_ids + seq.output_ids])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0, len(seq.prompt_ids) - 1: -1].float(), -1)
    for i, (t, (got, alts)) in enumerate(zip(seq.output_ids, seq.logprobs)):
        assert got == pytest.approx(float(lp[i, t]), abs=1e-4)
        want = torch.topk(lp[i], 3)
        assert [a for a, _ in alts] == want.indices.tolist()
        assert [v for _, v in alts] == pytest.approx(want.values.tolist(), abs=1e-4)


def _exact_adjusted(hf, params):
    """Exact joint distribution of the first N_OUT tokens under params (penalties applied by
    the reference, position by position)."""
    vocab = hf.config.vocab_size
    seqs = list(itertools.product(range(vocab), repeat=N_OUT))
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + list(s) for s in seqs])).logits[:, len(PROMPT) - 1: -1]
    out = {}
    for s, rows in zip(seqs, logits):
        p = 1.0
        for i, t in enumerate(s):
            adj = torch.tensor(reference_adjust(rows[i].tolist(), params, PROMPT, list(s[:i])))
            p *= float(process_logits(adj, params)[t])
        out[s] = p
    return out


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_sampled_penalised_output_is_distributed_as_the_adjusted_target(models, mode):
    base = SamplingParams(temperature=1.0, max_tokens=N_OUT, ignore_eos=True, **PENALISED)
    n = 3000
    params = [SamplingParams(**{**base.__dict__, "seed": i}) for i in range(n)]
    t_dir, d_dir, hf, target, draft = models
    cfg = _cfg(mode).replace(max_batch=64)
    if mode == "sd":
        eng = SDEngine(cfg, target, draft, EOS)
        seqs = eng.generate([PROMPT] * n, params)
    else:
        with in_process(cfg, target, DraftDescription(str(d_dir)), EOS) as eng:
            seqs = eng.generate([PROMPT] * n, params)
    assert 0.1 < eng.stats.summary()["acceptance_rate"] < 0.95
    samples = [tuple(s.output_ids) for s in seqs]
    assert chi_square_pvalue(samples, _exact_adjusted(hf, base)) > ALPHA
    # the same test sees the difference to the unadjusted target (it has the power to fail)
    plain = SamplingParams(temperature=1.0, max_tokens=N_OUT, ignore_eos=True)
    assert chi_square_pvalue(samples, _exact_adjusted(hf, plain)) < ALPHA


def test_cli_logit_bias_flag_parses_pairs():
    import argparse

    from ssd.cli import _pairs

    assert _pairs("5:-100,17:2.5") == ((5, -100.0), (17, 2.5))
    assert SamplingParams(logit_bias=_pairs("9:1,2:-3")).logit_bias == ((2, -3.0), (9, 1.0))
    with pytest.raises(argparse.ArgumentTypeError):
        _pairs("abc")
