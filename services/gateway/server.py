"""Gateway: the client face. gRPC Generate (server stream) and OpenAI-compatible HTTP over the
same generation path: validate, apply the chat template, pick the least loaded target, stream
the target's committed tokens back as text."""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from ssd.config import MODES

from .. import convert
from .. import telemetry as tm
from ..common import client_options
from ..protos import pb, pb_grpc

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1 << 20  # "absurd" max_tokens are rejected before they reach a target
DRAINING = "the gateway is shutting down (draining) and takes no new requests; retry on another replica"
CUT_BY_DRAIN = "the gateway shut down before the request finished (its drain grace period ran out); retry it"


def inter_token_gaps(n_tokens: int, interval_s: float, first: bool) -> list[float]:
    """Inter-token latencies of one streamed response of n_tokens that arrived interval_s after
    the previous one (after the request, for the first). A round commits several tokens at once:
    its interval is spread evenly over them, so a request's gaps add up to its decode time. The
    first response's first token is the TTFT, not a gap."""
    n = n_tokens - 1 if first else n_tokens
    return [interval_s / n] * n if n > 0 else []


class GenerateError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms  # set when the target was full: come back later


class Gateway:
    """Routing and the generation path, shared by the gRPC servicer and the HTTP front.

    discovery: an object with targets() / drafts() -> [Endpoint(address, node)] (static
    addresses for local runs, Kubernetes EndpointSlices in a cluster: services/discovery.py)."""

    def __init__(self, tokenizer, discovery, model_name: str, max_model_len: int, draft_description: str = "",
                 tracer=None, metrics=None):
        self.tracer = tracer or tm.get_tracer()
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.draft_description = draft_description
        self.discovery = discovery
        self._stubs: dict[tuple[str, str], object] = {}
        self.running: dict[str, list] = {}  # request id -> [owner, the target call | None] (for Abort)
        self.draining = False  # set once by drain(): new requests are refused from then on
        self.cut: set[str] = set()  # running requests the drain ended (they fail with CUT_BY_DRAIN)
        self.lock = threading.Lock()
        self._rr = itertools.count()

    def _stub(self, kind: str, addr: str):
        with self.lock:
            stub = self._stubs.get((kind, addr))
            if stub is None:
                channel = grpc.insecure_channel(addr, options=client_options())
                stub = (pb_grpc.TargetStub if kind == "target" else pb_grpc.DraftStub)(channel)
                self._stubs[(kind, addr)] = stub
            return stub

    # ---- routing ---------------------------------------------------------------------------
    def _least_loaded(self, kind: str, endpoints, load_of, parent=None):
        """(endpoint, stub, Load reply) of the least loaded ready endpoint; round robin among
        equals. parent: the request span the Load calls are traced under (CLIENT spans)."""
        best = None
        if not endpoints:
            return None
        start = next(self._rr) % len(endpoints)
        method = "/ssd.v1.Target/Load" if kind == "target" else "/ssd.v1.Draft/Load"
        for ep in endpoints[start:] + endpoints[:start]:
            stub = self._stub(kind, ep.address)
            client = tm.start_client_span(self.tracer, method, parent, ep.address) if parent is not None else None
            try:
                load = stub.Load(pb.LoadRequest(), timeout=2.0, metadata=tm.inject_metadata(client) if client else None)
            except grpc.RpcError as e:
                if client is not None:
                    tm.end_rpc_span(client, e.code().value[0], e.details() or "")
                continue
            if client is not None:
                tm.end_rpc_span(client, 0)
            if best is None or load_of(load) < load_of(best[2]):
                best = (ep, stub, load)
        return best

    def ready(self) -> bool:
        """True when some target answers and the gateway is not draining (readiness: /health,
        the gRPC health service)."""
        return not self.draining and self._least_loaded("target", self.discovery.targets(), lambda l: l.running + l.waiting) is not None

    def pick_target(self, parent=None):
        """Least loaded ready target (running + waiting)."""
        best = self._least_loaded("target", self.discovery.targets(), lambda l: l.running + l.waiting, parent)
        if best is None:
            raise GenerateError(grpc.StatusCode.UNAVAILABLE, "no target is ready")
        ep, stub, load = best
        return ep.address, stub, ep.node or load.node

    def pick_draft(self, node: str, parent=None) -> str:
        """Least loaded draft, on the target's node when any draft runs there (NCCL P2P; no
        network hop for q rows). Empty: let the target use its own drafts."""
        drafts = self.discovery.drafts()
        local = [d for d in drafts if node and d.node == node]
        best = self._least_loaded("draft", local or drafts, lambda l: l.sequences + l.queue_depth, parent)
        return best[0].address if best is not None else ""
    # ---- the generation path ---------------------------------------------------------------
    def check_size(self, req) -> None:
        """Refuse a text that cannot fit in the context before paying to tokenize it: more than
        max_model_len x (the longest token's bytes) bytes is more than max_model_len tokens."""
        which = req.WhichOneof("input")
        if which == "prompt":
            n = len(req.prompt.encode("utf-8", "replace"))
        elif which == "messages":
            n = sum(len(m.content.encode("utf-8", "replace")) for m in req.messages.messages)
        else:
            return
        limit = self.max_model_len * self.tokenizer.longest_token_bytes()
        if n > limit:
            raise GenerateError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the prompt's {n} bytes are more than {self.max_model_len} tokens (the context length)")

    def prompt_ids(self, req) -> list[int]:
        self.check_size(req)
        which = req.WhichOneof("input")
        if which == "prompt":
            if not req.prompt.strip():
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
            return self.tokenizer.encode(req.prompt)
        if which == "messages":
            msgs = [{"role": m.role, "content": m.content} for m in req.messages.messages]
            if not msgs or not any(m["content"].strip() for m in msgs):
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "messages are empty")
            bad = [m["role"] for m in msgs if m["role"] not in ("system", "user", "assistant")]
            if bad:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {bad[0]!r}")
            return self.tokenizer.apply_chat_template(msgs)
        if which == "prompt_token_ids":
            ids = list(req.prompt_token_ids.ids)
            if not ids:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
            bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"prompt_token_ids: token id {bad[0]} outside "
                                                                      f"the vocabulary [0, {self.tokenizer.vocab_size})")
            return ids
        raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "one of prompt, messages, prompt_token_ids is required")

    def generate(self, req, deadline_s: float | None = None, parent_ctx=None, owner=None, fill_max_tokens: bool = False,
                 rpc_method: str | None = None, http_route: str | None = None):
        """Yields GenerateResponse messages; raises GenerateError on bad input or target errors.
        The request's span (`ssd.request`) covers it all; a CLIENT span for the target call
        carries its context to the target. fill_max_tokens: sampling.max_tokens 0 means "the
        rest of the context" (OpenAI chat). rpc_method: the gRPC method being served
        (`ssd.request` is its SERVER span, with the rpc.* attributes); http_route: the HTTP route
        being served (`ssd.request` is an INTERNAL child of the HTTP SERVER span, parent_ctx)."""
        attrs = tm.rpc_attributes(rpc_method) if rpc_method else {}
        if http_route:
            attrs[tm.HTTP_ROUTE] = http_route
        kind = SpanKind.INTERNAL if http_route else SpanKind.SERVER
        span = self.tracer.start_span(tm.SPAN_REQUEST, context=parent_ctx, kind=kind, attributes=attrs or None)
        code = grpc.StatusCode.OK
        try:  # not made current: the generator resumes on whichever thread the server picks
            yield from self._generate(req, deadline_s, span, owner, fill_max_tokens)
        except GenerateError as e:
            code = e.code
            span.set_status(Status(StatusCode.ERROR, f"{e.code.name}: {e}"))
            raise
        except GeneratorExit:  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if rpc_method:
                span.set_attribute(tm.RPC_GRPC_STATUS_CODE, code.value[0])
            span.end()

    def _generate(self, req, deadline_s, span, owner, fill_max_tokens=False):
        if self.draining:
            raise GenerateError(grpc.StatusCode.UNAVAILABLE, DRAINING)
        if req.model and req.model != self.model_name:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown model {req.model!r}; served: {self.model_name!r}")
        if req.mode and req.mode not in MODES:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown mode {req.mode!r}; one of {', '.join(MODES)}")
        if req.sampling.max_tokens > MAX_TOKENS_LIMIT:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {req.sampling.max_tokens}")
        fill = fill_max_tokens and req.sampling.max_tokens == 0
        if fill:
            req.sampling.max_tokens = 1  # validated below; set to the rest of the context once the prompt is known
        try:
            params = convert.sampling_from_pb(req.sampling)
        except ValueError as e:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        ids = self.prompt_ids(req)
        if fill and len(ids) + 1 <= self.max_model_len:
            req.sampling.max_tokens = self.max_model_len - len(ids)
            params = convert.sampling_from_pb(req.sampling)
        if len(ids) + 1 > self.max_model_len:
            raise GenerateError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"prompt has {len(ids)} tokens; the context length is {self.max_model_len}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds the context length {self.max_model_len}")
        span.set_attributes(self._gen_ai_attributes(req, params, len(ids)))
        request_id = req.request_id or uuid.uuid4().hex
        with self.lock:  # reserve the id now: two concurrent requests with one id must not both run
            if self.draining:  # the drain began since the check above: it waits only for what it saw
                raise GenerateError(grpc.StatusCode.UNAVAILABLE, DRAINING)
            if request_id in self.running:
                raise GenerateError(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
            self.running[request_id] = [owner, None]
        try:
            addr, stub, node = self.pick_target(span)
        except GenerateError:
            with self.lock:
                self.running.pop(request_id, None)
            raise
        draft = self.pick_draft(node, span)
        span.set_attributes({tm.ATTR_REQUEST_ID: request_id, "ssd.model": self.model_name, "ssd.prompt_tokens": len(ids),
                             "ssd.target": addr, "ssd.draft": draft, "ssd.node": node})
        t_start = last = time.perf_counter()
        client = tm.start_client_span(self.tracer, "/ssd.v1.Target/Run", span, addr)
        call = stub.Run(pb.RunRequest(seq_id=request_id, prompt_token_ids=ids, sampling=req.sampling, mode=req.mode,
                                      draft_address=draft), timeout=deadline_s, metadata=tm.inject_metadata(client))
        with self.lock:
            aborted = request_id not in self.running  # Abort arrived while we picked a target
            self.running[request_id] = [owner, call]
        if aborted:
            self.abort(request_id)
        decoder = self.tokenizer.stream_decoder()
        produced = 0
        status = (grpc.StatusCode.UNKNOWN, "the gateway failed")  # until the call ends one way or another
        try:
            for resp in call:
                now = time.perf_counter()
                if self.metrics is not None and resp.token_ids:
                    if produced == 0:
                        self.metrics.observe_ttft(now - t_start)
                    for gap in inter_token_gaps(len(resp.token_ids), now - last, produced == 0):
                        self.metrics.observe_itl(gap)
                last = now
                produced += len(resp.token_ids)
                text = "".join(decoder.push(t) for t in resp.token_ids)
                out = pb.GenerateResponse(request_id=request_id, token_ids=resp.token_ids, text=text, logprobs=resp.logprobs)
                if resp.finish_reason:
                    span.set_attributes({"ssd.completion_tokens": produced, "ssd.finish_reason": resp.finish_reason,
                                         "ssd.rounds": resp.stats.num_rounds, tm.GEN_AI_OUTPUT_TOKENS: produced,
                                         tm.GEN_AI_FINISH_REASONS: [resp.finish_reason]})
                    if self.metrics is not None:
                        self.metrics.request_finished(resp.finish_reason, len(ids), produced, now - t_start)
                    out.finish_reason = resp.finish_reason
                    out.usage.CopyFrom(pb.Usage(prompt_tokens=len(ids), completion_tokens=produced))
                    out.stats.CopyFrom(resp.stats)
                yield out
            status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as e:
            status = (e.code(), e.details() or "")
            if e.code() == grpc.StatusCode.CANCELLED and request_id not in self.running:
                if request_id in self.cut:  # the drain's grace ran out: say so, do not just stop
                    raise GenerateError(grpc.StatusCode.UNAVAILABLE, CUT_BY_DRAIN) from None
                yield pb.GenerateResponse(request_id=request_id, finish_reason="abort",
                                          usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=produced))
                return
            retry = dict(e.trailing_metadata() or ()).get("retry-after-ms")
            raise GenerateError(e.code(), e.details() or str(e.code()),
                                int(retry) if retry and retry.isdigit() else None) from None
        except GeneratorExit:  # our reader left before the end: the target call is cancelled below
            status = (grpc.StatusCode.CANCELLED, "the client went away")
            raise
        finally:
            with self.lock:
                self.running.pop(request_id, None)
                self.cut.discard(request_id)
            call.cancel()  # no-op when finished; frees the target sequence when the client left
            tm.end_rpc_span(client, status[0].value[0], status[1])

    def _gen_ai_attributes(self, req, params, prompt_tokens: int) -> dict:
        """The conventions' gen_ai.* request attributes (the usage and finish reasons follow
        with the last response)."""
        return {tm.GEN_AI_SYSTEM: tm.GEN_AI_SYSTEM_NAME, tm.GEN_AI_PROVIDER: tm.GEN_AI_SYSTEM_NAME,
                tm.GEN_AI_OPERATION: "chat" if req.WhichOneof("input") == "messages" else "text_completion",
                tm.GEN_AI_REQUEST_MODEL: req.model or self.model_name, tm.GEN_AI_MAX_TOKENS: params.max_tokens,
                tm.GEN_AI_TEMPERATURE: params.temperature, tm.GEN_AI_TOP_P: params.top_p,
                tm.GEN_AI_INPUT_TOKENS: prompt_tokens}

    def drain(self, deadline: float, margin_s: float = 1.0) -> None:
        """Refuse new requests from now on (UNAVAILABLE, HTTP 503); let the running ones finish
        until margin_s before deadline (a time.monotonic() instant), then end those left with
        an explicit UNAVAILABLE (an HTTP stream gets an error event and [DONE]) instead of
        letting the servers' stop cut them; returns once they have ended or the deadline passed."""
        with self.lock:
            self.draining = True
        while self.running and time.monotonic() < deadline - margin_s:
            time.sleep(0.05)
        with self.lock:
            left = list(self.running)
            self.cut.update(left)
        if left:
            log.warning("drain: ending %d requests still running", len(left))
        for request_id in left:
            self.abort(request_id)
        while self.cut and time.monotonic() < deadline:
            time.sleep(0.05)

    def abort(self, request_id: str, owner=None) -> bool:
        """owner: only the request started by that owner (a failed duplicate must not cancel
        the request whose id it reused)."""
        with self.lock:
            entry = self.running.get(request_id)
            if entry is None or (owner is not None and entry[0] is not owner):
                return False
            del self.running[request_id]
        call = entry[1]
        if call is not None:  # None: still being routed; generate() cancels the call it starts
            call.cancel()
        return True


def watch_readiness(gw: Gateway, hs, service_names: list[str], interval_s: float = 2.0) -> threading.Event:
    """Keep the gateway's gRPC health in step with reality: SERVING while some target answers,
    NOT_SERVING while none does (load balancers and readiness probes stop sending it requests
    that could only fail). Returns the Event that stops the watcher. A draining server's health
    stays NOT_SERVING (the health servicer ignores updates after its graceful shutdown)."""
    from grpc_health.v1 import health_pb2

    from ..protos import pb as _pb

    names = [_pb.DESCRIPTOR.services_by_name[n].full_name for n in service_names] + [""]
    stop = threading.Event()

    def loop():
        last = None
        while True:
            try:
                ready = gw.ready()
            except Exception:  # noqa: BLE001 - discovery trouble counts as "no target"
                ready = False
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            if status != last:
                if last is not None:
                    log.warning("gateway readiness: %s", "a target is ready" if ready else "no target is ready")
                for n in names:
                    hs.set(n, status)
                last = status
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, daemon=True, name="gateway-readiness").start()
    return stop


NO_DEADLINE_S = 10 * 365 * 24 * 3600.0  # beyond this a "remaining time" means the client set none


def client_deadline(context) -> float | None:
    """Seconds left of the client's deadline, or None when it set none. gRPC Python reports "no
    deadline" as about 9.2e18 s, which as a downstream timeout= expires at once."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else max(remaining, 0.0)


class GatewayService(pb_grpc.GatewayServicer):
    def __init__(self, gw: Gateway):
        self.gw = gw

    def Generate(self, request, context):
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        # client cancel or deadline -> the target call is cancelled -> its KV and draft state freed
        owner = object()
        context.add_callback(lambda: self.gw.abort(request.request_id, owner))
        try:
            yield from self.gw.generate(request, deadline_s=client_deadline(context), parent_ctx=tm.extract_grpc(context),
                                        owner=owner, rpc_method="/ssd.v1.Gateway/Generate")
        except GenerateError as e:
            if e.retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(e.retry_after_ms)),))
            context.abort(e.code, str(e))

    def Abort(self, request, context):
        return pb.AbortResponse(aborted=self.gw.abort(request.request_id))

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=self.gw.model_name, max_model_len=self.gw.max_model_len,
            vocab_size=self.gw.tokenizer.vocab_size, draft=self.gw.draft_description)])
