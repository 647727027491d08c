"""The OpenAI-compatible HTTP API as its users call it: the official `openai` client and raw
HTTP/1.1 over real sockets, against the three services with the real SmolLM2 target."""
import http.client
import json
import socket
import time

import openai
import pytest

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine
from ssd.services.gateway.http import HttpServer, StopScanner, create_app

from stack_support import stack_fixture

pytestmark = pytest.mark.slow

MAX_LEN = 512
# every step speculates (gate off): these tests check what each mode does with the draft, not
# whether the gate would find plain decoding faster on this machine (docs/algorithm.md 7e)
CFG = EngineConfig(mode="ssd", max_batch=8, max_model_len=MAX_LEN,
                   speculation=SpeculationConfig(num_speculative_tokens=3, fan_out_budget=6, gate=False))
MODEL = "smollm2-135m-instruct"
Q = "Name three colours and say one thing about each."


stack = stack_fixture(CFG, MAX_LEN)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.http + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(pair):
    """Greedy AR token ids of the chat prompt Q (the target's own decoding)."""
    ids = pair.tokenizer.apply_chat_template([{"role": "user", "content": Q}])
    eng = AREngine(EngineConfig(mode="ar", max_model_len=MAX_LEN), pair.target, pair.tokenizer.eos_token_ids)
    return eng.generate([ids], SamplingParams(max_tokens=32))[0].output_ids


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": Q}],
                                          **{"temperature": 0, **kw})


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].created > 1_600_000_000
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"


def test_chat_greedy_equals_target_and_usage(client, pair, reference):
    r = _chat(client, max_completion_tokens=32)
    assert r.choices[0].message.content == pair.tokenizer.decode(reference)
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion"
    assert r.usage.completion_tokens == 32 and r.usage.total_tokens == r.usage.prompt_tokens + 32


def test_chat_stream_with_usage(client, pair, reference):
    chunks = list(_chat(client, max_tokens=32, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pair.tokenizer.decode(reference)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert all(c.usage is None for c in chunks[:-1])


def test_legacy_completions(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].text
    s = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert s == r.choices[0].text


def _stop_across_tokens(pair, reference):
    """A stop string made of the end of one token's text and the start of the next's."""
    for i in range(3, len(reference) - 1):
        a, b = pair.tokenizer.decode(reference[:i]), pair.tokenizer.decode(reference[:i + 1])
        if len(a) >= 2 and len(b) - len(a) >= 2 and b.startswith(a) and a[-2:].strip() and b[len(a):len(a) + 2].strip():
            stop = a[-2:] + b[len(a):len(a) + 2]
            full = pair.tokenizer.decode(reference)
            return stop, full[:full.index(stop)]
    pytest.skip("no token boundary inside words in the reference")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_a_token_boundary(client, pair, reference, stream):
    stop, want = _stop_across_tokens(pair, reference)
    if stream:
        chunks = list(_chat(client, max_tokens=32, stop=[stop, "never appears"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = _chat(client, max_tokens=32, stop=stop)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == want and stop not in text and finish == "stop"


def test_stop_scanner_holds_back_partial_matches():
    s = StopScanner(["END", "xyz"])
    assert s.push("abc E") == ("abc", False)
    assert s.push("N") == (" ", False)  # "EN" may still become "END"
    assert s.push("Dmore") == ("", True)
    assert s.push("later") == ("", True)
    t = StopScanner(["zz"])
    assert t.push("az") == ("a", False) and t.flush() == "z"


@pytest.mark.parametrize("kw,param", [
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 10}}, "min_tokens"),  # over max_tokens
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 2}, "n"),
    ({"store": True}, "store"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"seed": 1 << 64}, "seed"),
    ({"temperature": -1}, None),
    ({"top_p": 0}, "top_p"),
])
def test_unsupported_or_bad_parameters_are_400_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, **kw)
    err = e.value.body
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def _ar(pair, params: SamplingParams):
    ids = pair.tokenizer.apply_chat_template([{"role": "user", "content": Q}])
    eng = AREngine(EngineConfig(mode="ar", max_model_len=MAX_LEN), pair.target, pair.tokenizer.eos_token_ids)
    return eng.generate([ids], params)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_targets_own(client, pair, stream):
    """Greedy with logprobs through SSD: each token's logprob and its alternatives equal the AR
    engine's (the target's log-softmax; batch-invariant kernels make them bit-identical), the
    tokens' bytes spell the text, and the chosen token is the top alternative."""
    ref = _ar(pair, SamplingParams(max_tokens=24, logprobs=3))
    kw = dict(max_tokens=24, logprobs=True, top_logprobs=3)
    if stream:
        chunks = [c for c in _chat(client, stream=True, **kw) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        content = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        r = _chat(client, **kw)
        text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert len(content) == 24
    assert b"".join(bytes(e.bytes) for e in content).decode() == text
    for e, (lp, alts), tok in zip(content, ref.logprobs, ref.output_ids):
        assert e.logprob == pytest.approx(lp, abs=1e-6) and e.token == pair.tokenizer.token_text(tok)
        assert [a.token for a in e.top_logprobs] == [pair.tokenizer.token_text(t) for t, _ in alts]
        assert [a.logprob for a in e.top_logprobs] == pytest.approx([v for _, v in alts], abs=1e-6)
        # greedy: the chosen token is a most likely one (bf16 logits may tie; topk orders ties its own way)
        assert e.top_logprobs[0].logprob == e.logprob and e.token in [a.token for a in e.top_logprobs]
    plain = _chat(client, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_legacy_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for tok, v, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and alts[tok] == v and 1 <= len(alts) <= 3 and max(alts.values()) == v  # greedy
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            logprobs=2, stream=True))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs


def test_penalties_bias_and_min_tokens_equal_the_ar_engine_in_every_mode(client, pair, reference):
    """Adjusted greedy decoding through the gateway, as ar, sd and ssd: the same text as the AR
    engine given the same adjustments, and not the unadjusted text."""
    ban = reference[2]
    params = SamplingParams(max_tokens=32, frequency_penalty=1.2, presence_penalty=0.3, repetition_penalty=1.3,
                            logit_bias={ban: -100.0}, min_tokens=32)
    want = pair.tokenizer.decode(_ar(pair, params).output_ids)
    assert want != pair.tokenizer.decode(reference)
    for mode in ("ar", "sd", "ssd"):
        r = _chat(client, max_tokens=32, frequency_penalty=1.2, presence_penalty=0.3, logit_bias={str(ban): -100},
                  extra_body={"repetition_penalty": 1.3, "min_tokens": 32, "mode": mode})
        assert r.choices[0].message.content == want, mode
        assert r.usage.completion_tokens == 32


def test_a_seed_gives_the_same_sampled_text_everywhere(stack, client, pair):
    """Same seed, same input: the same sampled tokens streamed or not, over HTTP or gRPC, as
    ar, sd or ssd, and equal to the AR engine's; another seed gives another text."""
    from ssd.services.protos import pb

    want = _ar(pair, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)).output_ids
    texts = set()
    for mode in ("ar", "sd", "ssd"):
        kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, extra_body={"mode": mode})
        texts.add(_chat(client, **kw).choices[0].message.content)
        texts.add("".join(c.choices[0].delta.content or "" for c in _chat(client, stream=True, **kw) if c.choices))
        out = list(stack.stub.Generate(pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=Q)]), mode=mode,
            sampling=pb.SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234))))
        assert [t for r in out for t in r.token_ids] == want, mode
    assert texts == {pair.tokenizer.decode(want)}
    other = _chat(client, max_tokens=24, temperature=0.9, top_p=0.95, seed=1235).choices[0].message.content
    assert other != texts.pop()


def test_int64_seeds_at_the_limits_are_accepted(client):
    for seed in (-(1 << 63), (1 << 63) - 1):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0.8, seed=seed)
        assert r.usage.completion_tokens >= 1


def test_tokenize_detokenize_health_metrics(stack, pair):
    c = http.client.HTTPConnection(*stack.httpd.server_address, timeout=60)
    c.request("POST", "/tokenize", json.dumps({"prompt": "Hello world"}), {"Content-Type": "application/json"})
    out = json.loads(c.getresponse().read())
    assert out["tokens"] == pair.tokenizer.encode("Hello world") and out["count"] == len(out["tokens"])
    c.request("POST", "/detokenize", json.dumps({"tokens": out["tokens"]}), {"Content-Type": "application/json"})
    assert json.loads(c.getresponse().read())["prompt"] == "Hello world"
    c.request("POST", "/detokenize", json.dumps({"tokens": [10**9]}), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 400 and json.loads(r.read())["error"]["param"] == "tokens"
    for path in ("/health", "/healthz", "/metrics"):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        assert r.status == 200, path


def _raw(addr, data: bytes, timeout=10.0) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                    if n and len(body) >= n[0]:
                        break
        except socket.timeout:
            pass
        return out


def test_http_semantics_keep_alive_methods_query_strings(stack):
    c = http.client.HTTPConnection(*stack.httpd.server_address, timeout=60)
    c.request("POST", "/v1/responses", json.dumps({"input": "hi"}), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["type"] == "not_found_error"
    c.request("GET", "/v1/models?limit=1")  # same connection: the 404's body was consumed
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == MODEL
    for method in ("PUT", "DELETE"):
        c.request(method, "/v1/chat/completions")
        r = c.getresponse()
        assert r.status == 405 and json.loads(r.read())["error"]["message"]


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{}", 413),
])
def test_malformed_lengths_get_an_http_error(stack, request_bytes, status):
    out = _raw(stack.httpd.server_address, request_bytes)
    assert out.startswith(f"HTTP/1.1 {status}".encode()), out[:200]


@pytest.mark.parametrize("body", [
    "[" * 100_000 + "]" * 100_000,
    '{"prompt": "\\ud800", "max_tokens": 2}',
    '{"prompt": "hi", "max_tokens": 99999999999999999999999}',
    '{"prompt": "hi", "max_tokens": 2',
])
def test_hostile_json_is_400(stack, body):
    c = http.client.HTTPConnection(*stack.httpd.server_address, timeout=60)
    c.request("POST", "/v1/completions", body.encode(), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 400 and json.loads(r.read())["error"]["message"]


def test_short_body_times_out_with_408(stack):
    server = HttpServer(create_app(stack.gw, body_timeout_s=1.0))
    try:
        # the body never completes: the server answers 408 after body_timeout_s (the client's own
        # 20 s socket timeout would fail the test with a timeout error, not a 408)
        out = _raw(server.server_address, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                          b"Content-Length: 100\r\n\r\n{\"prompt\"", timeout=20)
        assert out.startswith(b"HTTP/1.1 408")
    finally:
        server.shutdown()


def test_api_keys_and_cors(stack):
    server = HttpServer(create_app(stack.gw, api_keys={"key-one", "key-two"}, cors_origins=["https://app.example"]))
    base = f"http://{server.server_address[0]}:{server.server_address[1]}"
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        for key in ("key-one", "key-two"):
            assert openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0).models.list().data[0].id == MODEL
        c = http.client.HTTPConnection(*server.server_address, timeout=30)
        c.request("GET", "/health")  # probes need no key
        r = c.getresponse()
        r.read()
        assert r.status == 200
        c.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "https://app.example",
                                                               "Access-Control-Request-Method": "POST"})
        r = c.getresponse()
        r.read()
        assert r.getheader("access-control-allow-origin") == "https://app.example"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_grpc_api_keys_tls_and_reflection_v1(stack, tls_files):
    """The gateway's gRPC face with API keys over TLS: no key -> UNAUTHENTICATED, a key -> served,
    health and reflection (v1 and v1alpha) open to probes."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2

    from ssd.services.common import ApiKeyInterceptor, add_health_and_reflection, add_port, make_server
    from ssd.services.gateway.server import GatewayService
    from ssd.services.protos import pb, pb_grpc

    cert, key = tls_files
    server = make_server(interceptors=[ApiKeyInterceptor(frozenset({"k1", "k2"}))])
    pb_grpc.add_GatewayServicer_to_server(GatewayService(stack.gw), server)
    add_health_and_reflection(server, ["Gateway"])
    port = add_port(server, "127.0.0.1:0", cert, key)
    server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=open(cert, "rb").read())
        channel = grpc.secure_channel(f"localhost:{port}", creds)
        stub = pb_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(pb.ListModelsRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=30, metadata=[("authorization", "Bearer nope")]))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=[("authorization", "Bearer k2")])
        assert ok.models[0].name == MODEL
        out = list(stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=3)),
                                 timeout=120, metadata=[("authorization", "Bearer k1")]))  # no deadline needed either
        assert out[-1].usage.completion_tokens == 3
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for name in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            call = channel.stream_stream(f"/{name}/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            reply = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)))
            assert "ssd.v1.Gateway" in [s.name for s in reply.list_services_response.service], name
        insecure = pb_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError):
            insecure.ListModels(pb.ListModelsRequest(), timeout=5, metadata=[("authorization", "Bearer k1")])
    finally:
        server.stop(0)


def test_https(stack, tls_files):
    import ssl

    cert, key = tls_files
    server = HttpServer(create_app(stack.gw), ssl_certfile=cert, ssl_keyfile=key)
    try:
        ctx = ssl.create_default_context(cafile=cert)
        c = http.client.HTTPSConnection("localhost", server.server_address[1], context=ctx, timeout=30)
        c.request("GET", "/v1/models")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == MODEL
    finally:
        server.shutdown()


def test_mode_is_honoured_per_request(stack, client, pair, reference):
    """One target serves ar, sd and ssd requests: the same greedy text, and the stats say how."""
    from ssd.services.protos import pb

    req = lambda mode: pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=Q)]),
                                          sampling=pb.SamplingParams(max_tokens=32), mode=mode)
    stats = {}
    for mode in ("ar", "sd", "ssd"):
        out = list(stack.stub.Generate(req(mode)))
        assert [t for r in out for t in r.token_ids] == reference, mode
        stats[mode] = out[-1].stats
    assert stats["ar"].num_draft_tokens == 0 and stats["ar"].num_rounds == 31
    assert stats["sd"].num_draft_tokens > 0 and stats["sd"].cache_hit + stats["sd"].cache_late == 0
    assert stats["ssd"].num_draft_tokens > 0 and stats["ssd"].cache_hit + stats["ssd"].cache_late > 0  # the draft's cache
    r = _chat(client, max_tokens=32, extra_body={"mode": "ar"})
    assert r.choices[0].message.content == pair.tokenizer.decode(reference)
    with pytest.raises(openai.BadRequestError):
        _chat(client, max_tokens=4, extra_body={"mode": "fast"})


def test_disconnected_non_streaming_client_aborts_its_request(stack):
    from ssd.services.protos import pb

    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0}).encode()
    s = socket.create_connection(stack.httpd.server_address, timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    running = lambda: stack.target_stub.Load(pb.LoadRequest(), timeout=30).running  # noqa: E731
    deadline = time.monotonic() + 60
    while running() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 1
    s.close()  # the client leaves before its 400 tokens
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0
