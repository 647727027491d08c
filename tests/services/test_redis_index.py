"""The speculation index on a real Redis: pipelined stores/lookups with TTL, shared between
engines (two target replicas), and a Redis that dies mid-run never fails a request."""
import shutil
import socket
import subprocess
import time

import grpc
import pytest
import redis

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import SSDEngine
from ssd.models.loader import load_model
from ssd.services.index_redis import RedisIndex
from ssd.services.protos import pb, pb_grpc
from ssd.models.draft import DraftDescription
from engine_support import in_process

PROMPT = [0, 1, 2, 1]


def _cfg():
    return EngineConfig(mode="ssd", max_batch=4, max_model_len=64,
                        speculation=SpeculationConfig(num_speculative_tokens=2, fan_out_budget=2, critical_batch_size=100,
                                                      gate=False))  # every step speculates (and publishes)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server():
    """Our own redis-server (so the test can stop it); falls back to the machine's one."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    port = _free_port()
    p = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield p, f"redis://127.0.0.1:{port}/0"
    p.kill()
    p.wait()


def test_redis_index_round_trip_and_ttl(redis_server):
    _, url = redis_server
    idx = RedisIndex(url, ttl_s=0.3)
    idx.put_many({"ssd:spec:a": [1, 2, 3], "ssd:spec:b": [4]})
    assert idx.get_many(["ssd:spec:a", "ssd:spec:b", "ssd:spec:c"]) == [[1, 2, 3], [4], None]
    time.sleep(0.4)
    assert idx.get_many(["ssd:spec:a"]) == [None]
    assert idx.counters.hit == 2 and idx.counters.miss == 2
    # the services build it with the engine's --index-ttl-s
    from ssd.services.run import _index
    assert _index(url, 7.5).ttl_ms == 7500 and _index("", 7.5) is None


def test_two_target_replicas_share_speculations_through_redis(small_pair, redis_server):
    t_dir, d_dir, _ = small_pair
    _, url = redis_server
    target, _ = load_model(t_dir)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with in_process(_cfg(), target, DraftDescription(str(d_dir)), (3,), index=RedisIndex(url)) as a:
        first = a.generate([PROMPT], params)[0].output_ids
    with in_process(_cfg(), target, DraftDescription(str(d_dir)), (3,), index=RedisIndex(url)) as b:
        second = b.generate([PROMPT], params)[0].output_ids
        assert b.stats.index_hit > 0
    assert second == first


def test_redis_stopped_mid_run_requests_complete(small_pair, redis_server):
    t_dir, d_dir, _ = small_pair
    proc, url = redis_server
    target, _ = load_model(t_dir)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with in_process(_cfg(), target, DraftDescription(str(d_dir)), (3,)) as ref_eng:
        ref = ref_eng.generate([PROMPT, [2, 2]], params)
    index = RedisIndex(url)
    with in_process(_cfg(), target, DraftDescription(str(d_dir)), (3,), index=index) as eng:
        seqs = [eng.add_request(p, params) for p in (PROMPT, [2, 2])]
        for _ in range(3):
            eng.step()
        proc.kill()
        proc.wait()
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            assert steps < 200
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]
    assert index.counters.errors > 0


def test_draft_service_publishes_its_speculations_itself(small_pair, redis_server):
    """With Redis the draft publishes every greedy branch and JIT speculation itself; a target
    replica that never talked to that draft hits them, and an aborted sequence's keys go away."""
    from ssd.services.draft.server import serve
    from ssd.services.draft_link import GrpcDraftLink

    t_dir, d_dir, _ = small_pair
    _, url = redis_server
    target, _ = load_model(t_dir)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    server, port = serve(DraftDescription(str(d_dir)), _cfg().speculation, max_seqs=8, max_model_len=64, index=RedisIndex(url))
    client = redis.Redis.from_url(url)
    try:
        link = GrpcDraftLink(f"127.0.0.1:{port}", k=2)
        assert link.info.publishes and link.info.fingerprint
        with SSDEngine(_cfg(), target, None, (3,), link=link, index=RedisIndex(url)) as a:
            first = a.generate([PROMPT], params)[0].output_ids
            assert a.published == {}  # the target stored nothing itself
        stored = client.keys("ssd:spec:*")
        assert len(stored) > 10
        # a replica with its own in-process draft of the same model: the keys agree, so it hits
        replica_link = GrpcDraftLink(f"127.0.0.1:{port}", k=2)
        with SSDEngine(_cfg(), target, None, (3,), link=replica_link, index=RedisIndex(url)) as b:
            assert b.generate([PROMPT], params)[0].output_ids == first
            assert b.stats.index_hit > 0
        # abort: the draft deletes what it published for that sequence. First let the draft finish
        # the earlier streams' last rounds (a build still running when a stream closes publishes
        # before its sequences are forgotten), so nothing of theirs lands after the flush
        stub = pb_grpc.DraftStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.time() + 30
        while stub.Load(pb.LoadRequest(), timeout=10).sequences and time.time() < deadline:
            time.sleep(0.05)
        client.flushdb()
        with SSDEngine(_cfg(), target, None, (3,), link=GrpcDraftLink(f"127.0.0.1:{port}", k=2), index=RedisIndex(url)) as c:
            s = c.add_request([1, 2, 3, 0], SamplingParams(max_tokens=40, ignore_eos=True))
            for _ in range(4):
                c.step()
            assert client.keys("ssd:spec:*")
            c.abort(s)
            c.step()  # the release travels with the next round
            c._flush_ops()
        deadline = time.time() + 10
        while client.keys("ssd:spec:*") and time.time() < deadline:
            time.sleep(0.05)
        assert client.keys("ssd:spec:*") == []
    finally:
        server.stop(0)
