"""The typed round protocol (ssd/engine/protocol.py) survives the trip through ssd.proto: every
message and field the engine sends or receives comes back equal."""
import pickle

import torch

from ssd.config import SamplingParams
from ssd.engine.protocol import (AddSequence, Advance, CachedBranches, CacheKeys, CacheReply, JitReply, Release,
                                 RoundRequest, Speculation)
from ssd.services.convert import reply_from_pb, reply_to_pb, round_from_pb, round_to_pb

K, V = 2, 11


def test_round_request_round_trips():
    msg = RoundRequest(7, [AddSequence(3, [1, 2, 3], SamplingParams(temperature=0.5, top_p=0.9, max_tokens=9, seed=4),
                                       {"request_id": "r", "traceparent": "00-ab-cd-01"}),
                           Advance(1, [4, 5]), Release(2, "abort"), Release(5, "length")],
                       jit_ids=[3], backups={1: [6, 7]}, hit_ids=[9])
    back = round_from_pb(round_to_pb(msg), int)
    # the draft keeps only what it needs of a release: whether it was an abort
    assert back == RoundRequest(7, [msg.ops[0], msg.ops[1], Release(2, "abort"), Release(5, None)], [3], {1: [6, 7]}, [9])


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


def test_messages_pickle_for_the_process_pipe():
    msg = RoundRequest(1, [AddSequence(1, [1], SamplingParams())], [1])
    assert pickle.loads(pickle.dumps(msg)) == msg
