"""The typed round protocol (ssd/engine/protocol.py) survives the trip through ssd.proto: every
message and field the engine sends or receives comes back equal."""
import pickle

import pytest
import torch

from ssd.config import Mode, RequestOptions, SamplingParams
from ssd.engine.protocol import (AddSequence, Advance, CachedBranches, CacheKeys, CacheReply, JitReply, Release,
                                 RoundRequest, Speculation)
from ssd.services.convert import reply_from_pb, reply_to_pb, round_from_pb, round_to_pb

K, V = 2, 11


def test_round_request_round_trips():
    msg = RoundRequest(7, [AddSequence(3, [1, 2, 3], SamplingParams(temperature=0.5, top_p=0.9, max_tokens=9, seed=4),
                                       RequestOptions(mode="sd", request_id="r", traceparent="00-ab-cd-01")),
                           Advance(1, [4, 5]), Release(2, "abort"), Release(5, "length")],
                       jit_ids=[3, 4], backups={1: [6, 7]}, hit_ids=[9, 10], jit_k={3: 1}, fan_out_budget=5,
                       hit_k={10: 2})
    back = round_from_pb(round_to_pb(msg), int)
    # the draft keeps only what it needs of a release: whether it was an abort
    assert back == RoundRequest(7, [msg.ops[0], msg.ops[1], Release(2, "abort"), Release(5, None)], [3, 4], {1: [6, 7]},
                                [9, 10], {3: 1}, 5, {10: 2})
    plain = round_from_pb(round_to_pb(RoundRequest(8, jit_ids=[3])), int)  # not adaptive: K and the draft's own budget
    assert plain.jit_k == {} and plain.fan_out_budget == 0 and plain.hit_k == {}
    for field, key, value in (("jit_k", "3", 0), ("hit_k", "10", -1), ("jit_k", "9", 2), ("hit_k", "3", 1)):
        bad = round_to_pb(msg)
        getattr(bad, field)[key] = value  # a length below 1, or for a sequence the round does not name so
        with pytest.raises(ValueError, match="jit_k / hit_k"):
            round_from_pb(bad, int)


def test_replies_round_trip_with_q_rows():
    q = torch.zeros(3, K, V)
    q[..., :4] = torch.rand(3, K, 4)
    cache = CacheReply(4, {8: CachedBranches({(0, 1): 0, (1, 5): 1, (2, 3): 2}, [[1, 2], [3, 4], [5, 6]], ("inline", q))}, 0.25)
    back = reply_from_pb(reply_to_pb(cache, str, V)[0], K, V)
    assert back.round_id == 4 and back.seconds == 0.25 and set(back.entries) == {8}
    e = back.entries[8]
    assert e.keys == cache.entries[8].keys and e.token_ids == cache.entries[8].token_ids and torch.equal(e.q_ref[1], q)
    jit = JitReply(4, {8: Speculation([1, 2], ("inline", q[0])), 9: Speculation([3, 4])}, 0.5)
    back = reply_from_pb(reply_to_pb(jit, str, V)[0], K, V)
    assert back.speculations[9] == Speculation([3, 4]) and torch.equal(back.speculations[8].q_ref[1], q[0])
    keys = CacheKeys(4, {8: [(0, 1), (2, 3)]})
    assert reply_from_pb(reply_to_pb(keys, str, V)[0], K, V) == keys
    assert reply_from_pb(reply_to_pb(CacheReply(4, None, 0.1), str, V)[0], K, V) == CacheReply(4, None, 0.1)


def test_short_adaptive_speculations_keep_one_q_row_per_token():
    """An adaptive JIT speculation may hold fewer than K tokens: its q rows come back with it,
    inline and on the tensor channel (padded there to K rows and cut back)."""
    q_short, q_full = torch.rand(1, V), torch.rand(K, V)
    jit = JitReply(3, {8: Speculation([5], ("inline", q_short)), 9: Speculation([1, 2], ("inline", q_full))}, 0.1)
    back = reply_from_pb(reply_to_pb(jit, str, V)[0], K, V)
    assert torch.equal(back.speculations[8].q_ref[1], q_short) and torch.equal(back.speculations[9].q_ref[1], q_full)
    resp, rows = reply_to_pb(jit, str, V, channel=True, k=K)
    assert rows.shape == (2, K, V) and not rows[0, 1].any()
    back = reply_from_pb(resp, K, V, rows)
    assert torch.equal(back.speculations[8].q_ref[1], q_short) and torch.equal(back.speculations[9].q_ref[1], q_full)
    resp, _ = reply_to_pb(jit, str, V)
    resp.jit.items[0].draft_probs = resp.jit.items[0].draft_probs[:-4]  # a row cut short is refused, not misread
    with pytest.raises(ValueError, match="q rows"):
        reply_from_pb(resp, K, V)


@pytest.mark.parametrize("damage, message", [
    (lambda r, rows: r.jit.items[1].draft_token_ids.append(7), "longer than K"),
    (lambda r, rows: setattr(r, "channel_rows", 3), "channel rows"),
    (lambda r, rows: r.jit.items[0].ClearField("channel_probs"), "channel rows"),
    (lambda r, rows: r.channel_support.append(V), "outside the vocabulary"),
])
def test_malformed_replies_are_refused(damage, message):
    """What a draft sends is checked before the engine reads it: the link turns the ValueError
    into the loss of that draft (tests/services/test_draft_service.py)."""
    q = torch.rand(K, V)
    q[:, 3:] = 0  # columns nobody proposes: the channel support is listed
    jit = JitReply(3, {8: Speculation([5], ("inline", q[:1])), 9: Speculation([1, 2], ("inline", q))}, 0.1)
    resp, rows = reply_to_pb(jit, str, V, channel=True, k=K)
    assert list(resp.channel_support) == [0, 1, 2]
    damage(resp, rows)
    with pytest.raises(ValueError, match=message):
        reply_from_pb(resp, K, V, rows)
    with pytest.raises(ValueError, match="depth"):
        reply_to_pb(jit, str, V, channel=True)  # the padded slots need K


def test_messages_pickle_for_the_process_pipe():
    msg = RoundRequest(1, [AddSequence(1, [1], SamplingParams())], [1])
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_request_options_take_a_mode_by_name_and_refuse_others():
    assert RequestOptions(mode="sd").mode is Mode.SD and RequestOptions().mode is None
    assert Mode.AR == "ar" and str(Mode.SSD) == "ssd"
    with pytest.raises(ValueError, match="mode must be one of"):
        RequestOptions(mode="fast")
