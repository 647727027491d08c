"""The speculation index: speculations stored under the content they were drafted for.

Key = hash(exact token context the speculation continues: prefix + accepted tokens +
recovery/bonus token) + the draft's fingerprint + the sampling signature + K. Any target replica
reaching that context finds it, and a repeated or shared context (retries, n > 1, common
conversation prefixes) hits across requests, not only within one sequence's own round.

The core keeps only the protocol and the in-process map (the embedded default); the Redis
implementation lives with the services (services/index_redis.py), so the core imports no redis.
Values are the K draft token ids (greedy speculations; sampled ones need their full q rows,
which stay with the producing draft and its stream).
"""
from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol


def context_key(context: list[int], draft_fingerprint: str, sampling_signature: tuple, k: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(draft_fingerprint.encode())
    h.update(repr((sampling_signature, k)).encode())
    h.update(struct.pack(f"<{len(context)}i", *context))
    return "ssd:spec:" + h.hexdigest()


GREEDY = ("greedy",)  # the sampling signature of indexable speculations (sampled ones need full q rows)


def draft_fingerprint(model_description: str, speculation) -> str:
    """Speculations of different drafts (or draft settings) must never meet in the index; the
    target and the draft compute this the same way, so either may publish."""
    return repr((model_description, sorted(vars(speculation).items())))


def branch_items(prefix: list[int], spec_tokens: list[int], keys: dict, token_ids: list[list[int]],
                 fingerprint: str, k: int) -> dict[str, list[int]]:
    """Index entries of one sequence's speculation cache: branch j (keyed by its outcome
    (accepted k', recovery/bonus token t)) continues the context prefix + spec[:k'] + [t]."""
    return {context_key(prefix + spec_tokens[:kk] + [t], fingerprint, GREEDY, k): list(token_ids[j])
            for (kk, t), j in keys.items()}


@dataclass
class IndexCounters:
    hit: int = 0
    miss: int = 0
    errors: int = 0  # lookups or stores that failed (e.g. Redis unreachable): treated as misses
    stored: int = 0


class SpeculationIndex(Protocol):
    counters: IndexCounters

    def put_many(self, items: dict[str, list[int]]) -> None: ...

    def get_many(self, keys: list[str]) -> list[list[int] | None]: ...

    def delete_many(self, keys: list[str]) -> None: ...


@dataclass
class LocalIndex:
    """In-process map with a TTL and a size bound (oldest entries evicted first)."""

    ttl_s: float = 60.0
    max_entries: int = 100_000
    counters: IndexCounters = field(default_factory=IndexCounters)

    def __post_init__(self):
        self._data: dict[str, tuple[float, list[int]]] = {}

    def put_many(self, items: dict[str, list[int]]) -> None:
        expiry = time.monotonic() + self.ttl_s
        for key, tokens in items.items():
            self._data.pop(key, None)  # re-insert: dict order is eviction order
            self._data[key] = (expiry, list(tokens))
        self.counters.stored += len(items)
        while len(self._data) > self.max_entries:
            self._data.pop(next(iter(self._data)))

    def get_many(self, keys: list[str]) -> list[list[int] | None]:
        now = time.monotonic()
        out = []
        for key in keys:
            v = self._data.get(key)
            if v is not None and v[0] < now:
                del self._data[key]
                v = None
            out.append(None if v is None else v[1])
            if v is None:
                self.counters.miss += 1
            else:
                self.counters.hit += 1
        return out

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)
