"""Every way of reaching a draft speaks the one DraftLink protocol, and request errors are typed."""
import inspect

import pytest

from ssd.config import EngineConfig, SamplingParams
from ssd.engine import AREngine
from ssd.engine.draft_link import DraftLink, ProcessDraftLink
from ssd.errors import ContextTooLong, RequestError


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
