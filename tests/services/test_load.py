"""Load: many concurrent streaming requests, half gRPC and half HTTP, against a gateway and a
target with a small queue, over loopback. Every stream ends one of two ways: completed
normally, or refused with RESOURCE_EXHAUSTED / HTTP 429; nothing crashes, hangs or ends any
other way, and the services answer afterwards.

SSD_LOAD_STREAMS sets how many (default 1,000; docs/services.md records a run):
    SSD_LOAD_STREAMS=2000 python3 -m pytest -q -s tests/services/test_load.py
"""
import asyncio
import collections
import json
import os
import time

import grpc
import pytest

from ssd.config import EngineConfig
from ssd.engine import AREngine
from ssd.models.loader import default_target_path, load_model
from ssd.services.common import CHANNEL_OPTIONS, add_health_and_reflection, make_server
from ssd.services.discovery import StaticDiscovery
from ssd.services.gateway.http import serve_http
from ssd.services.gateway.server import Gateway, GatewayService
from ssd.services.protos import pb, pb_grpc
from ssd.services.target.server import EngineLoop, TargetService
from ssd.tokenizer import Tokenizer

STREAMS = int(os.environ.get("SSD_LOAD_STREAMS", "1000"))
MAX_TOKENS = 8
PROMPT = [0, 1, 2]  # token ids of the small 4-token model


@pytest.fixture
def services(small_pair):
    """The small target (4 slots, a queue of 4) behind a gateway (gRPC and HTTP)."""
    model = load_model(small_pair[0])[0]
    loop = EngineLoop(AREngine(EngineConfig(mode="ar", max_batch=4, max_queue=4, max_model_len=100), model, (3,)))
    servers = []

    def start(add, names):
        s = make_server()
        add(s)
        add_health_and_reflection(s, names)
        port = s.add_insecure_port("127.0.0.1:0")
        s.start()
        servers.append(s)
        return f"127.0.0.1:{port}"

    target = start(lambda s: pb_grpc.add_TargetServicer_to_server(TargetService(loop), s), ["Target"])
    gw = Gateway(Tokenizer(default_target_path()), StaticDiscovery([target], []), "small", 100)
    gateway = start(lambda s: pb_grpc.add_GatewayServicer_to_server(GatewayService(gw), s), ["Gateway"])
    httpd = serve_http(gw, max_connections=2 * STREAMS + 16)
    yield gateway, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    for s in reversed(servers):
        s.stop(0)
    loop.stop()


async def _grpc_stream(stub) -> str:
    req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT),
                             sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    tokens, last = 0, None
    try:
        async for r in stub.Generate(req, timeout=300):
            tokens += len(r.token_ids)
            last = r
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.details():
            return "refused"
        return f"other: gRPC {e.code().name} {e.details()}"
    if last is not None and last.finish_reason == "length" and tokens == MAX_TOKENS:
        return "completed"
    return f"other: gRPC stream ended with {tokens} tokens, finish {last and last.finish_reason!r}"


async def _http_stream(host: str, port: int) -> str:
    """One streaming completion over a plain HTTP/1.0 socket (the body runs to the close)."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}).encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await reader.read(-1)
        writer.close()
    except OSError as e:
        return f"other: {type(e).__name__} {e}"
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if status == 429:
        err = json.loads(payload)["error"]
        ok = err["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
        return "refused" if ok else f"other: 429 {err}"
    if status != 200:
        return f"other: HTTP {status} {payload[:200]!r}"
    events = [line[6:] for line in payload.decode().split("\n") if line.startswith("data: ")]
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if "choices" in e]
    if events and events[-1] == "[DONE]" and finish and finish[-1] == "length" and "error" not in "".join(events):
        return "completed"
    return f"other: HTTP stream {events[-2:]}"


async def _storm(gateway: str, http: str, n: int) -> list[str]:
    async with grpc.aio.insecure_channel(gateway, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GatewayStub(channel)
        host, port = http.rsplit("/", 1)[-1].split(":")
        calls = [_grpc_stream(stub) if i % 2 == 0 else _http_stream(host, int(port)) for i in range(n)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=240)  # a hang fails here


def test_concurrent_streams_complete_or_are_refused(services):
    gateway, http = services
    t0 = time.monotonic()
    outcomes = asyncio.run(_storm(gateway, http, STREAMS))
    wall = time.monotonic() - t0
    counts = collections.Counter(o if not o.startswith("other") else "other" for o in outcomes)
    print(f"\n{STREAMS} concurrent streams: {dict(counts)} in {wall:.1f} s")
    assert not [o for o in outcomes if o.startswith("other")][:5]
    assert counts["completed"] > 0 and counts["refused"] > 0  # the queue was really exceeded
    # the services still answer, both ways
    assert asyncio.run(_storm(gateway, http, 2)) == ["completed", "completed"]
