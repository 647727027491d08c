"""How the SSD engine reaches its draft: a small transport seam (the `DraftLink` protocol).

ProcessDraftLink runs the draft in a spawned local process with its own thread budget and
moves q rows through shared memory; ThreadDraftLink runs the same draft loop on a thread of the
calling process (no spawn, no second interpreter: for tests and tools that are not about the
process boundary); the services' links (ssd.services.draft_link, ssd.services.multi_draft)
implement the same protocol over gRPC streams.
"""
from __future__ import annotations

import copy
import queue
import threading
import time
from typing import Any, Protocol, runtime_checkable

import torch
import torch.multiprocessing as mp

from ..speculation.qrows import to_vocab
from .draft_worker import worker_main
from .protocol import DraftFailed, DraftInfo, DraftReady, RoundReply, RoundRequest, Stop


class DraftUnavailable(RuntimeError):
    pass


@runtime_checkable
class DraftLink(Protocol):
    """What the SSD engine needs from a draft, wherever it runs. Messages: protocol.py."""

    info: DraftInfo  # what the draft reported about itself
    carries_adaptive: bool  # RoundRequest.jit_k, hit_k and fan_out_budget reach the draft (adaptive speculation needs it)

    def send(self, msg: RoundRequest | Stop) -> None:
        """One target -> draft message."""

    def recv(self, timeout: float | None = None) -> RoundReply:
        """The next draft -> target message; DraftUnavailable when the draft died, failed or did
        not answer in time."""

    def ready(self) -> bool:
        """True when a message is waiting (never blocks)."""

    def q_row(self, q_ref: Any, j: int | None = None) -> torch.Tensor:
        """The draft-probability rows named by a reply: [K, V] (or all branches when j is None)."""

    def revive(self) -> bool:
        """After DraftUnavailable: True once a draft is reachable again (never blocks). Links
        with one fixed draft return False."""

    def close(self) -> None: ...


class ProcessDraftLink:
    carries_adaptive = True  # RoundRequest.jit_k and fan_out_budget reach the draft (pickled whole)

    def __init__(self, draft_desc, speculation, max_seqs: int, max_model_len: int, threads: int,
                 seed: int = 0, start_timeout: float = 300.0):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, draft_desc, speculation, max_seqs, max_model_len, threads, seed),
            daemon=True,
            name="ssd-draft",
        )
        self.proc.start()
        child.close()
        self._take_ready(start_timeout, "process")

    def _take_ready(self, start_timeout: float, what: str) -> None:
        """The draft's DraftReady: what it is and its q-row buffers."""
        msg = self.recv(timeout=start_timeout)
        if not isinstance(msg, DraftReady):
            raise DraftUnavailable(f"draft {what} failed to start: {getattr(msg, 'message', msg)}")
        self.info = msg.info
        self.head_ids = msg.head_ids
        self.cache_q, self.jit_q = msg.q_buffers

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (OSError, BrokenPipeError) as e:
            raise DraftUnavailable(f"draft connection lost: {e}") from e

    def ready(self) -> bool:
        return self.conn.poll(0)

    def recv(self, timeout: float | None = None):
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                raise DraftUnavailable("draft process exited")
            if deadline is not None and time.perf_counter() > deadline:
                raise DraftUnavailable("draft process did not answer in time")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError) as e:
            raise DraftUnavailable(f"draft connection lost: {e}") from e
        if isinstance(msg, DraftFailed):
            raise DraftUnavailable(f"draft process failed:\n{msg.message}")
        return msg

    def q_row(self, q_ref, j: int | None = None) -> torch.Tensor:
        """q_ref = ("jit", slot, rows) or (parity, slot) of the cache buffers; j = branch. A copy over
        the vocabulary (the buffers hold the draft head's columns)."""
        if q_ref[0] == "jit":  # ("jit", slot, rows)
            q = self.jit_q[q_ref[1], : q_ref[2]]
        else:
            parity, slot = q_ref
            q = self.cache_q[parity, slot, j]
        return q.clone() if self.head_ids is None else to_vocab(q, self.head_ids, self.info.vocab_size)

    def revive(self) -> bool:
        return False  # a dead local draft process is not restarted

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(Stop())
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()

    def kill(self) -> None:
        """Tests: the draft dies mid-generation."""
        self.proc.kill()
        self.proc.join(timeout=5)


class _QueueEnd:
    """One end of an in-memory duplex connection with a pipe end's send / recv / poll. Messages
    are copied on the way, as a pipe would (neither side may see the other's later changes to
    a list it sent); DraftReady alone travels as is, because its q-row buffers are meant to be
    shared, as they are through shared memory between processes."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue):
        self.inbox, self.outbox, self._peeked = inbox, outbox, []

    def send(self, msg) -> None:
        self.outbox.put(msg if isinstance(msg, DraftReady) else copy.deepcopy(msg))

    def poll(self, timeout: float = 0.0) -> bool:
        if self._peeked:
            return True
        try:
            self._peeked.append(self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait())
        except queue.Empty:
            return False
        return True

    def recv(self):
        return self._peeked.pop(0) if self._peeked else self.inbox.get()


class ThreadDraftLink(ProcessDraftLink):
    """The draft loop of ProcessDraftLink (worker_main, the same RoundServer and shared q-row
    buffers) on a daemon thread of this process, over in-memory queues: the same messages in
    the same order, without spawning a process. Torch's thread budget is the process's own, so
    it measures nothing about overlap; it is for engine tests and tools that are not about the
    process boundary."""

    def __init__(self, draft_desc, speculation, max_seqs: int, max_model_len: int, seed: int = 0,
                 start_timeout: float = 300.0):
        to_draft, to_target = queue.Queue(), queue.Queue()
        self.conn = _QueueEnd(to_target, to_draft)
        child = _QueueEnd(to_draft, to_target)
        self.proc = threading.Thread(target=worker_main, daemon=True, name="ssd-draft-thread",
                                     args=(child, draft_desc, speculation, max_seqs, max_model_len, None, seed))
        self.proc.start()
        self._take_ready(start_timeout, "thread")

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(Stop())
            self.proc.join(timeout=30)

    def kill(self) -> None:
        raise TypeError("a draft thread cannot be killed; tests of a dying draft use ProcessDraftLink")
