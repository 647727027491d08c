"""Tensor channel: a point-to-point torch.distributed pipe between one draft and one target.

It carries what is too large for control messages: the draft distributions q ([rows, K, S]
float32 over the draft head's support, needed by the ratio test when sampling) and, for
feature-based drafters, target hidden states. NCCL between GPU processes on one node (P2P / GPUDirect), gloo
on CPU; callers fall back to inline bytes in their control messages when no channel can be set
up. Each channel is its own two-rank process group built from its own TCPStore, so one draft
can hold channels to many targets at once and no global process group is involved.

The draft listens (rank 0, owner of the store); the target joins (rank 1). Tensors are matched
by order: every send on one side meets the next recv on the other, so callers send a tensor
only after the control message announcing its shape.
"""
from __future__ import annotations

import datetime
import threading
from concurrent.futures import Future

import torch
import torch.distributed as dist


def default_backend(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


class TensorChannel:
    def __init__(self, pg, rank: int, backend: str, device: torch.device, store):
        self.pg = pg
        self.rank = rank
        self.peer = 1 - rank
        self.backend = backend
        self.device = device
        self._store = store  # keep the store (and, at rank 0, its server) alive with the group
        self.sent_bytes = 0
        self.received_bytes = 0

    # ---- set-up --------------------------------------------------------------------------------
    @staticmethod
    def _group(store, rank: int, backend: str, device: torch.device, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = dist.PrefixStore(f"ssd-channel/{backend}", store)
        if backend == "gloo":
            return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            torch.cuda.set_device(device)
            return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        raise ValueError(f"unknown tensor channel backend {backend!r} (gloo | nccl)")

    @classmethod
    def listen(cls, backend: str = "", device: str | torch.device = "cpu", host: str = "0.0.0.0",
               timeout_s: float = 30.0) -> tuple[int, Future]:
        """Draft side. Returns (rendezvous port, future of the channel); the future resolves
        when the target has joined (or fails after timeout_s)."""
        device = torch.device(device)
        backend = backend or default_backend(device)
        store = dist.TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        fut: Future = Future()

        def build():
            try:
                ch = cls(cls._group(store, 0, backend, device, timeout_s), 0, backend, device, store)
                ch._handshake()
                fut.set_result(ch)
            except Exception as e:  # the target never came: the caller falls back to inline bytes
                fut.set_exception(e)

        threading.Thread(target=build, daemon=True, name="tensor-channel-listen").start()
        return store.port, fut

    @classmethod
    def connect(cls, host: str, port: int, backend: str, device: str | torch.device = "cpu",
                timeout_s: float = 30.0) -> "TensorChannel":
        """Target side: join the draft's rendezvous."""
        device = torch.device(device)
        store = dist.TCPStore(host, port, 2, False, timeout=datetime.timedelta(seconds=timeout_s))
        ch = cls(cls._group(store, 1, backend, device, timeout_s), 1, backend, device, store)
        ch._handshake()
        return ch

    def _handshake(self) -> None:
        """One tiny transfer at set-up: NCCL builds its communicator lazily, so a channel that
        cannot work (e.g. both ends on one GPU) fails here, where the caller can still fall
        back to inline bytes, and not at the first sampled round."""
        if self.rank == 0:
            self.send(torch.ones(1))
        elif self.recv((1,)).item() != 1.0:
            raise RuntimeError("tensor channel handshake returned garbage")
        self.sent_bytes = self.received_bytes = 0

    # ---- transfer ------------------------------------------------------------------------------
    def _group_or_raise(self):
        pg = self.pg
        if pg is None:  # closed while a transfer was still expected (the stream is ending)
            raise RuntimeError("tensor channel closed")
        return pg

    def send(self, t: torch.Tensor) -> None:
        t = t.detach().to(self.device, torch.float32).contiguous()
        self._group_or_raise().send([t], self.peer, 0).wait()
        self.sent_bytes += t.numel() * 4

    def recv(self, shape) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=torch.float32, device=self.device)
        self._group_or_raise().recv([out], self.peer, 0).wait()
        self.received_bytes += out.numel() * 4
        return out

    def close(self) -> None:
        try:
            if hasattr(self.pg, "shutdown"):
                self.pg.shutdown()
        except Exception:
            pass
        self.pg = None
