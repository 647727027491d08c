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
    monkeypatch.setattr(SpeculationGate, "choose", lambda self, key: next(taken))
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    desc = DraftDescription(str(d_dir))
    link = ThreadDraftLink(desc, cfg.speculation, cfg.max_batch, cfg.max_model_len)
    sent = []
    real_send = link.send
    link.send = lambda msg: (sent.append(msg), real_send(msg))[1]
    with SSDEngine(cfg, target, desc, (3,), link=link) as eng:
        out = eng.generate([PROMPT], params)[0].output_ids
        steps = eng.stats.steps
    assert out == AREngine(cfg.replace(mode="ar"), target, (3,)).generate([PROMPT], params)[0].output_ids
    rounds = [m for m in sent if isinstance(m, RoundRequest) and (m.jit_ids or m.hit_ids or m.backups)]
    # one round per speculating step, none for the five plain ones (the last message may be the idle flush)
    assert len(rounds) == steps - 5
    # the first round after the plain steps brings the draft every token they committed, in order
    resumed = rounds[3]
    advances = [op for op in resumed.ops if isinstance(op, Advance)]
    assert len(advances) >= 5 and all(len(op.tokens) == 1 for op in advances[-5:])
