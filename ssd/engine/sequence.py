"""A request being generated, and the scheduler that owns the waiting/running queues."""
from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from ..config import RequestOptions, SamplingParams

_ids = itertools.count()


class Source(str, Enum):
    """Where a speculation came from: the draft's speculation cache (SSD), the shared speculation
    index, the draft just in time, the n-gram backup; NONE: nothing speculated (a plain decode
    row). A str, so it reads as its value in metrics labels, spans and JSON."""

    CACHE = "cache"
    INDEX = "index"
    JIT = "jit"
    BACKUP = "backup"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class Proposal(NamedTuple):
    """A speculation waiting to be verified."""
    token_ids: torch.Tensor  # [K]
    q: torch.Tensor | None   # [K, V]: the exact distributions the draft sampled from (sampling); None when greedy
    source: Source

    @classmethod
    def plain(cls) -> "Proposal":
        """No speculation: the row decodes plainly in the verify."""
        return cls(torch.empty(0, dtype=torch.int64), None, Source.NONE)


@dataclass
class SeqSpecStats:
    """Speculative decoding statistics of one sequence (per-request usage)."""

    num_rounds: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    cache_hit: int = 0
    cache_late: int = 0
    cache_miss: int = 0

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_rounds += 1
        if num_draft:
            self.num_drafts += 1
            self.num_draft_tokens += num_draft
            self.num_accepted_tokens += num_accepted
            count_accepted_per_pos(self.num_accepted_tokens_per_pos, num_draft, num_accepted)


def count_accepted_per_pos(per_pos: list[int], num_draft: int, num_accepted: int) -> None:
    """per_pos[i] += 1 for every accepted position i < num_accepted (grown to num_draft)."""
    while len(per_pos) < num_draft:
        per_pos.append(0)
    for i in range(num_accepted):
        per_pos[i] += 1


def fresh_seed() -> int:
    """The random stream of a sampled request without a seed (OS entropy; the global torch
    generator is left alone)."""
    return secrets.randbits(63)


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1  # target KV slot
    cache_len: int = 0  # tokens of the context whose KV the target holds (all but the pending one)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS) | "length" (max_tokens / context)
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    speculation: "Proposal | None" = None  # the speculation waiting to be verified
    spec_result: str | None = None  # hit | late | miss: how that speculation was found (None: not looked up)
    spec_stats: SeqSpecStats = field(default_factory=SeqSpecStats)
    options: RequestOptions = RequestOptions()  # mode, the gateway's draft pick, trace context: travel to the draft
    # feature drafters only: the target's fused features of every committed position but the
    # last (bf16 rows, appended per round), and those of the last forward until it is committed
    features: list = field(default_factory=list)
    fed_features: tuple | None = None
    error: str | None = None  # why the sequence failed (finish_reason "error")
    # params.logprobs set: per output token, (its log-probability, [(alternative, log-probability)])
    logprobs: list = field(default_factory=list)
    race_noise: dict = field(default_factory=dict)  # seeded sampling: position -> its race's noise (ssd/sampling.py)

    def all_features(self) -> torch.Tensor | None:
        return torch.cat(self.features) if self.features else None

    def __post_init__(self):
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else fresh_seed()
            self.generator = torch.Generator().manual_seed((seed * 1_000_003 + 17) % (1 << 64))  # any int64 seed

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def fail(self, message: str) -> None:
        """This sequence alone failed (its own parameters or numbers): it ends with finish reason
        "error" and the message; the rest of its batch goes on."""
        self.finished, self.finish_reason, self.error = True, "error", message

    def commit(self, tokens: list[int], max_model_len: int) -> list[int]:
        """Append tokens up to a stop condition; returns the tokens actually kept."""
        kept = []
        for t in tokens:
            if self.finished:
                break
            self.output_ids.append(t)
            kept.append(t)
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if t in self.eos_token_ids and not self.params.ignore_eos:
                self.finished, self.finish_reason = True, "stop"
            elif len(self.output_ids) >= self.params.max_tokens:
                self.finished, self.finish_reason = True, "length"
            elif len(self.prompt_ids) + len(self.output_ids) >= max_model_len:
                self.finished, self.finish_reason = True, "length"
        return kept


class Scheduler:
    """Continuous batching: sequences join when a slot frees and finish independently."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        new = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            self.running.append(seq)
            new.append(seq)
        return new

    def retire(self) -> list[Sequence]:
        done = [s for s in self.running if s.finished]
        self.running = [s for s in self.running if not s.finished]
        return done

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
