"""The SSD engine's DraftLink (ssd/engine/draft_link.py) over a gRPC Draft/Speculate stream."""
from __future__ import annotations

import logging
import queue
import threading

import grpc

from ssd.engine.draft_link import DraftUnavailable
from ssd.engine.protocol import DraftInfo, Stop
from .tensor_channel import TensorChannel

from . import convert
from .common import client_options
from .protos import pb, pb_grpc

_END = object()
log = logging.getLogger(__name__)


class GrpcDraftLink:
    """One draft service over a Draft/Speculate stream. Adaptive speculation's per-round JIT
    lengths and fan-out budget travel in SpeculateRequest.jit_k / fan_out_budget.

    tensor_channel: "inline" (q rows as bytes in the messages), "gloo", "nccl", or "auto"
    (nccl when this target runs on a GPU, falling back to inline when the channel cannot be set
    up; inline on CPU)."""

    carries_adaptive = True

    def __init__(self, address: str, k: int, timeout: float = 30.0, tensor_channel: str = "inline", device: str = "cpu"):
        self.k = k
        self.address = address
        # a channel of its own (local subchannel pool): a draft that restarts on the same address
        # is reached at once, not after the reconnect backoff of an earlier, dead connection
        self.channel = grpc.insecure_channel(address, options=client_options(("grpc.use_local_subchannel_pool", 1)))
        stub = pb_grpc.DraftStub(self.channel)
        try:
            load = stub.Load(pb.LoadRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise DraftUnavailable(f"draft at {address} unreachable: {e.code().name}") from e
        self.info = DraftInfo(load.vocab_size, feature_layers=tuple(load.feature_layers), model=load.model,
                              node=load.node, fingerprint=load.fingerprint, publishes=load.publishes)
        self.tensors: TensorChannel | None = None
        metadata = ()
        if tensor_channel == "auto" and not str(device).startswith("cuda"):
            tensor_channel = "inline"  # on CPU loopback gloo measured no faster than inline bytes (docs/services.md)
        if tensor_channel != "inline":
            try:
                metadata = (("ssd-channel", self._open_channel(stub, tensor_channel, device, timeout)),)
            except (grpc.RpcError, RuntimeError, ValueError) as e:
                if tensor_channel != "auto":
                    raise DraftUnavailable(f"tensor channel to {address} failed: {e}") from e
                log.warning("tensor channel to %s unavailable (%s): q rows go inline", address, e)
        self.info.tensor_channel = self.tensors.backend if self.tensors else "inline"
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.call = stub.Speculate(iter(self.requests.get, _END), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _open_channel(self, stub, backend: str, device: str, timeout: float) -> str:
        resp = stub.OpenChannel(pb.OpenChannelRequest(backend="" if backend == "auto" else backend), timeout=timeout)
        host = resp.host or self.address.rsplit(":", 1)[0].strip("[]")
        if resp.backend == "nccl" and not str(device).startswith("cuda"):
            raise ValueError("the draft offers nccl but this target runs on the CPU")
        self.tensors = TensorChannel.connect(host, resp.port, resp.backend, device, timeout_s=timeout)
        return resp.channel_id

    def _read(self):
        try:
            for resp in self.call:
                rows = None
                if resp.channel_rows:  # [rows, K, S] follows on the tensor channel
                    width = len(resp.channel_support) or self.info.vocab_size
                    rows = self.tensors.recv((resp.channel_rows, self.k, width))
                self.replies.put((resp, rows))
            self.replies.put(DraftUnavailable("draft stream ended"))
        except grpc.RpcError as e:
            self.replies.put(DraftUnavailable(f"draft stream failed: {e.code().name} {e.details()}"))
        except RuntimeError as e:  # the tensor channel broke
            self.replies.put(DraftUnavailable(f"tensor channel failed: {e}"))

    def send(self, msg) -> None:
        if isinstance(msg, Stop):
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
        resp, rows = item
        try:
            return convert.reply_from_pb(resp, self.k, self.info.vocab_size, rows)
        except (ValueError, IndexError, TypeError, RuntimeError, StopIteration) as e:
            # a malformed reply: this draft is lost, like a broken stream, and the stream is ended
            # so the draft frees this target's sequences
            err = DraftUnavailable(f"draft sent a malformed reply: {type(e).__name__}: {e}")
            self.replies.put(err)  # every later recv fails the same way
            self.requests.put(_END)
            raise err from e

    def q_row(self, q_ref, j: int | None = None):
        t = q_ref[1]
        return t if j is None else t[j]

    def revive(self) -> bool:
        return False  # one fixed draft; MultiDraftLink reconnects

    def close(self) -> None:
        self.requests.put(_END)
        self.channel.close()
        if self.tensors is not None:
            self.tensors.close()
