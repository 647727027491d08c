"""Drain: SIGTERM to a real `ssd service gateway` process. New requests are refused at once
(gRPC UNAVAILABLE, HTTP 503 with an OpenAI error object), a stream that fits in the grace
period completes with [DONE], one that does not ends with an error event and [DONE], an open
health Watch stream ends at once instead of holding the stop, and the process exits."""
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ssd.config import EngineConfig
from ssd.engine import AREngine
from ssd.models.loader import default_target_path, load_model
from ssd.services.protos import pb, pb_grpc

from stack_support import target_service
from ssd.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

GRACE_S = 5.0


@pytest.fixture(scope="module")
def target():
    """The real SmolLM2 target (AR, two slots) in this process: slow enough on CPU that a
    300-token stream outlives the grace period."""
    path = default_target_path()
    model = load_model(path)[0]
    with target_service(AREngine(EngineConfig(mode="ar", max_batch=2, max_model_len=512), model,
                                 Tokenizer(path).eos_token_ids)) as addr:
        yield addr


def _start_gateway(target_addr: str, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ssd.cli", "service", "gateway", "--port", "0", "--http-port", "0",
                             "--targets", target_addr, "--grace-s", str(GRACE_S), "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("SSD_READY"):
            ports = dict(kv.split("=") for kv in line.split()[1:])
            return proc, int(ports["port"]), int(ports["http_port"])
    raise AssertionError(f"the gateway exited before it was ready (code {proc.wait()})")


def _post(url: str, body: dict, timeout: float = 120):
    return urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode(),
                                                         headers={"content-type": "application/json"}), timeout=timeout)


class SSE(threading.Thread):
    """One streaming completion read event by event; `first` is set at its first token."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list = []
        self.first = threading.Event()

    def run(self):
        body = {"prompt": "Tell me a long story about the sea.", "max_tokens": self.max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with _post(self.url, body) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                self.events.append(data if data == "[DONE]" else json.loads(data))
                if len(self.events) >= 2:
                    self.first.set()
        self.first.set()


def test_sigterm_refuses_new_requests_finishes_or_ends_in_flight_ones_and_closes_watches(target, tmp_path):
    proc, port, http_port = _start_gateway(target, tmp_path)
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        short, long_ = SSE(url, 12), SSE(url, 300)
        short.start()
        long_.start()
        assert short.first.wait(120) and long_.first.wait(120)  # both in flight
        assert "error" not in str(short.events) and "error" not in str(long_.events)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # the open Watch: NOT_SERVING, then the stream ends (it must not hold the stop)
        rest = [r.status for r in watch]
        watch_s = time.monotonic() - t0
        assert rest[-1] == health_pb2.HealthCheckResponse.NOT_SERVING and watch_s < 2.0, (rest, watch_s)
        # new requests: refused at once, with a reason
        gen = pb_grpc.GatewayStub(channel).Generate(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=4)),
                                                    timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(gen)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        with pytest.raises(urllib.error.HTTPError) as h:
            _post(url, {"prompt": "Hi", "max_tokens": 4})
        assert h.value.code == 503
        err = json.loads(h.value.read())["error"]
        assert set(err) == {"message", "type", "param", "code"} and "draining" in err["message"]
        assert err["type"] == "service_unavailable_error"
        short.join(60)
        long_.join(60)
        # the short stream finished normally within the grace period
        assert short.events[-1] == "[DONE]" and short.events[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in short.events[:-1])
        # the long one could not: an explicit error event, then [DONE]; never a silent cut
        assert long_.events[-1] == "[DONE]", long_.events[-3:]
        last = long_.events[-2]
        assert last["error"]["type"] == "service_unavailable_error" and "grace" in last["error"]["message"]
        assert proc.wait(timeout=GRACE_S + 15) == 0  # the process exits by itself once the grace period is over
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
