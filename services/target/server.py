"""Target service: ssd.v1.Target over one core engine (continuous batching). A single engine
thread steps the batch; each Run rpc adds a sequence and streams its committed tokens."""
from __future__ import annotations

import logging
import queue
import threading

import grpc
from opentelemetry.trace import SpanKind

from ssd.engine import AREngine, SSDEngine
from ssd.engine.draft_link import DraftUnavailable
from ssd.engine.multi_draft import MultiDraftLink

from .. import convert
from .. import telemetry as tm
from ..common import stats_to_pb
from ..observe import TargetObserver
from ..protos import pb, pb_grpc

log = logging.getLogger(__name__)


class EngineLoop:
    """Owns the engine; other threads talk to it only through submit/abort."""

    def __init__(self, engine, tracer=None, metrics=None):
        self.engine = engine
        self.metrics = metrics
        engine.on_step = TargetObserver(tracer or tm.get_tracer(), metrics).on_step
        self.cv = threading.Condition()
        self.streams: dict[int, queue.Queue] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine-loop")
        self.thread.start()

    def submit(self, prompt_ids, params, meta=None) -> tuple[object, queue.Queue]:
        with self.cv:
            seq = self.engine.add_request(prompt_ids, params, meta)  # ValueError: bad input
            q: queue.Queue = queue.Queue()
            self.streams[seq.seq_id] = q
            self.cv.notify()
        return seq, q

    def abort(self, seq) -> None:
        with self.cv:
            if not seq.finished:
                self.engine.abort(seq)
                q = self.streams.pop(seq.seq_id, None)
                if q is not None:
                    q.put(None)

    def load(self) -> tuple[int, int, int]:
        sch = self.engine.scheduler
        return len(sch.running), len(sch.waiting), self.engine.target.cache.num_free

    def _run(self):
        while True:
            with self.cv:
                while not self.stopped and not self.engine.has_unfinished():
                    self.cv.wait()
                if self.stopped:
                    return
                try:
                    events = self.engine.step()
                except Exception:  # never leave clients hanging: fail every open stream
                    log.exception("engine step failed")
                    for q in self.streams.values():
                        q.put(RuntimeError("engine step failed"))
                    self.streams.clear()
                    continue
                if self.metrics is not None:
                    self.metrics.set_running(len(self.engine.scheduler.running))
                    self.metrics.set_waiting(len(self.engine.scheduler.waiting))
                for seq, tokens in events:
                    q = self.streams.get(seq.seq_id)
                    if q is None:
                        continue
                    q.put((tokens, seq.finish_reason if seq.finished else None))
                    if seq.finished:
                        self.streams.pop(seq.seq_id, None)

    def stop(self):
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=10)
        self.engine.close()


class TargetService(pb_grpc.TargetServicer):
    def __init__(self, loop: EngineLoop, node: str = "", tracer=None):
        self.loop = loop
        self.node = node
        self.tracer = tracer or tm.get_tracer()

    def Run(self, request, context):
        # a live span for the sequence's life here; its context parents every ssd.verify span
        # of the sequence and travels to the draft (ssd.speculate spans)
        span = self.tracer.start_span("ssd.target.run", context=tm.extract_grpc(context), kind=SpanKind.SERVER,
                                      attributes={tm.ATTR_REQUEST_ID: request.seq_id})
        try:  # not made current: the generator resumes on whichever thread gRPC picks
            yield from self._run(request, context, span)
        finally:
            span.end()

    def _run(self, request, context, span):
        try:
            params = convert.sampling_from_pb(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        meta = {"request_id": request.seq_id}
        if request.draft_address:
            meta["draft"] = request.draft_address
        if span.get_span_context().is_valid:
            meta["traceparent"] = tm.traceparent_of(span)
        try:
            seq, q = self.loop.submit(list(request.prompt_token_ids), params, meta)
        except ValueError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "context length" in str(e) else grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(e))
        # a client that cancels or whose deadline passes frees the sequence's KV and draft state
        context.add_callback(lambda: self.loop.abort(seq))
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, str(item))
            tokens, finish = item
            if finish is None:
                yield pb.RunResponse(token_ids=tokens)
            else:
                span.set_attributes({"ssd.finish_reason": finish, "ssd.completion_tokens": len(seq.output_ids),
                                     "ssd.rounds": seq.spec_stats.num_rounds})
                yield pb.RunResponse(token_ids=tokens, finish_reason=finish, stats=stats_to_pb(seq.spec_stats))
                return

    def Load(self, request, context):
        running, waiting, free = self.loop.load()
        return pb.LoadResponse(running=running, waiting=waiting, free_slots=free, node=self.node)


def build_engine(cfg, target_model, eos, draft_addresses, index=None, tensor_channel: str = "inline", device: str = "cpu"):
    """SSD over every reachable draft (MultiDraftLink: sequences spread over replicas, more
    drafts joined on demand when the gateway names them); target-only (AR) when none is
    reachable: a missing draft never blocks serving (invariant 2)."""
    if isinstance(draft_addresses, str):
        draft_addresses = [a for a in draft_addresses.split(",") if a]
    if draft_addresses:
        from ..draft_link import GrpcDraftLink

        k = cfg.spec.num_speculative_tokens
        try:
            link = MultiDraftLink(lambda addr: GrpcDraftLink(addr, k=k, tensor_channel=tensor_channel, device=device),
                                  draft_addresses)
            return SSDEngine(cfg.replace(mode="ssd"), target_model, {}, eos, link=link, index=index)
        except DraftUnavailable as e:
            log.warning("no draft available among %s (%s): serving target-only", draft_addresses, e)
    return AREngine(cfg.replace(mode="ar"), target_model, eos)
