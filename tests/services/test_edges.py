"""The edges outside clients hit, through the three real services over real sockets (gRPC stubs
from protos/, the official `openai` client, raw HTTP/1.1) with the real SmolLM2 target:
short answers come back whole in every mode; every integer request field is range-checked with
an error naming it; undecodable gRPC bytes are INVALID_ARGUMENT; reflection describes every
service it lists; one SERVER span per HTTP request; bounded request headers."""
import json
import logging
import socket
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2

from ssd.config import EngineConfig, SamplingParams, SpeculationConfig
from ssd.engine import AREngine, build_engine
from ssd.services.gateway.http import MAX_HEADER_COUNT, MAX_HEADER_LINE_BYTES, HttpServer, create_app
from ssd.services.protos import pb

from stack_support import stack_fixture

pytestmark = pytest.mark.slow

MAX_LEN = 256
K = 3
CFG = EngineConfig(mode="ssd", max_batch=8, max_model_len=MAX_LEN,
                   speculation=SpeculationConfig(num_speculative_tokens=K, fan_out_budget=6))
MODEL = "smollm2-135m-instruct"
STORY = "Write a long story about a dragon."
LIMITS = range(1, K + 4)  # max_tokens 1 .. K+3: shorter than, as long as and longer than one round
SAMPLINGS = {  # how the answer is drawn; the seeded one is reproducible in every mode (coupled sampling)
    "greedy": dict(temperature=0.0),
    "seeded": dict(temperature=0.8, seed=7),
    "sampled": dict(temperature=0.8),
}


stack = stack_fixture(CFG, MAX_LEN)


@pytest.fixture(scope="module")
def story_ids(pair):
    return pair.tokenizer.apply_chat_template([{"role": "user", "content": STORY}])


@pytest.fixture(scope="module")
def ar_answers(pair, story_ids):
    """The target's own answer to STORY, K+3 tokens long, per reproducible sampling (AR)."""
    eng = AREngine(EngineConfig(mode="ar", max_model_len=MAX_LEN), pair.target, pair.tokenizer.eos_token_ids)
    return {name: eng.generate([story_ids], SamplingParams(max_tokens=max(LIMITS), **kw))[0].output_ids
            for name, kw in SAMPLINGS.items() if name != "sampled"}


def _expect_whole(ids, finish, n, sampling, ar_answers, eos):
    """exactly min(n, tokens before EOS) tokens, and AR's tokens when the sampling is reproducible"""
    if sampling in ar_answers:
        want = ar_answers[sampling][:n]
        assert ids == want, (n, ids, want)
    if finish == "length":
        assert len(ids) == n, (n, ids)
    else:
        assert finish == "stop" and len(ids) <= n and ids[-1] in eos, (n, finish, ids)


# ---- 1. short answers are whole ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_short_answers_are_whole_in_process(pair, story_ids, ar_answers, mode):
    cfg = CFG.replace(mode=mode, max_batch=16)
    params = [SamplingParams(max_tokens=n, **kw) for kw in SAMPLINGS.values() for n in LIMITS]
    with build_engine(cfg, pair) as eng:
        seqs = eng.generate([story_ids] * len(params), params)
    for s, p, sampling in zip(seqs, params, [name for name in SAMPLINGS for _ in LIMITS]):
        _expect_whole(s.output_ids, s.finish_reason, p.max_tokens, sampling, ar_answers, pair.tokenizer.eos_token_ids)


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_short_answers_are_whole_through_the_services(stack, pair, story_ids, ar_answers, mode):
    """One request at a time, so the request's prefill and its first round share a target step
    (the step whose two commits used to come back as one token and a finish)."""
    for sampling, kw in SAMPLINGS.items():
        for n in LIMITS:
            sp = pb.SamplingParams(max_tokens=n, temperature=kw["temperature"])
            if "seed" in kw:
                sp.seed = kw["seed"]
            chunks = list(stack.stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=story_ids), sampling=sp,
                                                                 mode=mode), timeout=120))
            ids = [t for c in chunks for t in c.token_ids]
            assert chunks[-1].usage.completion_tokens == len(ids)
            _expect_whole(ids, chunks[-1].finish_reason, n, sampling, ar_answers, pair.tokenizer.eos_token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_short_chat_answers_are_whole_over_http(stack, pair, ar_answers, stream):
    client = openai.OpenAI(base_url=stack.http + "/v1", api_key="unused", max_retries=0, timeout=120)
    for mode in ("ar", "sd", "ssd"):
        for n in LIMITS:
            kw = dict(model=MODEL, messages=[{"role": "user", "content": STORY}], temperature=0, max_tokens=n,
                      extra_body={"mode": mode})
            if stream:
                chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
                usage = chunks[-1].usage
            else:
                r = client.chat.completions.create(**kw)
                text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
            want = ar_answers["greedy"][:n]
            assert usage.completion_tokens == len(want), (mode, n, usage)
            assert text == pair.tokenizer.decode(want), (mode, n, text)
            assert finish == "length"


# ---- 2. integer fields are range-checked ---------------------------------------------------------
_INTEGER = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64}
HUGE = 1 << 40
# the proto's integer request fields -> (the HTTP body that sets it to v, the param the 400 names)
HTTP_FIELDS = {
    "SamplingParams.top_k": lambda v: ({"top_k": v}, "top_k"),
    "SamplingParams.max_tokens": lambda v: ({"max_tokens": v}, "max_tokens"),
    "SamplingParams.seed": lambda v: ({"seed": v * HUGE * HUGE}, "seed"),  # int64: past it
    "SamplingParams.min_tokens": lambda v: ({"min_tokens": v}, "min_tokens"),
    "SamplingParams.logprobs": lambda v: ({"logprobs": True, "top_logprobs": v}, "top_logprobs"),
    "SamplingParams.logit_bias": lambda v: ({"logit_bias": {str(abs(v)): 1}}, "logit_bias"),  # an int32 map key
    "TokenIds.ids": lambda v: ({"prompt": [1, v]}, "prompt"),
}


def _integer_fields(message) -> set[str]:
    out = set()
    for f in message.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            if f.message_type.fields_by_name["key"].type in _INTEGER:
                out.add(f"{message.DESCRIPTOR.name}.{f.name}")
        elif f.type in _INTEGER:
            out.add(f"{message.DESCRIPTOR.name}.{f.name}")
    return out


def test_every_integer_request_field_has_a_range_check():
    """A new integer field in a request must be added to HTTP_FIELDS (and checked) to pass."""
    found = _integer_fields(pb.SamplingParams) | _integer_fields(pb.TokenIds) | _integer_fields(pb.GenerateRequest)
    assert found == set(HTTP_FIELDS)


def _post(stack, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(stack.http + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("field", sorted(HTTP_FIELDS))
@pytest.mark.parametrize("sign", [1, -1])
def test_http_out_of_range_integers_are_400_naming_the_field(stack, field, sign):
    body, param = HTTP_FIELDS[field](sign * HUGE)
    path = "/v1/completions" if field == "TokenIds.ids" else "/v1/chat/completions"
    base = {"model": MODEL, "max_tokens": 2} if path == "/v1/completions" else \
        {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/completions" and "prompt" not in body:
        base["prompt"] = "hi"
    status, err = _post(stack, path, {**base, **body})
    assert status == 400, (field, status, err)
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error", err


GRPC_BAD = [  # (what the request sets, the field its INVALID_ARGUMENT must name)
    (dict(sampling=pb.SamplingParams(top_k=-1)), "top_k"),
    (dict(sampling=pb.SamplingParams(max_tokens=-1)), "max_tokens"),
    (dict(sampling=pb.SamplingParams(max_tokens=(1 << 31) - 1)), "max_tokens"),
    (dict(sampling=pb.SamplingParams(max_tokens=4, min_tokens=-1)), "min_tokens"),
    (dict(sampling=pb.SamplingParams(max_tokens=4, logprobs=-1)), "logprobs"),
    (dict(sampling=pb.SamplingParams(max_tokens=4, logprobs=1 << 30)), "logprobs"),
    (dict(sampling=pb.SamplingParams(max_tokens=4, logit_bias={-3: 1.0})), "logit_bias"),
    (dict(sampling=pb.SamplingParams(max_tokens=4, logit_bias={(1 << 31) - 1: 1.0})), "logit_bias"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[1, -5]), sampling=pb.SamplingParams(max_tokens=4)), "prompt_token_ids"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[(1 << 31) - 1]), sampling=pb.SamplingParams(max_tokens=4)), "prompt_token_ids"),
]


@pytest.mark.parametrize("fields,name", GRPC_BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(GRPC_BAD)])
def test_grpc_out_of_range_integers_are_invalid_argument_naming_the_field(stack, fields, name):
    req = pb.GenerateRequest(**({"prompt": "hi"} if "prompt_token_ids" not in fields else {}), **fields)
    with pytest.raises(grpc.RpcError) as e:
        list(stack.stub.Generate(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in e.value.details(), e.value.details()


# ---- 3. undecodable requests ---------------------------------------------------------------------
def _undecodable(kind: str, message) -> bytes | None:
    """Bytes that are not a valid `message` (None: this kind cannot break this message)."""
    if kind == "garbage":
        return b"\xff\xff\xff\xff"
    if kind == "11-byte varint":
        return b"\x08" + b"\xff" * 10 + b"\x01"
    strings = [f for f in message.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING and f.number < 16]
    if not strings:  # an empty message keeps unknown fields: nothing to break
        return None
    return bytes([strings[0].number << 3 | 2, 2]) + b"\xc3\x28"  # invalid UTF-8 in a string field


@pytest.mark.parametrize("kind", ["garbage", "invalid UTF-8 in a string", "11-byte varint"])
def test_undecodable_grpc_requests_are_invalid_argument_without_a_traceback(stack, kind, caplog):
    methods = {  # every service, every request shape (unary, server stream, bidi stream)
        stack.gateway[1]: [("/ssd.v1.Gateway/Generate", "unary_stream", pb.GenerateRequest),
                           ("/ssd.v1.Gateway/ListModels", "unary_unary", pb.ListModelsRequest)],
        stack.target[1]: [("/ssd.v1.Target/Run", "unary_stream", pb.RunRequest),
                          ("/ssd.v1.Target/Load", "unary_unary", pb.LoadRequest)],
        stack.draft[1]: [("/ssd.v1.Draft/Load", "unary_unary", pb.LoadRequest),
                         ("/ssd.v1.Draft/Speculate", "stream_stream", pb.SpeculateRequest)],
    }
    tried = 0
    with caplog.at_level(logging.WARNING):
        for port, calls in methods.items():
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            for method, shape, message in calls:
                data = _undecodable(kind, message)
                if data is None:
                    continue
                tried += 1
                call = getattr(channel, shape)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                with pytest.raises(grpc.RpcError) as e:
                    if shape == "unary_unary":
                        call(data, timeout=30)
                    elif shape == "unary_stream":
                        list(call(data, timeout=30))
                    else:
                        list(call(iter([data]), timeout=30))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.code(), e.value.details())
                assert f"is not a valid {message.DESCRIPTOR.full_name}" in e.value.details(), (method, e.value.details())
            channel.close()
    assert tried >= 3
    assert not [r for r in caplog.records if "deserializ" in r.getMessage().lower() or r.exc_info], caplog.text


# ---- 4. reflection describes every service it lists ---------------------------------------------
def _reflect(channel, version: str, requests: list) -> list:
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=30))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_describes_every_listed_service(stack, version):
    """A client that knows nothing but reflection lists each service's names, then builds the
    descriptors of each from the files reflection returns (with their dependencies)."""
    for role in ("gateway", "target", "draft"):
        channel = grpc.insecure_channel(f"127.0.0.1:{getattr(stack, role)[1]}")
        listed = _reflect(channel, version, [reflection_pb2.ServerReflectionRequest(list_services="")])
        names = [s.name for s in listed[0].list_services_response.service]
        assert {f"grpc.reflection.{v}.ServerReflection" for v in ("v1", "v1alpha")} <= set(names)
        pool, files = descriptor_pool.DescriptorPool(), {}
        for name in names:
            reply = _reflect(channel, version, [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)])[0]
            assert reply.WhichOneof("message_response") == "file_descriptor_response", (role, name, reply)
            todo = list(reply.file_descriptor_response.file_descriptor_proto)
            while todo:
                f = descriptor_pb2.FileDescriptorProto.FromString(todo.pop())
                files[f.name] = f
                for dep in f.dependency:
                    if dep not in files:
                        more = _reflect(channel, version, [reflection_pb2.ServerReflectionRequest(file_by_filename=dep)])[0]
                        todo += list(more.file_descriptor_response.file_descriptor_proto)
        added: set[str] = set()

        def add(f):
            for dep in f.dependency:
                if dep not in added:
                    add(files[dep])
            if f.name not in added:
                pool.Add(f)
                added.add(f.name)

        for f in list(files.values()):
            add(f)
        for name in names:
            service = pool.FindServiceByName(name)
            assert service.methods, (role, name)
        channel.close()


# ---- 5. one SERVER span per HTTP request ---------------------------------------------------------
def test_one_server_span_per_http_request_under_the_callers_context(stack, monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # the global provider too: where the web framework would add spans of its own, they land here
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: provider)
    before = stack.gw.tracer
    stack.gw.tracer = provider.get_tracer("test")
    server = HttpServer(create_app(stack.gw))
    try:
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        for stream in (False, True):
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                               "temperature": 0, "stream": stream}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json", "user-agent": "edge-test",
                                                  "traceparent": f"00-{trace_id}-{parent}-01"})
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
            deadline = time.monotonic() + 10  # the span ends just after the server sent the last byte
            while not any(s.kind == SpanKind.SERVER for s in exporter.get_finished_spans()) and time.monotonic() < deadline:
                time.sleep(0.02)
            spans = [s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
            servers = [s for s in spans if s.kind == SpanKind.SERVER]
            assert len(servers) == 1, [(s.name, s.kind) for s in spans]
            http = servers[0]
            assert http.name == "POST /v1/chat/completions" and f"{http.parent.span_id:016x}" == parent
            a = http.attributes
            assert a["http.request.method"] == "POST" and a["http.route"] == "/v1/chat/completions"
            assert a["http.response.status_code"] == 200 and a["url.path"] == "/v1/chat/completions"
            assert a["user_agent.original"] == "edge-test" and a["url.scheme"] == "http" and a["server.port"]
            request = [s for s in spans if s.name == "ssd.request"]
            assert len(request) == 1 and request[0].kind == SpanKind.INTERNAL
            assert request[0].parent.span_id == http.context.span_id
            assert http.start_time <= request[0].start_time <= request[0].end_time <= http.end_time
            assert not [s for s in spans if s.name.startswith("fastapi")]
            exporter.clear()
    finally:
        server.shutdown()
        stack.gw.tracer = before


# ---- 6. bounded request headers ------------------------------------------------------------------
def _raw_get(port: int, headers: list[tuple[str, str]]) -> int:
    head = "GET /healthz HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_request_headers_are_bounded(stack):
    port = int(stack.http.rsplit(":", 1)[1])
    assert _raw_get(port, [("x-ok", "v")]) == 200
    assert _raw_get(port, [(f"x-h{i}", "v") for i in range(MAX_HEADER_COUNT - 3)]) == 200
    assert _raw_get(port, [(f"x-h{i}", "v") for i in range(200)]) == 431
    assert _raw_get(port, [("x-big", "a" * (MAX_HEADER_LINE_BYTES - 100))]) == 200
    assert _raw_get(port, [("x-big", "a" * 100_000)]) == 431
    assert _raw_get(port, [(f"x-m{i}", "a" * 4000) for i in range(12)]) == 431  # each fine, too many bytes together
