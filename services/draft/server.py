"""Draft service: ssd.v1.Draft over the core RoundServer. One model, many target streams; the
rounds of different streams are served one at a time (one model, one thread budget)."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent import futures

import grpc
import torch

from ssd.config import SpecConfig
from ssd.engine.draft_runner import DraftRunner
from ssd.engine.draft_worker import RoundServer
from ssd.models.draft import describe, load_draft

from .. import convert
from ..protos import pb, pb_grpc

log = logging.getLogger(__name__)


class DraftService(pb_grpc.DraftServicer):
    def __init__(self, draft_spec: dict, spec: SpecConfig, max_seqs: int = 64, max_model_len: int = 2048, seed: int = 0):
        self.model = load_draft(draft_spec)
        self.description = describe(draft_spec)
        self.server = RoundServer(DraftRunner(self.model, spec, max_seqs, max_model_len, seed))
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self.queue_depth = 0

    def Load(self, request, context):
        return pb.DraftLoadResponse(sequences=len(self.server.runner.seqs), queue_depth=self.queue_depth,
                                    vocab_size=self.model.cfg.vocab_size, model=self.description)

    def Speculate(self, request_iterator, context):
        names: dict[int, str] = {}  # draft id -> the target's seq id, for this stream
        ids: dict[str, int] = {}

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

        def work():
            try:
                while (req := inbox.get()) is not None:
                    msg = convert.round_from_pb(req, seq_key)
                    self.queue_depth += 1
                    with self.lock:
                        self.queue_depth -= 1
                        self.server.handle(
                            msg,
                            send=lambda m: outbox.put(convert.reply_to_pb(m, names.__getitem__)),
                            poll=lambda: not inbox.empty(),
                            put_q=lambda kind, round_id, slot, probs: ("inline", probs),
                        )
            except Exception as e:  # a failed round ends this stream; the target falls back
                log.exception("draft round failed")
                outbox.put(e)
            finally:
                with self.lock:  # the target went away: free everything of this stream
                    for i in list(names):
                        if i in self.server.runner.seqs:
                            self.server.runner.release(i)
                        self.server.entries.pop(i, None)
                outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=work, daemon=True).start()
        while (item := outbox.get()) is not None:
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, f"draft round failed: {item}")
            yield item


def serve(draft_spec: dict, spec: SpecConfig, address: str = "127.0.0.1:0", threads: int = 1, **kw):
    """Start the draft service; returns (grpc server, bound port)."""
    torch.set_num_threads(threads)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
    pb_grpc.add_DraftServicer_to_server(DraftService(draft_spec, spec, **kw), server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port
