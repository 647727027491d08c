"""How the SSD engine reaches its draft: a small transport seam.

The engine speaks the message protocol of draft_worker.py through a link:
  send(msg)            one target -> draft message
  recv(timeout=None)   the next draft -> target message; DraftUnavailable when the draft died,
                       failed or did not answer in time
  ready()              True when a message is waiting (never blocks)
  q_row(q_ref, j)      a full draft-probability row named by a reply ([K, V])
  close()
ProcessDraftLink runs the draft in a spawned local process with its own thread budget and
moves q rows through shared memory; the gRPC link of the services implements the
same five methods over a bidirectional stream.
"""
from __future__ import annotations

import time

import torch
import torch.multiprocessing as mp

from .draft_worker import allocate_q_buffers, worker_main


class DraftUnavailable(RuntimeError):
    pass


class ProcessDraftLink:
    def __init__(self, draft_spec: dict, spec_cfg, max_seqs: int, max_model_len: int, threads: int, vocab_size: int,
                 seed: int = 0, start_timeout: float = 300.0):
        self.cache_q, self.jit_q = allocate_q_buffers(max_seqs, spec_cfg.fan_out_budget, spec_cfg.num_speculative_tokens, vocab_size)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, draft_spec, spec_cfg, max_seqs, max_model_len, threads, self.cache_q, self.jit_q, seed),
            daemon=True,
            name="ssd-draft",
        )
        self.proc.start()
        child.close()
        msg = self.recv(timeout=start_timeout)
        if msg[0] != "ready":
            raise DraftUnavailable(f"draft process failed to start: {msg[1]}")
        self.info = msg[1]

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
        if msg[0] == "error":
            raise DraftUnavailable(f"draft process failed:\n{msg[1]}")
        return msg

    def q_row(self, q_ref, j: int | None = None) -> torch.Tensor:
        """q_ref = ("jit", slot) or (parity, slot) of the cache buffers; j = branch."""
        if q_ref[0] == "jit":
            return self.jit_q[q_ref[1]].clone()
        parity, slot = q_ref
        return self.cache_q[parity, slot, j].clone()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()

    def kill(self) -> None:
        """Tests: the draft dies mid-generation."""
        self.proc.kill()
        self.proc.join(timeout=5)
