"""Admission control: a target with a bounded queue answers RESOURCE_EXHAUSTED (gRPC, with
retry advice) / HTTP 429 with Retry-After beyond it; every request gets one of the two outcomes."""
import threading

import grpc
import openai
import pytest

from ssd.config import EngineConfig
from ssd.engine import AREngine
from ssd.models.loader import default_target_path, load_model
from ssd.services.common import add_health_and_reflection, make_server
from ssd.services.discovery import StaticDiscovery
from ssd.services.gateway.http import serve_http
from ssd.services.gateway.server import Gateway
from ssd.services.protos import pb, pb_grpc

from stack_support import target_service
from ssd.tokenizer import Tokenizer


@pytest.fixture
def full_target(small_pair):
    """The small target, one batch slot and room for one waiting request."""
    model = load_model(small_pair[0])[0]
    cfg = EngineConfig(mode="ar", max_batch=1, max_queue=1, max_model_len=100)
    with target_service(AREngine(cfg, model, (3,))) as addr:
        yield addr


def _burst(n, call):
    out, threads = [None] * n, []
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        try:
            out[i] = ("ok", call())
        except Exception as e:  # noqa: BLE001 - the outcome is what we test
            out[i] = ("error", e)
    for i in range(n):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_grpc_beyond_the_queue_is_resource_exhausted_with_retry_advice(full_target):
    stub = pb_grpc.TargetStub(grpc.insecure_channel(full_target))
    req = pb.RunRequest(seq_id="", prompt_token_ids=[0, 1, 2], sampling=pb.SamplingParams(max_tokens=60, ignore_eos=True))

    def call():
        r = stub.Run(pb.RunRequest(seq_id=str(threading.get_ident()), prompt_token_ids=req.prompt_token_ids,
                                   sampling=req.sampling), timeout=120)
        return sum(len(x.token_ids) for x in r)
    out = _burst(8, call)
    ok = [v for kind, v in out if kind == "ok"]
    errors = [v for kind, v in out if kind == "error"]
    assert ok and errors and all(n == 60 for n in ok)
    for e in errors:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.details()
        assert dict(e.trailing_metadata())["retry-after-ms"] == "1000"


def test_http_beyond_the_queue_is_429_with_retry_after(full_target):
    gw = Gateway(Tokenizer(default_target_path()), StaticDiscovery([full_target], []), "small", 100)
    httpd = serve_http(gw)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0,
                           timeout=120)
    try:
        out = _burst(8, lambda: client.completions.create(model="small", prompt=[0, 1, 2], max_tokens=60,
                                                          extra_body={"ignore_eos": True}))
    finally:
        httpd.shutdown()
    ok = [v for kind, v in out if kind == "ok"]
    limited = [v for kind, v in out if kind == "error"]
    assert ok and limited
    assert all(r.usage.completion_tokens == 60 for r in ok)
    for e in limited:
        assert isinstance(e, openai.RateLimitError), e
        assert e.response.headers["retry-after"] == "1" and e.body["type"] == "rate_limit_error"


def test_gateway_health_follows_its_targets(full_target):
    """NOT_SERVING while no target answers, SERVING once one does."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ssd.services.gateway.server import GatewayService, watch_readiness

    class Moving(StaticDiscovery):
        addrs = ["127.0.0.1:1"]  # nothing listens there

        def targets(self):
            return StaticDiscovery(self.addrs, []).targets()

    discovery = Moving([], [])
    gw = Gateway(Tokenizer(default_target_path()), discovery, "small", 100)
    server = make_server()
    pb_grpc.add_GatewayServicer_to_server(GatewayService(gw), server)
    hs = add_health_and_reflection(server, ["Gateway"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = watch_readiness(gw, hs, ["Gateway"], interval_s=0.1)
    check = lambda: health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Check(  # noqa: E731
        health_pb2.HealthCheckRequest(service="ssd.v1.Gateway"), timeout=5).status
    try:
        deadline = time.monotonic() + 10
        while check() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        discovery.addrs = [full_target]
        deadline = time.monotonic() + 10
        while check() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check() == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop.set()
        server.stop(0)


def test_oversized_prompt_refused_before_tokenizing(full_target, monkeypatch):
    gw = Gateway(Tokenizer(default_target_path()), StaticDiscovery([full_target], []), "small", 100)
    limit = 100 * gw.tokenizer.longest_token_bytes()
    monkeypatch.setattr(gw.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized an oversized prompt"))
    from ssd.services.gateway.server import GenerateError

    with pytest.raises(GenerateError) as e:
        list(gw.generate(pb.GenerateRequest(prompt="x" * (limit + 1), sampling=pb.SamplingParams(max_tokens=4))))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "context length" in str(e.value)
