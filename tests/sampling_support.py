"""What the sampled-lossless tests share (tests/engine/test_sampling_lossless.py and the tests
that reuse its method): the exact target distribution of the first N_OUT output tokens of a
small-vocabulary model, and a chi-square test of samples against it."""
import itertools

import torch
from scipy.stats import chisquare

from ssd.config import SamplingParams
from ssd.sampling import process_logits

ALPHA = 1e-3
N_OUT = 4  # output tokens whose joint distribution is tested
N_SAMPLES = 4000
PROMPT = [0, 1, 2]


def exact_distribution(hf, params):
    V = hf.config.vocab_size
    seqs = list(itertools.product(range(V), repeat=N_OUT))
    ids = torch.tensor([PROMPT + list(s) for s in seqs])
    with torch.no_grad():
        logits = hf(ids).logits[:, len(PROMPT) - 1 : -1]  # [S, N_OUT, V]
    probs = process_logits(logits, params)
    tok = torch.tensor(seqs)
    joint = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1).double().prod(-1)
    return {s: float(p) for s, p in zip(seqs, joint)}


def chi_square_pvalue(samples, exact):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    n = len(samples)
    cells = sorted(exact, key=exact.get, reverse=True)
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for c in cells:  # pool cells expected below 5 into one
        if exact[c] * n >= 5:
            obs.append(counts.get(c, 0))
            exp.append(exact[c] * n)
        else:
            rest_o += counts.get(c, 0)
            rest_e += exact[c] * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    scale = sum(obs) / sum(exp)
    return chisquare(obs, [e * scale for e in exp]).pvalue


def params_list(base, seeded: bool = False):
    """Unseeded: rejection sampling (the streams come from fresh_seed, made reproducible by the
    fixture below). Seeded: coupled verification (ssd/sampling.py coupled_scores)."""
    return [SamplingParams(temperature=base.temperature, top_k=base.top_k, top_p=base.top_p,
                           max_tokens=N_OUT, ignore_eos=True, seed=i if seeded else None) for i in range(N_SAMPLES)]
