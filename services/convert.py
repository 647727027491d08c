"""protobuf <-> core values. The only place that knows both shapes."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ssd.config import RequestOptions, SamplingParams
from ssd.speculation.qrows import support_of, to_vocab
from ssd.engine.protocol import (AddSequence, Advance, CachedBranches, CacheKeys, CacheReply, Features, JitReply, Release,
                                 RoundReply, RoundRequest, Speculation)

from .common import MAX_MESSAGE_BYTES
from .protos import pb

log = logging.getLogger(__name__)


def sampling_from_pb(m) -> SamplingParams:
    """Raises ValueError (-> INVALID_ARGUMENT) on bad values."""
    return SamplingParams(
        temperature=m.temperature,
        top_k=m.top_k,
        top_p=m.top_p if m.top_p != 0 else 1.0,
        max_tokens=m.max_tokens,
        seed=m.seed if m.HasField("seed") else None,
        ignore_eos=m.ignore_eos,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        repetition_penalty=m.repetition_penalty if m.repetition_penalty != 0 else 1.0,
        logit_bias=dict(m.logit_bias),
        min_tokens=m.min_tokens,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
    )


def sampling_to_pb(p: SamplingParams):
    m = pb.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, max_tokens=p.max_tokens,
                          ignore_eos=p.ignore_eos, presence_penalty=p.presence_penalty,
                          frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                          logit_bias=dict(p.logit_bias), min_tokens=p.min_tokens)
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    return m


def logprobs_to_pb(entries) -> list:
    """Sequence.logprobs entries -> TokenLogprob messages."""
    return [pb.TokenLogprob(logprob=lp, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in alts])
            for lp, alts in entries]


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def tensor_from_bytes(b: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype="<f4").copy()).reshape(shape)


def compact_columns(q: torch.Tensor, support: torch.Tensor | None, vocab_size: int):
    """q [..., S] over the token ids `support` (None: the whole vocabulary) -> (q [..., S'],
    ids [S'] | None): only the columns where some row is nonzero (a reduced draft head or
    top-k/top-p leaves most of the vocabulary at exactly 0), or the whole vocabulary (ids None)
    when listing the ids would not pay. Exact: dropped columns are zeros, kept values the draft's."""
    cols = support_of(q)
    ids = cols if support is None else support[cols]
    if 2 * ids.numel() < vocab_size:  # compact pays (ids + values vs values alone)
        return q[..., cols], ids
    return to_vocab(q, support, vocab_size), None


def put_q_rows(sp, q: torch.Tensor, support: torch.Tensor | None, vocab_size: int) -> None:
    """q [K, S] over `support` (the draft head's token ids; None: the vocabulary) into sp as
    fp32 bytes, compacted by compact_columns, so a sampled speculation cache at full batch stays
    far below the message limit."""
    q, ids = compact_columns(q, support, vocab_size)
    if ids is not None:
        sp.draft_probs_support.extend(ids.tolist())
    sp.draft_probs = tensor_to_bytes(q)


def get_q_rows(sp, vocab_size: int) -> torch.Tensor | None:
    """The q rows of sp as [n, vocab]: one row per draft token (n = K, or fewer for an adaptive
    JIT speculation). The byte count must match exactly: a short or long field is refused."""
    if not sp.draft_probs:
        return None
    n, width = len(sp.draft_token_ids), len(sp.draft_probs_support) or vocab_size
    if len(sp.draft_probs) != 4 * n * width:
        raise ValueError(f"q rows of {len(sp.draft_probs)} bytes for {n} draft tokens x {width} columns")
    if not sp.draft_probs_support:
        return tensor_from_bytes(sp.draft_probs, (n, vocab_size))
    support = torch.tensor(list(sp.draft_probs_support), dtype=torch.int64)
    q = torch.zeros(n, vocab_size, dtype=torch.float32)
    q[:, support] = tensor_from_bytes(sp.draft_probs, (n, width))
    return q


# ---- the round protocol (ssd/engine/protocol.py) over ssd.v1.Draft/Speculate ----------------
def features_to_pb(f: Features | None):
    return None if f is None else pb.Features(bf16=f.data, rows=f.rows, cols=f.cols)


def features_from_pb(msg) -> Features | None:
    """The features field of a SequenceSetup / Outcome (None when unset)."""
    if not msg.HasField("features"):
        return None
    f = msg.features
    return Features(f.bf16, f.rows, f.cols)


def round_to_pb(msg: RoundRequest) -> "pb.SpeculateRequest":
    req = pb.SpeculateRequest(round=msg.round_id, jit=[str(i) for i in msg.jit_ids], hit=[str(i) for i in msg.hit_ids],
                              jit_k={str(i): k for i, k in msg.jit_k.items()}, fan_out_budget=msg.fan_out_budget,
                              hit_k={str(i): k for i, k in msg.hit_k.items()})
    for op in msg.ops:
        if isinstance(op, AddSequence):
            req.add.append(pb.SequenceSetup(seq_id=str(op.seq_id), context_token_ids=op.context, sampling=sampling_to_pb(op.params),
                                            traceparent=op.options.traceparent, request_id=op.options.request_id,
                                            mode=op.options.mode.value if op.options.mode else "",
                                            features=features_to_pb(op.features)))
        elif isinstance(op, Advance):
            req.outcomes.append(pb.Outcome(seq_id=str(op.seq_id), committed_token_ids=op.tokens,
                                           features=features_to_pb(op.features)))
        elif isinstance(op, Release):
            req.release.append(str(op.seq_id))
            if op.reason == "abort":
                req.aborted.append(str(op.seq_id))
        else:
            raise TypeError(f"not a sequence op: {op!r}")
    for seq_id, tokens in msg.backups.items():
        req.backup.append(pb.BackupSpeculation(seq_id=str(seq_id), draft_token_ids=tokens))
    return req


def round_from_pb(req, seq_key) -> RoundRequest:
    """seq_key(str) -> the draft's own id for a sequence of this stream. Lengths for sequences
    the round does not name as jit / hit, or below 1, are refused (ValueError)."""
    if (set(req.jit_k) - set(req.jit) or set(req.hit_k) - set(req.hit) or req.fan_out_budget < 0
            or any(k < 1 for k in (*req.jit_k.values(), *req.hit_k.values()))):
        raise ValueError("jit_k / hit_k must name jit / hit sequences with lengths >= 1, and fan_out_budget be >= 0")
    ops: list = [AddSequence(seq_key(a.seq_id), list(a.context_token_ids), sampling_from_pb(a.sampling),
                             RequestOptions(mode=a.mode or None, traceparent=a.traceparent, request_id=a.request_id),
                             features_from_pb(a))
                 for a in req.add]
    ops += [Advance(seq_key(o.seq_id), list(o.committed_token_ids), features_from_pb(o)) for o in req.outcomes]
    aborted = set(req.aborted)
    ops += [Release(seq_key(r), "abort" if r in aborted else None) for r in req.release]
    backups = {seq_key(b.seq_id): list(b.draft_token_ids) for b in req.backup}
    return RoundRequest(req.round, ops, [seq_key(i) for i in req.jit], backups, [seq_key(i) for i in req.hit],
                        {seq_key(i): k for i, k in req.jit_k.items()}, req.fan_out_budget,
                        {seq_key(i): k for i, k in req.hit_k.items()})


def reply_to_pb(msg: RoundReply, seq_name, vocab_size: int, support: torch.Tensor | None = None,
                channel: bool = False, k: int = 0):
    """Draft reply -> (response, tensor | None). k: the speculation depth K (the channel tensor's
    second dimension). q refs are ("inline", tensor [.., n, S]) over
    `support`, the draft head's token ids (None: the vocabulary). With a tensor channel the rows
    are gathered into one [rows, K, S'] tensor over their union support (named in the response)
    sent after the response instead of travelling as bytes inside it."""
    rows: list[torch.Tensor] = []

    def attach(sp, q):  # q: [n, S], one row per draft token (n <= K)
        if channel:
            sp.channel_probs = True
            rows.append(q)
        else:
            put_q_rows(sp, q, support, vocab_size)

    if isinstance(msg, CacheKeys):
        items = [pb.Speculation(seq_id=seq_name(i), num_accepted=k, token=t) for i, keys in msg.keys.items() for k, t in keys]
        resp = pb.SpeculateResponse(round=msg.round_id, keys=pb.Speculations(items=items))
    elif isinstance(msg, JitReply):
        items = []
        for i, spec in msg.speculations.items():
            sp = pb.Speculation(seq_id=seq_name(i), draft_token_ids=spec.token_ids)
            if spec.q_ref is not None:
                attach(sp, spec.q_ref[1])
            items.append(sp)
        resp = pb.SpeculateResponse(round=msg.round_id, jit=pb.Speculations(items=items), seconds=msg.seconds)
    elif isinstance(msg, CacheReply):
        if msg.entries is None:
            return pb.SpeculateResponse(round=msg.round_id, cache=pb.Speculations(abandoned=True), seconds=msg.seconds), None
        items = []
        for i, c in msg.entries.items():
            for (kk, t), j in c.keys.items():  # (kk: not k, the depth this function pads to)
                sp = pb.Speculation(seq_id=seq_name(i), num_accepted=kk, token=t, draft_token_ids=c.token_ids[j])
                if c.q_ref is not None:
                    attach(sp, c.q_ref[1][j])
                items.append(sp)
        resp = pb.SpeculateResponse(round=msg.round_id, cache=pb.Speculations(items=items), seconds=msg.seconds)
        if not channel and resp.ByteSize() > MAX_MESSAGE_BYTES - (1 << 20):
            # would not fit the message limit: refuse this round's cache (the target counts the
            # round as a miss and falls back) instead of losing the whole stream
            log.warning("speculation cache of round %s is %.1f MB, over the %d MB message limit: not sent",
                        msg.round_id, resp.ByteSize() / 1e6, MAX_MESSAGE_BYTES >> 20)
            return pb.SpeculateResponse(round=msg.round_id, cache=pb.Speculations(abandoned=True), seconds=msg.seconds), None
    else:
        raise TypeError(f"not a draft reply: {msg!r}")
    if not rows:
        return resp, None
    resp.channel_rows = len(rows)
    if not k:
        raise ValueError("q rows on a tensor channel need the speculation depth k")
    depth = k  # the channel tensor is [rows, K, S]: pad short speculations with zero rows
    rows = [r if r.shape[0] == depth else torch.cat([r, r.new_zeros(depth - r.shape[0], *r.shape[1:])]) for r in rows]
    stacked, ids = compact_columns(torch.stack(rows), support, vocab_size)  # [rows, K, S']
    if ids is not None:
        resp.channel_support.extend(ids.tolist())
    return resp, stacked.contiguous()


def reply_from_pb(resp, k: int, vocab_size: int, channel_rows: torch.Tensor | None = None) -> RoundReply:
    """Response -> the reply the SSD engine expects; q refs become ("inline", tensor [.., n, vocab]),
    one row per draft token (n <= K). channel_rows: the [rows, K, S] tensor received on the
    tensor channel after resp, over resp.channel_support. A reply that does not add up (longer
    than K, rows announced but missing, ids outside the vocabulary, bytes that do not match) is
    refused with ValueError."""
    body = resp.WhichOneof("body")
    if body is None:
        raise ValueError("a response with no body")
    items = getattr(resp, body).items
    if any(len(sp.draft_token_ids) > k for sp in items):
        raise ValueError(f"a speculation longer than K = {k}")
    if sum(sp.channel_probs for sp in items) != resp.channel_rows or (resp.channel_rows and channel_rows is None):
        raise ValueError(f"{resp.channel_rows} channel rows announced for {sum(sp.channel_probs for sp in items)} "
                         f"speculations{'' if channel_rows is not None or not resp.channel_rows else ', none received'}")
    supports = (resp.channel_support, *(sp.draft_probs_support for sp in items))  # min/max: no per-id Python loop
    if any(ids and (min(ids) < 0 or max(ids) >= vocab_size) for ids in supports):
        raise ValueError("q support ids outside the vocabulary")
    if channel_rows is not None and resp.channel_support:
        channel_rows = to_vocab(channel_rows, torch.tensor(list(resp.channel_support), dtype=torch.int64), vocab_size)
    taken = iter(range(resp.channel_rows))

    def q_of(sp):
        if sp.channel_probs:  # the slot's first len(draft_token_ids) rows (the rest pad a short speculation)
            return channel_rows[next(taken)][: len(sp.draft_token_ids)]
        return get_q_rows(sp, vocab_size)

    if body == "keys":
        keys: dict[int, list] = {}
        for sp in items:
            keys.setdefault(int(sp.seq_id), []).append((sp.num_accepted, sp.token))
        return CacheKeys(resp.round, keys)
    if body == "jit":
        reply = {}
        for sp in items:
            q = q_of(sp)
            reply[int(sp.seq_id)] = Speculation(list(sp.draft_token_ids), None if q is None else ("inline", q))
        return JitReply(resp.round, reply, resp.seconds)
    if resp.cache.abandoned:
        return CacheReply(resp.round, None, resp.seconds)
    grouped: dict[int, list] = {}
    for sp in items:
        grouped.setdefault(int(sp.seq_id), []).append(sp)
    reply = {}
    for i, sps in grouped.items():
        keys = {(sp.num_accepted, sp.token): j for j, sp in enumerate(sps)}
        tokens = [list(sp.draft_token_ids) for sp in sps]
        q = None
        if sps[0].draft_probs or sps[0].channel_probs:
            q = ("inline", torch.stack([q_of(sp) for sp in sps]))
        reply[i] = CachedBranches(keys, tokens, q)
    return CacheReply(resp.round, reply, resp.seconds)
