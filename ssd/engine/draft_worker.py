"""The draft in its own process (its own thread budget), speaking the round protocol of
protocol.py over a pipe. q rows never travel through the pipe: they are written into
shared-memory buffers (double-buffered by round parity for the cache, one region for JIT) and
read by the target. The buffers are as wide as the draft's head (ssd/speculation/qrows.py), so
the process allocates them and hands them over in DraftReady."""
from __future__ import annotations

import logging
import time
import traceback

import torch

from ..config import Mode, RequestOptions
from ..speculation.index import GREEDY, branch_items, context_key
from .draft_runner import Verifying
from .protocol import (AddSequence, Advance, CacheKeys, CacheReply, CachedBranches, DraftFailed, DraftInfo, DraftReady, JitReply, Release, RoundRequest, Speculation, Stop)

NO_OPTIONS = RequestOptions()
log = logging.getLogger(__name__)

def allocate_q_buffers(max_seqs: int, max_branches: int, k: int, width: int):
    """width: the draft head's size (Vh), the vocabulary's for a full head."""
    cache_q = torch.empty(2, max_seqs, max_branches, k, width).share_memory_()
    jit_q = torch.empty(max_seqs, k, width).share_memory_()
    return cache_q, jit_q


class RoundServer:
    """The draft side of the round protocol, free of any transport (the local process worker
    below and the draft gRPC service both drive it).
    send(msg): deliver a reply; poll() -> bool: a newer message is waiting (abandon the build);
    put_q(kind, round_id, slot, probs) -> q_ref: make q rows (over the draft head) reachable by the target."""

    def __init__(self, runner, index=None, fingerprint: str = ""):
        self.runner = runner
        self.entries = {}  # seq_id -> the CacheEntry of its last round
        # with an index (Redis in a cluster) the draft publishes every greedy branch and JIT
        # speculation itself, the moment it exists; without one the target publishes what it receives
        self.index = index
        self.fingerprint = fingerprint
        self.published: dict[int, list[str]] = {}  # seq_id -> keys it stored (deleted on abort)
        self.options: dict[int, RequestOptions] = {}  # seq_id -> what its AddSequence carried (traceparent, mode, ...)
        self.refused: set[int] = set()  # sequences this draft had no room for
        self.rounds: dict[int, int] = {}  # seq_id -> rounds of it the target committed (its Advances)
        # on_round(record): after every round, what it built (the draft service turns it into
        # ssd.speculate spans and metrics). record: {"round" (the target's step), "start_ns" (the
        # round message taken up), "build_start_ns", "end_ns", "abandoned", "jit_ns", "jit":
        # [seq_id], "seqs": {seq_id: {"fan_out", "after", "round" (the sequence's own)}}}
        self.on_round = None

    def forget(self, seq_id: int) -> None:
        """Free everything held for a sequence (released, or its target went away)."""
        if seq_id in self.runner.seqs:
            self.runner.release(seq_id)
        self.entries.pop(seq_id, None)
        self.options.pop(seq_id, None)
        self.published.pop(seq_id, None)
        self.refused.discard(seq_id)
        self.rounds.pop(seq_id, None)

    def _publish(self, seq_id: int, items: dict[str, list[int]]) -> None:
        if items and self.runner.seqs[seq_id].params.greedy:
            self.index.put_many(items)
            self.published.setdefault(seq_id, []).extend(items)

    def handle(self, msg: RoundRequest, send, poll, put_q) -> None:
        round_start = time.time_ns()
        runner = self.runner
        round_id, jit_ids, backups, hit_ids = msg.round_id, msg.jit_ids, msg.backups, msg.hit_ids
        for op in msg.ops:
            seq_id = op.seq_id
            if isinstance(op, AddSequence):
                try:
                    runner.add(seq_id, op.context, op.params, op.features)
                except (RuntimeError, ValueError) as e:  # full (or a duplicate): only this sequence goes without
                    log.warning("draft refuses sequence %s: %s", seq_id, e)
                    self.refused.add(seq_id)
                    continue
                self.options[seq_id] = op.options
                self.rounds[seq_id] = 0
            elif seq_id in self.refused:
                if isinstance(op, Release):
                    self.refused.discard(seq_id)
            elif isinstance(op, Advance):
                self.rounds[seq_id] = self.rounds.get(seq_id, 0) + 1
                try:
                    runner.on_outcome(seq_id, op.tokens, op.features)
                except ValueError as e:  # e.g. a feature drafter sent no features: only this sequence goes without
                    log.warning("draft refuses sequence %s: %s", seq_id, e)
                    self.forget(seq_id)
                    self.refused.add(seq_id)
            elif isinstance(op, Release):
                keys = self.published.get(seq_id, [])
                if op.reason == "abort" and self.index is not None:
                    self.index.delete_many(keys)
                self.forget(seq_id)
        # adaptive: the target sized this round's build (at most the buffers' room); 0: the configured
        # budget (a draft shared by several targets must not keep another target's last choice)
        runner.planner.budget = min(msg.fan_out_budget or runner.max_branches, runner.max_branches)
        # the replies the target waits for follow its message, whatever this draft can serve
        want_jit, want_keys = bool(jit_ids), bool(jit_ids or backups or hit_ids)
        if self.refused:  # no speculation for refused sequences: the target uses its backup for them
            jit_ids = [i for i in jit_ids if i not in self.refused]
            backups = {i: t for i, t in backups.items() if i not in self.refused}
            hit_ids = [i for i in hit_ids if i not in self.refused]
        specs, jit_ns = {}, None
        if want_jit:
            t0, jit_start = time.perf_counter(), time.time_ns()
            reply = {}
            for i, (tokens, q) in (runner.jit(jit_ids, after="miss", lengths=msg.jit_k) if jit_ids else {}).items():
                q_ref = put_q("jit", round_id, runner.seqs[i].slot, q) if q is not None else None
                reply[i] = Speculation(tokens.tolist(), q_ref)
                specs[i] = Verifying(tokens.tolist(), "miss")
            send(JitReply(round_id, reply, time.perf_counter() - t0))
            jit_ns = (jit_start, time.time_ns())
            if self.index is not None:
                for i, sp in reply.items():
                    self._publish(i, {context_key(runner.seqs[i].ctx, self.fingerprint, GREEDY, runner.K): sp.token_ids})
        for i, tokens in backups.items():
            specs[i] = Verifying(list(tokens), "miss")
        for i in hit_ids:
            s = runner.seqs[i]
            entry = self.entries[i]
            tokens = entry.token_ids[entry.keys[(s.last_outcome_k, s.ctx[-1])]].tolist()
            if msg.hit_k.get(i, len(tokens)) < len(tokens):  # adaptive: the target verifies a prefix
                tokens = runner.cut_speculation(i, tokens, msg.hit_k[i])
            specs[i] = Verifying(tokens, "hit")
        # a sequence served as plain SD (its request's mode) gets JIT speculations only, no cache
        specs = {i: v for i, v in specs.items() if self.options.get(i, NO_OPTIONS).mode != Mode.SD}
        if want_keys and not specs:
            send(CacheKeys(round_id, {}))
        prefixes = {i: list(runner.seqs[i].ctx) for i in specs} if self.index is not None else {}
        t0, build_start = time.perf_counter(), time.time_ns()
        built = runner.build(specs, on_keys=lambda keys: send(CacheKeys(round_id, keys)), should_abort=poll)
        if built is None:
            for i in specs:
                self.entries.pop(i, None)
            send(CacheReply(round_id, None, time.perf_counter() - t0))
            self._report(round_id, (round_start, build_start), jit_ns, jit_ids, specs, None)
            return
        reply = {}
        for i, entry in built.items():
            self.entries[i] = entry
            q_ref = put_q("cache", round_id, runner.seqs[i].slot, entry.probs) if entry.probs is not None else None
            reply[i] = CachedBranches(entry.keys, entry.token_ids.tolist(), q_ref)  # lists: tensors would travel as fds
        seconds = time.perf_counter() - t0
        if self.index is not None:  # before the reply: a target that misses its own cache may look these up
            for i, c in reply.items():
                self._publish(i, branch_items(prefixes[i], specs[i].tokens, c.keys, c.token_ids, self.fingerprint, runner.K))
        send(CacheReply(round_id, reply, seconds))
        self._report(round_id, (round_start, build_start), jit_ns, jit_ids, specs, built)

    def _report(self, round_id, starts, jit_ns, jit_ids, specs, built) -> None:
        if self.on_round is None:
            return
        self.on_round({
            "round": round_id, "start_ns": starts[0], "build_start_ns": starts[1], "end_ns": time.time_ns(),
            "abandoned": built is None, "jit_ns": jit_ns, "jit": list(jit_ids),
            "seqs": {i: {"after": specs[i].after, "fan_out": len(built[i].keys) if built and i in built else 0,
                         "round": self.rounds.get(i, 0) + 1} for i in specs},  # the round being verified
        })


def worker_main(conn, draft_desc, speculation, max_seqs: int, max_model_len: int, threads: int | None, seed: int):
    """The draft's round loop over a connection (a pipe end; ThreadDraftLink's in-memory one):
    load the draft, announce DraftReady, then serve rounds until Stop or the connection closes.
    threads: the torch thread budget of this process (None: leave it, as a thread of the
    target's own process must)."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        import torch.multiprocessing as _reductions  # noqa: F401  (shared-memory tensors through the pipe)

        from ..models.draft import load_draft
        from .draft_runner import DraftRunner

        model = load_draft(draft_desc)
        runner = DraftRunner(model, speculation, max_seqs, max_model_len, seed)
        server = RoundServer(runner)
        head = runner.head_ids
        width = model.cfg.vocab_size if head is None else head.numel()
        cache_q, jit_q = allocate_q_buffers(max_seqs, speculation.fan_out_budget, speculation.num_speculative_tokens, width)
        conn.send(DraftReady(DraftInfo(model.cfg.vocab_size, model.cfg.num_layers, width, tuple(runner.feature_layers)),
                             head, (cache_q, jit_q)))
    except Exception:
        conn.send(DraftFailed(traceback.format_exc()))
        return

    def put_q(kind, round_id, slot, probs):
        # shared memory: cache rows double-buffered by round parity, JIT rows in their own region
        if kind == "jit":  # an adaptive JIT speculation may hold fewer than K rows
            jit_q[slot, : probs.shape[0]].copy_(probs)
            return ("jit", slot, probs.shape[0])
        cache_q[round_id % 2, slot, : probs.shape[0]].copy_(probs)
        return (round_id % 2, slot)

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if isinstance(msg, Stop):
            return
        try:
            server.handle(msg, conn.send, lambda: conn.poll(0), put_q)
        except Exception:
            conn.send(DraftFailed(traceback.format_exc()))
            return
