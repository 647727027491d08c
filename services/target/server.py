"""Target service: ssd.v1.Target over one core engine (continuous batching). A single engine
thread steps the batch; each Run rpc adds a sequence and streams its committed tokens."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

import grpc
from opentelemetry.trace import SpanKind

from ssd.config import MODES, RequestOptions
from ssd.engine import AREngine, SSDEngine
from ssd.engine.draft_link import DraftUnavailable
from ssd.errors import ContextTooLong
from ..multi_draft import MultiDraftLink

from .. import convert
from .. import telemetry as tm
from ..common import stats_to_pb
from ..observe import TargetObserver
from ..protos import pb, pb_grpc

log = logging.getLogger(__name__)


class EngineLoop:
    """Owns the engine: only its thread touches it. Other threads hand it work through an inbox
    under a lock that is held for microseconds, never across an engine step, so a request
    arriving or a client cancelling (whose callback runs on gRPC's own polling thread) never
    waits for a step to finish."""

    def __init__(self, engine, tracer=None, metrics=None):
        self.engine = engine
        self.metrics = metrics
        engine.on_step = TargetObserver(tracer or tm.get_tracer(), metrics, draft_of=self._draft_of).on_step
        self.cv = threading.Condition()
        self.inbox: list[tuple] = []  # ("add", prompt_ids, params, options, Future) | ("abort", seq)
        self.streams: dict[int, queue.Queue] = {}  # engine thread only
        # (running, waiting, free KV slots) as the engine thread last saw them: other threads read
        # this snapshot (one tuple, replaced whole) instead of the engine's own state
        self._load = (0, 0, engine.target.cache.num_free)
        self.stopped = False
        self.draining = False  # drain(): new requests refused, the running ones go on
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine-loop")
        self.thread.start()

    def _draft_of(self, seq_id: int) -> str:
        """The draft serving a sequence (its address), "" without one (engine thread only)."""
        return getattr(getattr(self.engine, "link", None), "owner", {}).get(seq_id, "")

    def _post(self, item) -> None:
        with self.cv:
            if self.stopped:
                raise RuntimeError("the target is shutting down")
            self.inbox.append(item)
            self.cv.notify()

    def submit(self, prompt_ids, params, options=None, timeout: float = 60.0) -> tuple[object, queue.Queue]:
        """Blocks until the engine thread admitted the request (at most one step); raises
        ValueError for bad input, QueueFull when max_queue requests already wait for a slot."""
        fut: Future = Future()
        limit = self.engine.cfg.max_queue
        with self.cv:
            if self.stopped or self.draining:
                raise RuntimeError("the target is shutting down (draining): it takes no new requests")
            waiting = self._load[1] + sum(1 for item in self.inbox if item[0] == "add")
            if limit and waiting >= limit:
                raise QueueFull(f"the target's queue is full ({waiting} requests waiting for "
                                f"{self.engine.cfg.max_batch} slots); retry later")
            self.inbox.append(("add", prompt_ids, params, options, fut))
            self.cv.notify()
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            if fut.cancel():  # not admitted yet: the engine thread will skip it
                raise
            seq, _ = fut.result()  # admitted just now: free it
            self.abort(seq)
            raise

    def abort(self, seq) -> None:
        """Non-blocking: the engine thread frees the sequence before its next step."""
        try:
            self._post(("abort", seq))
        except RuntimeError:
            pass

    def load(self) -> tuple[int, int, int]:
        """(running, waiting, free KV slots), safe from any thread: the engine thread's last snapshot
        plus the requests still in the inbox (they count as waiting)."""
        running, waiting, free = self._load
        with self.cv:
            queued = sum(1 for item in self.inbox if item[0] == "add")
        return running, waiting + queued, free

    def _snapshot(self) -> None:
        sch = self.engine.scheduler
        self._load = (len(sch.running), len(sch.waiting), self.engine.target.cache.num_free)

    def _apply(self, items) -> None:
        for item in items:
            if item[0] == "add":
                _, prompt_ids, params, options, fut = item
                if not fut.set_running_or_notify_cancel():  # the caller gave up waiting
                    continue
                try:
                    seq = self.engine.add_request(prompt_ids, params, options)
                except ValueError as e:
                    fut.set_exception(e)
                    continue
                q: queue.Queue = queue.Queue()
                self.streams[seq.seq_id] = q
                fut.set_result((seq, q))
            else:
                seq = item[1]
                if not seq.finished:
                    self.engine.abort(seq)
                q = self.streams.pop(seq.seq_id, None)
                if q is not None:
                    q.put(None)

    def _run(self):
        while True:
            with self.cv:
                while not self.stopped and not self.inbox and not self.engine.has_unfinished():
                    self.cv.wait()
                if self.stopped:
                    break
                items, self.inbox = self.inbox, []
            self._apply(items)
            self._snapshot()
            if not self.engine.has_unfinished():
                self._idle()  # e.g. the last request was aborted
                continue
            try:
                events = self.engine.step()
            except Exception:  # never leave clients hanging: fail every open stream
                log.exception("engine step failed")
                for q in self.streams.values():
                    q.put(RuntimeError("engine step failed"))
                self.streams.clear()
                continue
            self._snapshot()
            if self.metrics is not None:
                self.metrics.set_running(self._load[0])
                self.metrics.set_waiting(self._load[1])
            for seq, tokens, start in merge_step_events(events):
                q = self.streams.get(seq.seq_id)
                if q is None:
                    continue
                lps = seq.logprobs[start:start + len(tokens)] if seq.params.logprobs is not None else ()
                q.put((tokens, seq.finish_reason if seq.finished else None, lps))
                if seq.finished:
                    self.streams.pop(seq.seq_id, None)
            if not self.engine.has_unfinished():
                self._idle()
        for item in self.inbox:  # submitted while stopping
            if item[0] == "add":
                item[4].set_exception(RuntimeError("the target is shutting down"))
        for q in self.streams.values():
            q.put(RuntimeError("the target is shutting down"))

    def _idle(self) -> None:
        try:
            self.engine.idle()
        except Exception:  # best effort: the next request's round carries the same ops
            log.exception("engine idle hook failed")

    def drain(self) -> None:
        """Refuse new requests from now on (UNAVAILABLE); the running ones go on (the gRPC
        server's graceful stop waits for them)."""
        with self.cv:
            self.draining = True

    def stop(self):
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=10)
        self.engine.close()


def merge_step_events(events) -> list[tuple]:
    """One (seq, tokens, start) per sequence from a step's events, in the order each sequence first
    appears; start is where its tokens begin in its output. A step may commit twice for one
    sequence (its prefill token, then a round): both are read after the step, when the sequence
    may already be finished, so they are sent as one message that carries the finish reason; two
    messages would put the finish on the first and drop the second."""
    merged: dict[int, list] = {}
    for seq, tokens in events:
        entry = merged.setdefault(seq.seq_id, [seq, []])
        entry[1].extend(tokens)
    return [(seq, tokens, len(seq.output_ids) - len(tokens)) for seq, tokens in merged.values()]


class QueueFull(Exception):
    pass


RETRY_AFTER_MS = 1000  # advice sent with a full queue (trailing metadata "retry-after-ms")


class TargetService(pb_grpc.TargetServicer):
    def __init__(self, loop: EngineLoop, node: str = "", tracer=None):
        self.loop = loop
        self.node = node
        self.tracer = tracer or tm.get_tracer()

    def Run(self, request, context):
        # a live span for the sequence's life here; its context parents every ssd.verify span
        # of the sequence and travels to the draft (ssd.speculate spans)
        span = self.tracer.start_span("ssd.target.run", context=tm.extract_grpc(context), kind=SpanKind.SERVER,
                                      attributes={tm.ATTR_REQUEST_ID: request.seq_id,
                                                  **tm.rpc_attributes("/ssd.v1.Target/Run")})
        code = grpc.StatusCode.CANCELLED  # unless the stream ends (OK) or is aborted (its code)
        try:  # not made current: the generator resumes on whichever thread gRPC picks
            yield from self._run(request, context, span)
            code = grpc.StatusCode.OK
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN  # context.abort set it before raising
            raise
        finally:
            span.set_attribute(tm.RPC_GRPC_STATUS_CODE, code.value[0])
            span.end()

    def _run(self, request, context, span):
        try:
            params = convert.sampling_from_pb(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.mode and request.mode not in MODES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown mode {request.mode!r}; one of {', '.join(MODES)}")
        options = RequestOptions(mode=request.mode or None, draft=request.draft_address, request_id=request.seq_id,
                                 traceparent=tm.traceparent_of(span) if span.get_span_context().is_valid else "")
        try:
            seq, q = self.loop.submit(list(request.prompt_token_ids), params, options)
        except ContextTooLong as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except QueueFull as e:  # admission control: the client should come back later
            context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RuntimeError, TimeoutError) as e:  # draining, or the engine thread is wedged
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e) or "the target did not admit the request in time")
        # a client that cancels or whose deadline passes frees the sequence's KV and draft state;
        # one that left while the request was being admitted gets the same
        if not context.add_callback(lambda: self.loop.abort(seq)):
            self.loop.abort(seq)
            return
        try:
            yield from self._stream(seq, q, span, context)
        finally:  # the generator closed early (client gone): nothing keeps decoding for nobody
            if not seq.finished:
                self.loop.abort(seq)

    def _stream(self, seq, q, span, context):
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, str(item))
            tokens, finish, lps = item
            if finish == "error":  # this request failed alone; its neighbours were not touched
                context.abort(grpc.StatusCode.INTERNAL, f"the request failed: {seq.error}")
            if finish is None:
                yield pb.RunResponse(token_ids=tokens, logprobs=convert.logprobs_to_pb(lps))
            else:
                span.set_attributes({"ssd.finish_reason": finish, "ssd.completion_tokens": len(seq.output_ids),
                                     "ssd.rounds": seq.spec_stats.num_rounds})
                yield pb.RunResponse(token_ids=tokens, finish_reason=finish, stats=stats_to_pb(seq.spec_stats),
                                     logprobs=convert.logprobs_to_pb(lps))
                return

    def Load(self, request, context):
        running, waiting, free = self.loop.load()
        return pb.LoadResponse(running=running, waiting=waiting, free_slots=free, node=self.node)


def build_target_engine(cfg, target_model, eos, draft_addresses, index=None, tensor_channel: str = "inline", device: str = "cpu",
                        draft_wait_s: float = 60.0):
    """The target service's engine (ssd.engine.build_engine builds the in-process ones): SSD over
    every reachable draft (MultiDraftLink: sequences spread over replicas, more
    drafts joined on demand when the gateway names them, lost ones retried); target-only (AR)
    when none answers within draft_wait_s: a missing draft never blocks serving."""
    if isinstance(draft_addresses, str):
        draft_addresses = [a for a in draft_addresses.split(",") if a]
    if draft_addresses:
        from ..draft_link import GrpcDraftLink

        k = cfg.speculation.num_speculative_tokens

        def connect(addr):  # short: a join happens inside an engine step
            return GrpcDraftLink(addr, k=k, timeout=10.0, tensor_channel=tensor_channel, device=device)

        deadline = time.monotonic() + draft_wait_s
        while True:  # pods start together: give the drafts a moment to come up
            try:
                link = MultiDraftLink(connect, draft_addresses)
                return SSDEngine(cfg.replace(mode="ssd"), target_model, None, eos, link=link, index=index)
            except DraftUnavailable as e:
                if time.monotonic() >= deadline:
                    log.warning("no draft available among %s (%s): serving target-only", draft_addresses, e)
                    break
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    return AREngine(cfg.replace(mode="ar"), target_model, eos)
