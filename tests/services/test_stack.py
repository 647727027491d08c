"""The three services over real loopback sockets with the real SmolLM2 target: greedy output
through the gateway equals target-only greedy, concurrent streams lose and duplicate nothing,
a dead draft changes nothing, bad input gets the right status, cancel and deadlines free KV."""
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine
from ssd.services.protos import pb, pb_grpc

from stack_support import Stack as _Stack

pytestmark = pytest.mark.slow

MAX_LEN = 512
# every step speculates (gate off): test_ssd_really_used_the_draft follows the draft's rounds; whether
# the gate finds plain decoding faster depends on the machine's timings (tests/engine covers its steps)
CFG = EngineConfig(mode="ssd", max_batch=16, max_model_len=MAX_LEN,
                   speculation=SpeculationConfig(num_speculative_tokens=3, fan_out_budget=6, gate=False))
PROMPTS = ["Name three colours.", "What is the capital of France?", "Count from one to five.", "Say something kind."]


def Stack(pair):
    return _Stack(pair, CFG, MAX_LEN)


@pytest.fixture(scope="module")
def stack(pair):
    st = Stack(pair)
    yield st
    st.close()


def _chat_ids(pair, text):
    return pair.tokenizer.apply_chat_template([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def reference(pair):
    eng = AREngine(EngineConfig(mode="ar", max_batch=8, max_model_len=MAX_LEN), pair.target, pair.tokenizer.eos_token_ids)
    seqs = eng.generate([_chat_ids(pair, p) for p in PROMPTS], SamplingParams(max_tokens=24))
    return {p: s.output_ids for p, s in zip(PROMPTS, seqs)}


def _generate(stub, text, max_tokens=24, **kw):
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
                             sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)
    ids, last = [], None
    for r in stub.Generate(req, timeout=300):
        ids += list(r.token_ids)
        last = r
    return ids, last


@pytest.mark.smoke  # the fast tier's one end-to-end run: three services, real sockets, the real model
def test_greedy_through_gateway_equals_target_only(stack, reference):
    for p in PROMPTS[:2]:
        ids, last = _generate(stack.stub, p)
        assert ids == reference[p]
        assert last.finish_reason in ("stop", "length") and last.usage.completion_tokens == len(ids)
        assert last.stats.num_rounds > 0
    # a client that sets no deadline (most generated clients, grpcurl) is served, not expired at once
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPTS[0])]),
                             sampling=pb.SamplingParams(max_tokens=24))
    assert [t for r in stack.stub.Generate(req) for t in r.token_ids] == reference[PROMPTS[0]]


def test_sixteen_concurrent_streams_lose_and_duplicate_nothing(stack, reference):
    results, errors = {}, []

    def one(i):
        try:
            results[i] = _generate(stack.stub, PROMPTS[i % len(PROMPTS)])[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ids in results.items():
        assert ids == reference[PROMPTS[i % len(PROMPTS)]], i
    assert len(results) == 16


def test_ssd_really_used_the_draft(stack):
    _, last = _generate(stack.stub, PROMPTS[0])
    assert last.stats.cache_hit + last.stats.cache_late + last.stats.cache_miss > 0


@pytest.mark.parametrize("kw,code", [
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=0)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=10**9)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=8, temperature=-1)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=8, top_p=1.5)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"prompt": "hi", "model": "gpt-9", "sampling": pb.SamplingParams(max_tokens=8)}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"prompt": "word " * 2000, "sampling": pb.SamplingParams(max_tokens=8)}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ({"prompt": "x" * (80 << 20), "sampling": pb.SamplingParams(max_tokens=8)}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ({}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_input_gets_status_and_message(stack, kw, code):
    with pytest.raises(grpc.RpcError) as e:
        list(stack.stub.Generate(pb.GenerateRequest(**kw), timeout=60))
    assert e.value.code() == code and e.value.details()


def _http(stack, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(stack.http + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_openai_endpoints(stack, pair, reference):
    status, body = _http(stack, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "smollm2-135m-instruct"
    status, body = _http(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}],
                                                          "max_tokens": 24, "temperature": 0})
    out = json.loads(body)
    assert status == 200 and out["choices"][0]["message"]["content"] == pair.tokenizer.decode(reference[PROMPTS[0]])
    status, body = _http(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[1]}],
                                                          "max_tokens": 24, "temperature": 0, "stream": True})
    events = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: ") and l != "data: [DONE]"]
    assert status == 200 and body.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == pair.tokenizer.decode(reference[PROMPTS[1]])
    status, body = _http(stack, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("body,raw,status", [
    (None, b"{not json", 400),
    ({"messages": "hi"}, None, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -2}, None, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, None, 404),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, None, 400),
])
def test_http_bad_input_is_4xx_with_message(stack, body, raw, status):
    code, text = _http(stack, "/v1/chat/completions", body, raw)
    assert code == status and json.loads(text)["error"]["message"]


def _free_slots(stack):
    return stack.target_stub.Load(pb.LoadRequest(), timeout=60).free_slots


def test_cancel_and_deadline_free_kv(stack):
    full = _free_slots(stack)
    req = pb.GenerateRequest(prompt="Tell me a very long story about the sea.", sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
    call = stack.stub.Generate(req, timeout=300)
    next(call)
    assert _free_slots(stack) == full - 1
    call.cancel()
    deadline = time.time() + 120
    while _free_slots(stack) != full and time.time() < deadline:
        time.sleep(0.2)
    assert _free_slots(stack) == full
    with pytest.raises(grpc.RpcError) as e:
        list(stack.stub.Generate(req, timeout=1.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 120
    while _free_slots(stack) != full and time.time() < deadline:
        time.sleep(0.2)
    assert _free_slots(stack) == full


def test_duplicate_request_id_is_refused_without_touching_the_first(stack, reference):
    req = pb.GenerateRequest(request_id="same-id", messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPTS[0])]),
                             sampling=pb.SamplingParams(max_tokens=24))
    first = stack.stub.Generate(req, timeout=300)
    chunks = [next(first)]
    with pytest.raises(grpc.RpcError) as e:
        list(stack.stub.Generate(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    chunks += list(first)  # the first request runs to its end, untouched
    assert chunks[-1].finish_reason in ("stop", "length")
    assert [t for c in chunks for t in c.token_ids] == reference[PROMPTS[0]]


def test_draft_stopped_mid_generation_output_unchanged(pair, reference):
    st = Stack(pair)
    try:
        req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPTS[2])]),
                                 sampling=pb.SamplingParams(max_tokens=24))
        ids = []
        for i, r in enumerate(st.stub.Generate(req, timeout=300)):
            ids += list(r.token_ids)
            if i == 1:
                st.draft[0].stop(0)  # the draft pod dies
        assert ids == reference[PROMPTS[2]]
    finally:
        st.close()


def test_sigterm_drains_in_flight_requests_then_exits(pair):
    """SIGTERM: health goes NOT_SERVING, the running request still completes, the process exits."""
    import signal
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    p = subprocess.Popen([sys.executable, "-m", "ssd.cli", "service", "target", "--port", "0", "--grace-s", "60",
                          "--max-model-len", str(MAX_LEN)], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("SSD_READY"):
            line = p.stdout.readline()
            assert line, "target service died"
        port = int(line.split("port=")[1].split()[0])
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub, health = pb_grpc.TargetStub(ch), health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        call = stub.Run(pb.RunRequest(seq_id="drain", prompt_token_ids=_chat_ids(pair, "Count to twenty."),
                                      sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)), timeout=300)
        first = next(call)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        rest = list(call)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
        assert rest[-1].finish_reason == "length"
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
