"""Draft service: ssd.v1.Draft over the core RoundServer. One model, many target streams; the
rounds of different streams are served one at a time (one model, one thread budget)."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid

import grpc
import torch

from ssd.config import SpeculationConfig
from ssd.engine.draft_runner import DraftRunner
from ssd.engine.draft_worker import RoundServer
from ssd.engine.protocol import Release
from ssd.models.draft import describe, load_draft
from ssd.speculation.index import draft_fingerprint
from ..tensor_channel import TensorChannel, default_backend

from .. import convert
from ..common import make_server
from .. import telemetry as tm
from ..observe import DraftObserver
from ..protos import pb, pb_grpc

log = logging.getLogger(__name__)


class DraftService(pb_grpc.DraftServicer):
    def __init__(self, draft_desc, speculation: SpeculationConfig, max_seqs: int = 64, max_model_len: int = 2048, seed: int = 0,
                 index=None, node: str = "", channel_host: str = "0.0.0.0", advertise_host: str = "",
                 tracer=None, metrics=None):
        self.model = load_draft(draft_desc)
        self.description = describe(draft_desc)
        self.fingerprint = draft_fingerprint(self.description, speculation)
        self.index = index
        self.server = RoundServer(DraftRunner(self.model, speculation, max_seqs, max_model_len, seed), index, self.fingerprint)
        self.server.on_round = DraftObserver(tracer or tm.get_tracer(), metrics, self.server).on_round
        self.metrics = metrics
        self.lock = threading.Lock()
        self._depth_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.queue_depth = 0
        self.node = node
        self.channel_host = channel_host
        self.advertise_host = advertise_host
        self.channels: dict[str, tuple] = {}  # channel id -> (offered at, Future[TensorChannel]) until a stream takes it
        self.device = next(self.model.parameters()).device

    def Load(self, request, context):
        return pb.DraftLoadResponse(sequences=len(self.server.runner.seqs), queue_depth=self.queue_depth,
                                    vocab_size=self.model.cfg.vocab_size, model=self.description, node=self.node,
                                    fingerprint=self.fingerprint, publishes=self.index is not None,
                                    feature_layers=list(self.server.runner.feature_layers))

    def _queue(self, delta: int) -> None:
        """Rounds waiting for the model (every target stream shares it): the autoscaling signal."""
        with self._depth_lock:
            self.queue_depth += delta
            if self.metrics is not None:
                self.metrics.set_draft_queue(self.queue_depth)

    def OpenChannel(self, request, context):
        if request.backend not in ("", "gloo", "nccl"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown tensor channel backend {request.backend!r} (gloo | nccl)")
        backend = request.backend or default_backend(self.device)
        if backend == "nccl" and self.device.type != "cuda":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nccl needs the draft on a GPU; use gloo")
        try:
            port, fut = TensorChannel.listen(backend, self.device, host=self.channel_host)
        except Exception as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"tensor channel: {e}")
        channel_id = uuid.uuid4().hex
        now = time.monotonic()
        for cid, (t, f) in list(self.channels.items()):  # offered but never taken by a stream
            if now - t > 120:
                del self.channels[cid]
                if f.done() and f.exception() is None:
                    f.result().close()
        self.channels[channel_id] = (now, fut)
        return pb.OpenChannelResponse(channel_id=channel_id, port=port, backend=backend, device=str(self.device),
                                      host=self.advertise_host)

    def _take_channel(self, context):
        channel_id = dict(context.invocation_metadata()).get("ssd-channel")
        if not channel_id:
            return None
        entry = self.channels.pop(channel_id, None)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tensor channel {channel_id!r}")
        fut = entry[1]
        try:
            return fut.result(timeout=30)
        except Exception as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"tensor channel {channel_id} not joined: {e}")

    def Speculate(self, request_iterator, context):
        channel = self._take_channel(context)
        names: dict[int, str] = {}  # draft id -> the target's seq id, for this stream
        ids: dict[str, int] = {}
        vocab, head = self.server.runner.vocab_size, self.server.runner.head_ids  # q rows are over the head
        depth = self.server.runner.K  # the channel tensor's rows per speculation

        def seq_key(name: str) -> int:
            if name not in ids:
                ids[name] = next(self._ids)
                names[ids[name]] = name
            return ids[name]

        inbox: queue.Queue = queue.Queue()
        outbox: queue.Queue = queue.Queue()

        def read():
            try:
                for req in request_iterator:
                    inbox.put(req)
            except grpc.RpcError:
                pass
            inbox.put(None)

        ordered: queue.Queue = queue.Queue()

        def send(reply):
            if channel is None:
                outbox.put(reply[0])
            else:  # the tensor goes out from its own thread: a slow or dead target never holds the model lock
                ordered.put(reply)

        def send_tensors():
            while (item := ordered.get()) is not None:
                resp, rows = item
                outbox.put(resp)
                if rows is not None:  # after the response that announces it; the target reads in order
                    try:
                        channel.send(rows)
                    except Exception as e:  # the target went away mid-transfer: end this stream
                        outbox.put(e)
                        return

        def work():
            try:
                while (req := inbox.get()) is not None:
                    msg = convert.round_from_pb(req, seq_key)
                    self._queue(+1)
                    with self.lock:
                        self._queue(-1)
                        self.server.handle(
                            msg,
                            send=lambda m: send(convert.reply_to_pb(m, names.__getitem__, vocab, head, channel is not None, depth)),
                            poll=lambda: not inbox.empty(),
                            put_q=lambda kind, round_id, slot, probs: ("inline", probs),
                        )
                    for op in msg.ops:  # forget released sequences' names (a stream lives long)
                        if isinstance(op, Release):
                            ids.pop(names.pop(op.seq_id, None), None)
            except Exception as e:  # a failed round ends this stream; the target falls back
                log.exception("draft round failed")
                outbox.put(e)
            finally:
                with self.lock:  # the target went away: free everything of this stream
                    for i in list(names):
                        self.server.forget(i)
                if channel is not None:
                    ordered.put(None)
                    sender.join(timeout=60)
                    channel.close()
                outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        if channel is not None:
            sender = threading.Thread(target=send_tensors, daemon=True)
            sender.start()
        threading.Thread(target=work, daemon=True).start()
        while (item := outbox.get()) is not None:
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, f"draft round failed: {item}")
            yield item


def serve(draft_desc, speculation: SpeculationConfig, address: str = "127.0.0.1:0", threads: int = 1, **kw):
    """Start the draft service; returns (grpc server, bound port)."""
    torch.set_num_threads(threads)
    server = make_server(max_workers=16)
    pb_grpc.add_DraftServicer_to_server(DraftService(draft_desc, speculation, **kw), server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port
