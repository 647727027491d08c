"""A feature drafter (it reads the target's hidden states) in every engine path: in process (SD),
in the draft process (SSD), greedy identical to AR and sampled exactly as the target; the
runner's bookkeeping of true and self-fed features."""
import pytest
import torch

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SDEngine
from ssd.engine.draft_runner import DraftRunner, Verifying
from ssd.engine.protocol import Features
from ssd.models.draft import DraftDescription, load_draft
from ssd.models.loader import load_model
from engine_support import in_process

PROMPTS = [[0, 1, 2], [2, 2, 1, 0], [1], [3, 0, 1, 1, 2]]
GREEDY = SamplingParams(max_tokens=30, ignore_eos=True)


def _cfg(mode, **spec):
    # gate=False: every step speculates (the paths tested here; the gate is tested in test_greedy_lossless.py)
    return EngineConfig(mode=mode, max_batch=4, max_model_len=64, target_threads=1, draft_threads=1,
                        speculation=SpeculationConfig(gate=False, num_speculative_tokens=3, fan_out_budget=4, **spec))


@pytest.fixture(scope="module")
def setup(small_pair, small_feature_draft):
    t_dir = small_pair[0]
    target, tcfg = load_model(t_dir)
    desc = DraftDescription(str(small_feature_draft), str(t_dir))
    ref = [s.output_ids for s in AREngine(_cfg("ar"), target, (3,)).generate(PROMPTS, GREEDY)]
    return target, desc, ref


def test_feature_drafter_loads_with_its_target(setup):
    _, desc, _ = setup
    draft = load_draft(desc)
    assert draft.kind == "feature" and draft.feature_layers == (0, 1)
    assert "feature drafter" in desc.describe()
    with pytest.raises(ValueError, match="target"):
        load_draft(DraftDescription(desc.path))  # no target: no embedding, no head


def test_sd_greedy_identical_to_ar(setup):
    target, desc, ref = setup
    eng = SDEngine(_cfg("sd"), target, load_draft(desc), (3,))
    assert eng.target.capture == (0, 1)
    out = [s.output_ids for s in eng.generate(PROMPTS, GREEDY)]
    assert out == ref
    per_pos = eng.stats.accepted_per_pos
    assert per_pos[0] > 0 and per_pos[1] > 0  # rounds that accepted two or more: several feature rows per advance


def test_ssd_greedy_identical_to_ar(setup):
    target, desc, ref = setup
    with in_process(_cfg("ssd", critical_batch_size=100), target, desc, (3,)) as eng:
        out = [s.output_ids for s in eng.generate(PROMPTS, GREEDY)]
        st = eng.stats
        assert eng.draft_alive, eng.draft_error
    assert out == ref
    assert st.cache_hit + st.cache_late > 0 and st.n_jit > 0 and st.accepted_per_pos[1] > 0


def test_ssd_with_backups_greedy_identical_to_ar(setup):
    """At or above b* the fast backup speculates: the drafter builds on tokens it did not draft
    (its self-fed inputs come from a sequential chain)."""
    target, desc, ref = setup
    with in_process(_cfg("ssd", critical_batch_size=1), target, desc, (3,)) as eng:
        out = [s.output_ids for s in eng.generate(PROMPTS, GREEDY)]
        assert eng.draft_alive, eng.draft_error
        assert eng.stats.n_backup > 0
    assert out == ref


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_sampled_matches_target_distribution(small_pair, setup, mode):
    from sampling_support import ALPHA, PROMPT, chi_square_pvalue, exact_distribution, params_list

    target, desc, _ = setup
    base = SamplingParams(temperature=1.0)
    cfg = EngineConfig(mode=mode, max_batch=64, max_model_len=32, target_threads=1, draft_threads=1,
                       speculation=SpeculationConfig(gate=False, num_speculative_tokens=2, fan_out_budget=4))
    eng = SDEngine(cfg, target, load_draft(desc), (3,)) if mode == "sd" else in_process(cfg, target, desc, (3,))
    with eng:
        seqs = eng.generate([PROMPT] * 4000, params_list(base))
        assert eng.stats.num_accepted_tokens > 0
    samples = [tuple(s.output_ids) for s in seqs]
    assert chi_square_pvalue(samples, exact_distribution(small_pair[2], base)) > ALPHA


def test_runner_takes_true_features_and_refeeds_selffed_positions(setup):
    target, desc, _ = setup
    draft = load_draft(desc)
    spec = SpeculationConfig(gate=False, num_speculative_tokens=3, fan_out_budget=4)
    r = DraftRunner(draft, spec, max_seqs=2, max_model_len=64)
    F = draft.feature_size
    feats = torch.randn(3, F)
    with pytest.raises(ValueError, match="features"):
        r.add(1, [0, 1, 2, 3], SamplingParams())  # none sent
    with pytest.raises(ValueError, match="shape"):
        r.add(1, [0, 1, 2, 3], SamplingParams(), Features.of(feats[:2]))
    r.add(1, [0, 1, 2, 3], SamplingParams(), Features.of(feats))
    s = r.seqs[1]
    with torch.inference_mode():
        want = draft.project(Features.of(feats).tensor())
    torch.testing.assert_close(s.gin[1:4], want)
    assert float(s.gin[0].abs().sum()) == 0.0
    drafted = r.jit([1])[1][0].tolist()
    assert s.draft_len == 4 + 3 - 1
    more = torch.randn(3, F)  # two accepted + one recovery: rows for positions 3, 4, 5
    r.on_outcome(1, drafted[:2] + [0], Features.of(more))
    assert s.draft_len == 4  # the accepted positions were fed self-fed: fed again, true
    with torch.inference_mode():
        torch.testing.assert_close(s.gin[4:7], draft.project(Features.of(more).tensor()))


def test_features_travel_as_exact_bytes():
    t = torch.randn(5, 7).to(torch.bfloat16)
    f = Features.of(t)
    assert isinstance(f.data, bytes) and (f.rows, f.cols) == (5, 7)
    assert torch.equal(f.tensor(), t)
    with pytest.raises(ValueError):
        Features(f.data[:-2], 5, 7).tensor()


def _reference_proposals(draft, ctx, g_true, c, K):
    """Greedy proposals after `ctx`, one token at a time through a fresh cache: positions < c read
    the target's features (g_true[p-1]), positions >= c the drafter's own previous output."""
    from ssd.kv_cache import append_batch

    cache = draft.new_cache(1, len(ctx) + K + 2)
    last, out = None, []
    seq = list(ctx)
    for p in range(len(ctx) + K):
        gp = torch.zeros(1, 1, draft.cfg.hidden_size) if p == 0 else (
            g_true[p - 1][None, None] if p < c else last[None, None])
        lg, h = draft(torch.tensor([[seq[p]]]), gp, append_batch([0], [p], [1]), cache)
        last = h[0, -1]
        if p >= len(ctx) - 1:
            tok = int(draft.head_ids[lg[0, -1].argmax()])
            out.append(tok)
            if len(out) == K:
                return out
            seq.append(tok)
    return out


def test_cache_branches_are_what_the_drafter_proposes_on_selffed_features(setup):
    """Every speculation-cache branch (k, t*) must equal the drafter's own greedy proposals after
    ctx + d_1..d_k + t* with every position past the committed context self-fed: the glue
    decode, the fork and the tree decode route the right features to the right positions."""
    _, desc, _ = setup
    draft = load_draft(desc)
    K = 3
    r = DraftRunner(draft, SpeculationConfig(gate=False, num_speculative_tokens=K, fan_out_budget=6), max_seqs=2, max_model_len=64)
    ctx = [0, 1, 2, 1, 3, 0]
    feats = torch.randn(len(ctx) - 1, draft.feature_size, generator=torch.Generator().manual_seed(5))
    r.add(7, ctx, SamplingParams(), Features.of(feats))
    with torch.inference_mode():
        g_true = draft.project(Features.of(feats).tensor())
    d = r.jit([7])[7][0].tolist()
    assert d == _reference_proposals(draft, ctx, g_true, len(ctx), K)

    def recomputed(*a):
        raise AssertionError("the drafter's own speculation was re-drafted for its self-fed inputs")
    r._selffed_chain = recomputed  # it kept the outputs it drafted them from
    entry = r.build({7: Verifying(d, "miss")})[7]
    assert len(entry.keys) >= 3
    for (k, t), j in entry.keys.items():
        branch_ctx = ctx + d[:k] + [t]
        assert entry.token_ids[j].tolist() == _reference_proposals(draft, branch_ctx, g_true, len(ctx), K), (k, t)
