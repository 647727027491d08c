"""Several drafts behind one target: a DraftLink that spreads sequences over draft replicas.

The SSD engine speaks one round protocol (draft_worker.py) to one link. MultiDraftLink keeps
that seam: each round message is split by the draft that owns each sequence, every draft gets
its part, and the replies of one kind and round are merged before the engine sees them.

- Placement: a sequence goes to the draft named in its options.draft (the gateway's node-local
  pick) when this target is connected to it, else to the draft with the fewest sequences while
  the named one is joined in the background for the sequences that follow.
- Loss of one draft: its sequences move to a surviving draft, which is told their current
  context (an "add") at the head of its next round. A loss is only ever noticed while a round's
  replies are gathered, so the lost draft's last cache never reaches the target and a moved
  sequence starts on its new draft with a miss (JIT or backup), never with a cache hit that the
  new draft did not build. Only when every draft is lost does the
  engine see DraftUnavailable (and fall back to the fast backup for everyone); it then calls
  revive() every few seconds, and the first draft that answers again takes over.
- All drafts must be replicas of one draft model (one fingerprint): index keys name the draft.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

from dataclasses import replace

import torch

from ssd.engine.draft_link import DraftUnavailable
from ssd.engine.protocol import (AddSequence, Advance, CacheKeys, CacheReply, Features, JitReply, Release,
                                 RoundRequest, Stop)

log = logging.getLogger(__name__)


class MultiDraftLink:
    def __init__(self, connect, addresses: list[str], retry_s: float = 30.0):
        """connect(address) -> a DraftLink (raises DraftUnavailable)."""
        self.connect = connect
        self.retry_s = retry_s
        self.links: dict[str, object] = {}
        self.failed: dict[str, float] = {}  # address -> when it last failed to connect
        self.known: list[str] = list(dict.fromkeys(addresses))  # every draft ever configured or named
        self.revive_every_s = 5.0
        self._revival: Future | None = None
        self._revival_started = -1e9
        self._joining: dict[str, Future] = {}  # drafts named by the gateway, being connected
        for addr in addresses:
            self._try_connect(addr)
        if not self.links:
            raise DraftUnavailable(f"no draft reachable among {addresses}")
        first = next(iter(self.links.values()))
        self.info = replace(first.info, drafts=tuple(self.links))
        self.owner: dict[int, str] = {}        # seq_id -> draft address
        self.state: dict[int, list] = {}       # seq_id -> [context, params, options, feature rows (feature drafters)]
        self.inject: dict[str, list] = {}      # address -> ops to prepend to its next round
        self.expect: deque = deque()           # (kind, round_id, [addresses]) replies still to merge

    # ---- drafts --------------------------------------------------------------------------------
    def _try_connect(self, addr: str):
        if addr in self.links:
            return self.links[addr]
        if time.monotonic() - self.failed.get(addr, -1e9) < self.retry_s:
            return None
        try:
            link = self.connect(addr)
        except DraftUnavailable as e:
            log.warning("draft %s unreachable: %s", addr, e)
            self.failed[addr] = time.monotonic()
            return None
        return self._admit(addr, link)

    def _admit(self, addr: str, link):
        ref = getattr(self, "info", None) or (next(iter(self.links.values())).info if self.links else None)
        if ref is not None:  # the first draft's identity binds every later one (index keys, vocabulary)
            if link.info.identity() != ref.identity():
                log.warning("draft %s differs from this target's drafts (model, vocabulary or index publishing); "
                            "not used", addr)
                link.close()
                self.failed[addr] = time.monotonic()
                return None
        self.links[addr] = link
        self.failed.pop(addr, None)
        if addr not in self.known:
            self.known.append(addr)
        return link

    def _place(self, want: str = "") -> str:
        """The gateway's pick when already connected; otherwise the least loaded draft now, and
        the named one is joined in the background (a step never waits on a connect)."""
        if want in self.links:
            return want
        if want and want not in self._joining and time.monotonic() - self.failed.get(want, -1e9) >= self.retry_s:
            fut: Future = Future()
            self._joining[want] = fut
            threading.Thread(target=self._reconnect, args=([want], fut), daemon=True, name="draft-join").start()
        counts = {a: 0 for a in self.links}
        for a in self.owner.values():
            if a in counts:
                counts[a] += 1
        return min(counts, key=counts.get)

    def _lose(self, addr: str, err: Exception) -> None:
        link = self.links.pop(addr, None)
        if link is None:
            return
        log.warning("draft %s lost (%s); moving its sequences", addr, err)
        self.failed[addr] = time.monotonic()
        try:
            link.close()
        except Exception:
            pass
        self.inject.pop(addr, None)
        if not self.links:
            return
        for seq_id, a in list(self.owner.items()):
            if a != addr:
                continue
            ctx, params, options, feats = self.state[seq_id]
            new = self._place()
            self.owner[seq_id] = new
            rows = Features.of(torch.cat([f.tensor() for f in feats])) if feats else None
            self.inject.setdefault(new, []).append(AddSequence(seq_id, list(ctx), params, options, rows))

    # ---- the DraftLink protocol ------------------------------------------------------------------
    carries_adaptive = True  # each draft gets its sequences' JIT lengths and the round's budget

    def send(self, msg: RoundRequest | Stop) -> None:
        if isinstance(msg, Stop):
            for link in self.links.values():
                link.send(msg)
            return
        round_id, jit_ids, backups, hit_ids = msg.round_id, msg.jit_ids, msg.backups, msg.hit_ids
        self._harvest_joins()
        for op in msg.ops:
            if isinstance(op, AddSequence):
                addr = self._place(op.options.draft)  # may join a draft named by the gateway
                self.owner[op.seq_id] = addr
                self.state[op.seq_id] = [list(op.context), op.params, op.options,
                                         [op.features] if op.features is not None else []]
        parts = {a: ([], [], {}, []) for a in self.links}
        for op in msg.ops:
            seq_id = op.seq_id
            addr = self.owner.get(seq_id)
            if addr not in parts:
                continue
            if isinstance(op, Advance):
                self.state[seq_id][0].extend(op.tokens)
                if op.features is not None:  # kept so a re-homed sequence brings its features along
                    self.state[seq_id][3].append(op.features)
            elif isinstance(op, Release):
                self.owner.pop(seq_id, None)
                self.state.pop(seq_id, None)
            parts[addr][0].append(op)
        for addr, extra in self.inject.items():  # re-homed sequences: set them up before their ops
            if addr in parts:
                parts[addr][0][:0] = [op for op in extra if op.seq_id in self.owner]
        self.inject = {}
        for i in jit_ids:
            parts[self.owner[i]][1].append(i)
        for i, tokens in backups.items():
            parts[self.owner[i]][2][i] = tokens
        for i in hit_ids:
            parts[self.owner[i]][3].append(i)
        sent, with_jit, with_specs = [], [], []
        for addr, (p_ops, p_jit, p_backups, p_hits) in parts.items():
            if not (p_ops or p_jit or p_backups or p_hits):
                continue
            try:
                self.links[addr].send(RoundRequest(round_id, p_ops, p_jit, p_backups, p_hits,
                                                   {i: msg.jit_k[i] for i in p_jit if i in msg.jit_k},
                                                   msg.fan_out_budget,
                                                   {i: msg.hit_k[i] for i in p_hits if i in msg.hit_k}))
            except DraftUnavailable as e:
                self._lose(addr, e)
                continue
            sent.append(addr)
            if p_jit:
                with_jit.append(addr)
            if p_jit or p_backups or p_hits:
                with_specs.append(addr)
        # what the engine will wait for follows the round, not which sends succeeded: a kind
        # whose drafts were all lost merges to an empty reply (those sequences take the backup)
        if jit_ids:
            self.expect.append((JitReply, round_id, with_jit))
        if jit_ids or backups or hit_ids:
            self.expect.append((CacheKeys, round_id, with_specs))
        self.expect.append((CacheReply, round_id, sent))
        if not self.links:
            raise DraftUnavailable("every draft was lost")

    def ready(self) -> bool:
        if not self.expect:
            return False
        _, _, addrs = self.expect[0]
        return all(self.links[a].ready() for a in addrs if a in self.links)

    def recv(self, timeout: float | None = None):
        if not self.expect:
            raise DraftUnavailable("draft protocol error: no reply expected")
        kind, round_id, addrs = self.expect.popleft()
        merged, seconds, abandoned = {}, 0.0, False  # abandoned only when a draft said so
        for addr in addrs:
            link = self.links.get(addr)
            if link is None:
                continue
            try:
                msg = link.recv(timeout)
            except DraftUnavailable as e:
                self._lose(addr, e)
                continue
            if not isinstance(msg, kind) or msg.round_id != round_id:
                self._lose(addr, DraftUnavailable(f"protocol error: expected {kind.__name__} {round_id}, "
                                                  f"got {type(msg).__name__} {getattr(msg, 'round_id', None)}"))
                continue
            if kind is CacheKeys:
                merged.update(msg.keys)
                continue
            seconds = max(seconds, msg.seconds)
            values = msg.speculations if kind is JitReply else msg.entries
            if values is None:
                abandoned = True
                continue
            for seq_id, value in values.items():  # q refs name the draft that holds the rows
                merged[seq_id] = replace(value, q_ref=None if value.q_ref is None else (addr, value.q_ref))
        if not self.links:
            raise DraftUnavailable("every draft was lost")
        if kind is CacheKeys:
            return CacheKeys(round_id, merged)
        if kind is JitReply:
            return JitReply(round_id, merged, seconds)
        return CacheReply(round_id, None if abandoned and not merged else merged, seconds)

    def q_row(self, q_ref, j: int | None = None):
        addr, inner = q_ref
        link = self.links.get(addr)
        if link is None:  # rows that already arrived inline stay readable after the loss
            return inner[1] if j is None else inner[1][j]
        return link.q_row(inner, j)

    def revive(self) -> bool:
        """After every draft was lost, called by the engine each step; never blocks. Every
        revive_every_s a background thread tries the known drafts; once one answers, it takes
        over on the next call (True), and the engine re-adds its running sequences there, so
        all per-sequence state starts afresh."""
        fut = self._revival
        if fut is not None and fut.done():
            self._revival = None
            for addr, link in fut.result().items():
                if self._admit(addr, link) is None:
                    link.close()
            if not self.links:
                return False
        elif fut is None and time.monotonic() - self._revival_started >= self.revive_every_s:
            self._revival_started = time.monotonic()
            self._revival = Future()
            threading.Thread(target=self._reconnect, args=(list(self.known), self._revival), daemon=True,
                             name="draft-revive").start()
            return False
        else:
            return False
        self.info.drafts = tuple(self.links)
        self.owner.clear()
        self.state.clear()
        self.inject.clear()
        self.expect.clear()
        return True

    def _harvest_joins(self) -> None:
        for addr, fut in list(self._joining.items()):
            if not fut.done():
                continue
            del self._joining[addr]
            link = fut.result().get(addr)
            if link is None:
                self.failed[addr] = time.monotonic()
            elif self._admit(addr, link) is None:
                link.close()

    def _reconnect(self, addresses: list[str], fut: Future) -> None:
        found = {}
        for addr in addresses:
            try:
                found[addr] = self.connect(addr)
            except DraftUnavailable:
                pass
        fut.set_result(found)

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    def load(self) -> dict[str, int]:
        counts = {a: 0 for a in self.links}
        for a in self.owner.values():
            if a in counts:
                counts[a] += 1
        return counts
