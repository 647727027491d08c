"""Every way of reaching a draft speaks the one DraftLink protocol, and request errors are typed."""
import inspect

import pytest

from ssd.config import EngineConfig, SamplingParams
from ssd.engine import AREngine
from ssd.engine.draft_link import DraftLink, ProcessDraftLink
from ssd.errors import ContextTooLong, RequestError

pytestmark = pytest.mark.slow  # the process link: a spawned draft process


def _protocol_methods():
    return {n for n, v in vars(DraftLink).items() if inspect.isfunction(v)}


@pytest.mark.parametrize("path", ["ssd.engine.draft_link:ProcessDraftLink", "ssd.services.draft_link:GrpcDraftLink",
                                  "ssd.services.multi_draft:MultiDraftLink"])
def test_links_implement_the_protocol(path):
    import importlib

    mod, name = path.split(":")
    cls = getattr(importlib.import_module(mod), name)
    missing = {m for m in _protocol_methods() if not callable(getattr(cls, m, None))}
    assert not missing, f"{name} lacks {missing}"
    assert {"send", "recv", "ready", "q_row", "revive", "close"} <= _protocol_methods()
    assert ProcessDraftLink.revive(object.__new__(ProcessDraftLink)) is False


def test_a_prompt_over_the_context_length_is_a_typed_error(small_pair):
    from ssd.models.loader import load_model

    target = load_model(small_pair[0])[0]
    eng = AREngine(EngineConfig(mode="ar", max_model_len=16), target, (3,))
    with pytest.raises(ContextTooLong):
        eng.add_request([1] * 16, SamplingParams())
    with pytest.raises(RequestError) as e:
        eng.add_request([], SamplingParams())
    assert not isinstance(e.value, ContextTooLong)


def test_the_process_link_shares_q_rows_over_the_draft_head_only(small_pair):
    # a stand-in draft with a head of half the vocabulary: the shared buffers are that wide,
    # and a q row read back spans the vocabulary with zeros outside the head, rows summing to 1
    import torch

    from ssd.config import SpeculationConfig
    from ssd.engine.protocol import AddSequence, JitReply, RoundRequest
    from ssd.models.draft import DraftDescription

    t_dir, _, target = small_pair
    vocab = target.config.vocab_size
    h = vocab // 2
    desc = DraftDescription(str(t_dir), standin_layers=1, head_vocab=h)
    link = ProcessDraftLink(desc, SpeculationConfig(num_speculative_tokens=3, fan_out_budget=4), 2, 64, 1)
    try:
        assert link.cache_q.shape[-1] == h and link.jit_q.shape[-1] == h
        assert torch.equal(link.head_ids, torch.arange(h))
        # sequence 0 is verified by the ratio test (its q rows travel); sequence 1 is seeded
        # (coupled verification reads no q, so none is sent)
        link.send(RoundRequest(1, [AddSequence(0, [1, 2, 3], SamplingParams(temperature=1.0)),
                                   AddSequence(1, [1, 2, 3], SamplingParams(temperature=1.0, seed=3))], [0, 1]))
        reply = link.recv(timeout=60)
        while not isinstance(reply, JitReply):
            reply = link.recv(timeout=60)
        q = link.q_row(reply.speculations[0].q_ref)
        assert q.shape == (3, vocab) and torch.all(q[:, h:] == 0) and q[:, :h].sum() > 0
        torch.testing.assert_close(q.sum(-1), torch.ones(3))
        assert all(t < h for t in reply.speculations[0].token_ids)
        assert reply.speculations[1].q_ref is None and len(reply.speculations[1].token_ids) == 3
    finally:
        link.close()
