"""The messages between the target and its draft: one typed round protocol for every transport
(the local draft process's pipe, the draft service's gRPC stream, several drafts behind one
target). protos/ssd/v1/ssd.proto mirrors these field for field (services/convert.py maps them).

target -> draft, once per target step:
  RoundRequest(round_id, ops, jit_ids, backups, hit_ids)
    ops       what changed for each sequence since the last round: AddSequence | Advance | Release
              (for a feature drafter these carry the target's fused hidden states of the committed
              positions: the draft's true features; everything after them it feeds itself)
    jit_ids   sequences that missed: draft a speculation just in time and reply at once
    backups   {seq_id: tokens} speculations the target took elsewhere (fast backup, speculation
              index, or a cache entry another draft built): the draft continues from them
    hit_ids   sequences whose speculation came from this draft's last cache
  Stop()

draft -> target, in this order for a round:
  JitReply      iff jit_ids: {seq_id: Speculation}
  CacheKeys     the outcomes the cache will hold, sent right after the fork (before the tree
                decode), so a target whose outcomes all missed need not wait for the tokens
  CacheReply    always; entries None when the build was abandoned (a newer round arrived)
  DraftFailed   the draft could not continue

q rows (the draft's full distributions, needed by sampled verification) never travel inside
these messages as dense arrays: a reply carries a q_ref that the link resolves (shared memory
for the local process, inline bytes or a tensor channel for gRPC).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from ..config import RequestOptions, SamplingParams


# ---- target -> draft ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Features:
    """Target feature rows [rows, cols] as raw bf16 bytes: pickles and serialises as plain bytes
    (a tensor through a multiprocessing pipe would travel as a shared-memory file descriptor)."""
    data: bytes
    rows: int
    cols: int

    @classmethod
    def of(cls, t) -> "Features | None":
        if t is None:
            return None
        import torch

        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        return cls(t.view(torch.int16).numpy().tobytes(), int(t.shape[0]), int(t.shape[1]))

    def tensor(self):
        import numpy as np
        import torch

        if len(self.data) != 2 * self.rows * self.cols:
            raise ValueError(f"features: {len(self.data)} bytes for {self.rows} x {self.cols} bf16 values")
        a = np.frombuffer(self.data, dtype=np.int16).reshape(self.rows, self.cols)
        return torch.from_numpy(a.copy()).view(torch.bfloat16)


@dataclass(frozen=True)
class AddSequence:
    """A new sequence (or one moved to this draft): its whole context so far."""
    seq_id: int
    context: list[int]
    params: SamplingParams
    options: RequestOptions = RequestOptions()  # mode, request_id, traceparent, the gateway's draft pick
    features: "Features | None" = None  # feature drafters: [len(context) - 1, F] the target's fused features of every position but the last


@dataclass(frozen=True)
class Advance:
    """The tokens the target committed for a sequence in the last round (accepted + recovery/bonus)."""
    seq_id: int
    tokens: list[int]
    features: "Features | None" = None  # feature drafters: [len(tokens), F] the target's features of the positions from the
    #                       previous last token up to the one before the new last (all now committed)


@dataclass(frozen=True)
class Release:
    """The sequence finished; reason is its finish reason ("abort" also deletes its index entries)."""
    seq_id: int
    reason: str | None = None


SequenceOp = Union[AddSequence, Advance, Release]


@dataclass(frozen=True)
class RoundRequest:
    round_id: int
    ops: list[SequenceOp] = field(default_factory=list)
    jit_ids: list[int] = field(default_factory=list)
    backups: dict[int, list[int]] = field(default_factory=dict)
    hit_ids: list[int] = field(default_factory=list)
    # adaptive speculation (docs/algorithm.md section 7): most tokens each JIT speculation may
    # hold (K when absent), and the fan-out budget of this round's build (0: the configured one)
    jit_k: dict[int, int] = field(default_factory=dict)
    fan_out_budget: int = 0
    # adaptive SSD (section 7d): hit sequences whose cached speculation the target verifies
    # only in part -> the tokens it verifies (the draft builds the next cache for that prefix)
    hit_k: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Stop:
    pass


# ---- draft -> target ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speculation:
    """K draft tokens and, when sampling, a reference to the q rows they were drawn from."""
    token_ids: list[int]
    q_ref: Any = None


@dataclass(frozen=True)
class JitReply:
    round_id: int
    speculations: dict[int, Speculation]
    seconds: float


@dataclass(frozen=True)
class CacheKeys:
    round_id: int
    keys: dict[int, list[tuple[int, int]]]  # seq_id -> the outcomes (k, t*) its cache will hold


@dataclass(frozen=True)
class CachedBranches:
    """One sequence's speculation cache: outcome (k, t*) -> branch index into token_ids."""
    keys: dict[tuple[int, int], int]
    token_ids: list[list[int]]
    q_ref: Any = None  # all branches' q rows; q_row(q_ref, j) gives branch j's [K, V]


@dataclass(frozen=True)
class CacheReply:
    round_id: int
    entries: dict[int, CachedBranches] | None  # None: the build was abandoned
    seconds: float


@dataclass
class DraftInfo:
    """What a draft says about itself when a link reaches it (DraftLink.info)."""

    vocab_size: int  # the target's vocabulary, which its q rows are mapped into
    num_layers: int = 0
    q_width: int = 0  # columns of its q rows: its head's vocabulary (0: not reported)
    feature_layers: tuple[int, ...] = ()  # a feature drafter: the target layers whose inputs it reads
    model: str = ""  # a draft service's model description
    node: str = ""  # the node a draft service runs on
    fingerprint: str = ""  # a draft service's speculation-index fingerprint ("" = the target computes it)
    publishes: bool = False  # the draft writes its speculations to the shared index itself
    tensor_channel: str = "inline"  # how its q rows travel: inline bytes, gloo or nccl
    drafts: tuple[str, ...] = ()  # a link over several drafts: their addresses

    def identity(self) -> tuple:
        """What every draft of one target must share: index keys, vocabulary, who publishes."""
        return self.fingerprint, self.vocab_size, self.publishes


@dataclass(frozen=True)
class DraftReady:
    info: DraftInfo
    head_ids: Any = None  # int64 [Vh]: the token ids of the draft head's columns (None: the whole vocabulary)
    q_buffers: Any = None  # the local draft process's shared-memory q rows (cache [2, seqs, branches, K, Vh], jit)


@dataclass(frozen=True)
class DraftFailed:
    message: str


RoundReply = Union[JitReply, CacheKeys, CacheReply]
