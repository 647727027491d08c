"""A step that asks the draft for nothing (the gate's plain steps) sends it nothing: it costs what
an AR step costs. Its ops (committed tokens) reach the draft, in order, with the next round that
asks for a speculation, and greedy output stays AR's."""
from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, SSDEngine
from ssd.engine.draft_link import ThreadDraftLink
from ssd.engine.protocol import Advance, RoundRequest
from ssd.models.draft import DraftDescription
from ssd.models.loader import load_model
from ssd.speculation.adaptive import SpeculationGate

PROMPT = [0, 1, 2, 1]


def test_plain_steps_send_the_draft_nothing_and_it_catches_up_after(small_pair, monkeypatch):
    t_dir, d_dir, _ = small_pair
    target, _ = load_model(t_dir)
    cfg = EngineConfig(mode="ssd", max_batch=2, max_model_len=64,
                       speculation=SpeculationConfig(num_speculative_tokens=2, fan_out_budget=2, critical_batch_size=100))
    arms = ["spec"] * 3 + ["plain"] * 5 + ["spec"] * 200
    taken = iter(arms)
    sent = []
    at_choice = []  # messages sent before each step's choice

    def choose(self, key):
        at_choice.append(len(sent))
        return next(taken)

    monkeypatch.setattr(SpeculationGate, "choose", choose)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    desc = DraftDescription(str(d_dir))
    link = ThreadDraftLink(desc, cfg.speculation, cfg.max_batch, cfg.max_model_len)
    real_send = link.send
    link.send = lambda msg: (sent.append(msg), real_send(msg))[1]
    with SSDEngine(cfg, target, desc, (3,), link=link) as eng:
        out = eng.generate([PROMPT], params)[0].output_ids
        steps = eng.stats.steps
    assert out == AREngine(cfg.replace(mode="ar"), target, (3,)).generate([PROMPT], params)[0].output_ids
    is_round = lambda m: isinstance(m, RoundRequest) and bool(m.jit_ids or m.hit_ids or m.backups)  # noqa: E731
    # the five plain steps (choices 3..7) send no round; a speculating step sends at most one (it
    # sends none where adaptive K, which follows measured costs, gives it nothing to ask)
    per_step = [sum(map(is_round, sent[a:b])) for a, b in zip(at_choice, at_choice[1:] + [len(sent)])]
    assert per_step[3:8] == [0] * 5 and max(per_step) <= 1 and len(per_step) == steps
    assert not [m for m in sent[at_choice[3]:at_choice[8]] if isinstance(m, RoundRequest)]  # not even an empty one
    # the first round after the plain steps brings the draft every token they committed, in order
    resumed = next(m for m in sent[at_choice[8]:] if is_round(m))
    advances = [op for op in resumed.ops if isinstance(op, Advance)]
    assert len(advances) >= 5 and all(len(op.tokens) == 1 for op in advances[-5:])
