"""The SSD engine's DraftLink (ssd/engine/draft_link.py) over a gRPC Draft/Speculate stream."""
from __future__ import annotations

import queue
import threading

import grpc

from ssd.engine.draft_link import DraftUnavailable

from . import convert
from .protos import pb, pb_grpc

_END = object()


class GrpcDraftLink:
    def __init__(self, address: str, k: int, timeout: float = 30.0):
        self.k = k
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20),
                                                                ("grpc.max_receive_message_length", 256 << 20)])
        stub = pb_grpc.DraftStub(self.channel)
        try:
            load = stub.Load(pb.LoadRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise DraftUnavailable(f"draft at {address} unreachable: {e.code().name}") from e
        self.info = {"vocab_size": load.vocab_size, "model": load.model}
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.call = stub.Speculate(iter(self.requests.get, _END))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for resp in self.call:
                self.replies.put(resp)
            self.replies.put(DraftUnavailable("draft stream ended"))
        except grpc.RpcError as e:
            self.replies.put(DraftUnavailable(f"draft stream failed: {e.code().name} {e.details()}"))

    def send(self, msg) -> None:
        if msg[0] == "stop":
            self.requests.put(_END)
            return
        self.requests.put(convert.round_to_pb(msg))

    def ready(self) -> bool:
        return not self.replies.empty()

    def recv(self, timeout: float | None = None):
        try:
            item = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise DraftUnavailable("draft did not answer in time") from None
        if isinstance(item, Exception):
            self.replies.put(item)  # every later recv fails the same way
            raise item
        return convert.reply_from_pb(item, self.k, self.info["vocab_size"])

    def q_row(self, q_ref, j: int | None = None):
        t = q_ref[1]
        return t if j is None else t[j]

    def close(self) -> None:
        self.requests.put(_END)
        self.channel.close()
