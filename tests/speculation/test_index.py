import time

from ssd.speculation.index import LocalIndex, context_key


def test_key_depends_on_context_draft_and_sampling():
    k = context_key([1, 2, 3], "draft-a", ("greedy",), 4)
    assert k == context_key([1, 2, 3], "draft-a", ("greedy",), 4)
    assert k != context_key([1, 2, 4], "draft-a", ("greedy",), 4)
    assert k != context_key([1, 2, 3], "draft-b", ("greedy",), 4)
    assert k != context_key([1, 2, 3], "draft-a", (0.7, 0, 1.0), 4)
    assert k != context_key([1, 2, 3], "draft-a", ("greedy",), 3)


def test_local_index_ttl_eviction_and_counters():
    idx = LocalIndex(ttl_s=0.2, max_entries=2)
    idx.put_many({"a": [1], "b": [2]})
    assert idx.get_many(["a", "b", "c"]) == [[1], [2], None]
    idx.put_many({"c": [3]})  # evicts the oldest
    assert len(idx) == 2 and idx.get_many(["a"]) == [None]
    time.sleep(0.25)
    assert idx.get_many(["b", "c"]) == [None, None]
    assert idx.counters.hit == 2 and idx.counters.miss == 4 and idx.counters.stored == 3
    idx.put_many({"d": [4]})
    idx.delete_many(["d"])
    assert idx.get_many(["d"]) == [None]
