"""Attention over already-gathered KV-cache columns, behind one checked wrapper.

Two families:
- `invariant=True` (the engine's default): on a CPU with AVX-512, the C++ kernel of
  csrc/layer_ops.cpp, which computes each query row on its own over its visible columns in column
  order (invariant by construction, and one call per layer); elsewhere
  `attention_invariant`, a blocked kernel whose every
  reduction has a fixed order that depends neither on the number of query rows, nor on the batch,
  nor on how many masked columns surround a row's visible ones. A token's output is therefore
  bitwise the same alone (AR step), inside a K+1 verify block, as a tree branch, next to other
  sequences of other lengths, or after a rollback. How (all in fp32):
    scores   per (sequence, kv head): Q [R, D] @ K^T [D, S64] with R padded to a multiple of 8
             and S64 to a multiple of 64 (fixed-shape GEMM tiles; measured row- and
             position-invariant, docs/batch-invariance.md)
    softmax  exact row max (order-free), exp of a contiguous block whose size is a multiple of
             512 (every element on the vector path, no scalar tail)
    P @ V    per 64-column tile: [R, 64] @ [64, D]; the per-tile partial sums (and the row sums
             of P, a fixed-length 64-element reduction) are then added tile after tile by
             `cumsum`, a sequential scan: a masked column adds an exact zero, so trailing or
             interleaved masked columns (append masks, tree masks, padding) change nothing.
- `invariant=False`: the fast paths: flash-attn's kvcache kernel (CUDA, fp16/bf16, plain
  append-causal masks) and torch SDPA (everything else). Neither is batch-invariant (SDPA's CPU
  kernel splits queries and keys into blocks by shape; flash-attn splits the KV by batch size).

`attention_reference` is the fp32 oracle the tests compare every path against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # optional GPU dependency
    from flash_attn import flash_attn_with_kvcache
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_with_kvcache = None


@dataclass
class AttnBatch:
    slots: torch.Tensor               # [B] int64, KV-cache slot of each row
    positions: torch.Tensor           # [B, n] int64, RoPE (logical) position of each new token
    write_cols: torch.Tensor          # [B, n] int64, cache column where each new token's k/v is stored
    mask: torch.Tensor | None         # [B, n, S] bool, True = may attend; S = kv_len
    kv_len: int                       # S: number of cache columns read
    prefix_lens: torch.Tensor | None  # [B] int64; set iff the mask is plain append-causal (see kv_cache.append_batch)
    # host-side hints the builders fill in so the cache can use slices instead of index_put/gather
    slot_start: int | None = None     # slots == range(slot_start, slot_start + B)
    write_start: int | None = None    # write_cols[b] == range(write_start, write_start + n) for every row
    # columns the cache hands to attention (>= kv_len; the invariant kernel reads whole 64-column
    # tiles and masks the columns past kv_len); None = kv_len
    read_len: int | None = None
    # per-forward state of the invariant kernel (mask turned into additive biases), shared by all layers
    prep: object = None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch) -> None:
    B, Hq, n, D = q.shape
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"bad k/v shapes {tuple(k.shape)} {tuple(v.shape)} for q {tuple(q.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"num_heads {Hq} not a multiple of num_kv_heads {k.shape[1]}")
    if k.shape[2] != (batch.read_len or batch.kv_len):
        raise ValueError(f"k has {k.shape[2]} columns, batch reads {batch.read_len or batch.kv_len}")
    if batch.mask is not None and batch.mask.shape != (B, n, batch.kv_len):
        raise ValueError(f"mask {tuple(batch.mask.shape)} != {(B, n, batch.kv_len)}")


def _use_flash(q: torch.Tensor, batch: AttnBatch) -> bool:
    return (flash_attn_with_kvcache is not None and q.is_cuda and batch.prefix_lens is not None
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch,
              invariant: bool = True) -> torch.Tensor:
    # q [B, Hq, n, D]; k, v [B, Hkv, S, D] -> [B, Hq, n, D]
    _check(q, k, v, batch)
    B, Hq, n, D = q.shape
    if invariant:
        native = _native() if q.is_cpu and D % 16 == 0 and q.dtype in (torch.float32, torch.bfloat16) else None
        if native is not None and k.dtype == q.dtype:
            if not isinstance(batch.prep, NativePrep):
                batch.prep = NativePrep(batch, n)
            return native.attend(q, k, v, batch.prep.mask, batch.prep.limits, batch.kv_len, None)
        if batch.prep is None or isinstance(batch.prep, NativePrep) or batch.prep.rep != Hq // k.shape[1]:
            mask = batch.mask if batch.mask is not None else _append_mask(batch.prefix_lens, n, batch.kv_len)
            batch.prep = InvariantPrep(mask, Hq // k.shape[1])
        return _attend(q, k, v, batch.prep)
    if batch.read_len not in (None, batch.kv_len):
        k, v = k[:, :, :batch.kv_len], v[:, :, :batch.kv_len]
    if _use_flash(q, batch):
        # flash layout is [B, S, H, D]; causal is aligned to the bottom right of cache_seqlens,
        # i.e. token i sees columns < prefix_lens + i + 1, exactly the append-causal mask
        seqlens = (batch.prefix_lens + n).to(torch.int32)
        out = flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      cache_seqlens=seqlens, causal=True)
        return out.transpose(1, 2)
    mask = batch.mask
    if mask is None:
        if batch.prefix_lens is None:
            raise ValueError("AttnBatch needs a mask or prefix_lens")
        mask = _append_mask(batch.prefix_lens, n, batch.kv_len)
    if q.is_cpu and n <= EAGER_MAX_ROWS:
        return _eager(q, k, v, mask)
    if (q.is_cpu and n == 1 and B == 1 and batch.prefix_lens is not None
            and batch.kv_len == n + int(batch.prefix_lens[0])):
        attn_mask = None  # single-token decode sees every column read: skip the mask
    else:
        attn_mask = mask.unsqueeze(1)  # [B, 1, n, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=k.shape[1] != Hq)
    if not q.is_cpu and attn_mask is not None:
        # CPU SDPA already returns zeros for fully masked rows; other backends may give NaN
        out = out.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)
    return out


def _native():
    """The C++ extension (csrc/layer_ops.cpp), or None where it does not build."""
    from .quant import build

    return build()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. Where it runs and nothing asks for gradients: the native
    one-row-at-a-time kernel (csrc/layer_ops.cpp, row-invariant by construction; one call instead
    of the ~8 ops of F.rms_norm); otherwise F.rms_norm (training, CUDA, other CPUs)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    if (weight is not None and x.is_cpu and not needs_grad and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16)):
        native = _native()
        if native is not None:
            return native.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class NativePrep:
    """What the native kernel reads of one forward's mask, built once and shared by every layer:
    the bool mask [B, n, kv_len], or for plain append-causal blocks only each row's column limit."""

    def __init__(self, batch: AttnBatch, n: int):
        self.mask, self.limits = None, None
        if batch.mask is not None:
            self.mask = batch.mask.contiguous()
        elif batch.prefix_lens is not None:
            self.limits = (batch.prefix_lens[:, None] + torch.arange(1, n + 1)).contiguous()
        else:
            raise ValueError("AttnBatch needs a mask or prefix_lens")


# Decode and verify on the CPU: masked SDPA with GQA measured 31.5 ms (bf16) / 12.8 ms (fp32) for
# 32 rows x 600 columns, the two matmuls below 5.0 / 8.9 ms (one thread). Longer query blocks
# (prefill) keep SDPA, whose memory does not grow with n x S per head.
EAGER_MAX_ROWS = 16


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, n, D]; k, v [B, Hkv, S, D]; mask [B, n, S] -> [B, Hq, n, D]. The query heads of a kv
    head form one matmul; scores and softmax in fp32; fully masked rows give zeros."""
    B, Hq, n, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    scores = torch.matmul(q.reshape(B, Hkv, rep * n, D), k.transpose(-1, -2)).float() * (D ** -0.5)
    m = mask[:, None, None].expand(B, 1, rep, n, S).reshape(B, 1, rep * n, S)
    p = scores.masked_fill(~m, float("-inf")).softmax(-1).nan_to_num_(0.0)  # all -inf rows: NaN -> 0
    return torch.matmul(p.to(v.dtype), v).reshape(B, Hq, n, D)


def _append_mask(prefix_lens: torch.Tensor, n: int, S: int) -> torch.Tensor:
    cols = torch.arange(S, device=prefix_lens.device)
    limit = prefix_lens[:, None] + torch.arange(1, n + 1, device=prefix_lens.device)  # [B, n]
    return cols[None, None, :] < limit[:, :, None]  # [B, n, S]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    # q [B, Hq, n, D]; k, v [B, Hkv, S, D]; mask [B, n, S] -> [B, Hq, n, D] in q's dtype
    B, Hq, n, D = q.shape
    rep = Hq // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(D)  # [B, Hq, n, S]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # fully masked rows -> zeros
    return (probs @ vf).to(q.dtype)


ROW_TILE = 8     # query rows per (sequence, kv head) are padded to a multiple of this
COL_TILE = 64    # key/value columns are padded to a multiple of this; P @ V runs per tile
MAX_ROWS = 1024  # query rows per GEMM call (prefill is split; rows are independent)
_MASKED = -1e30  # additive bias of a masked column: exp(-1e30 - max) is exactly 0, and a row
                 # with nothing visible stays finite (its output is zeroed explicitly)


def padded_len(kv_len: int) -> int:
    """Columns the invariant kernel reads for kv_len visible ones (whole 64-column tiles)."""
    return -(-kv_len // COL_TILE) * COL_TILE


class InvariantPrep:
    """The mask of one forward as the invariant kernel uses it, built once and shared by every
    layer: per chunk of query tokens, an additive bias [B, 1, Rp, S64] (0 or -1e30) over rows
    ordered (query head within its kv group, token) and padded to a multiple of ROW_TILE, and a
    keep factor [B, 1, Rp, 1] that zeroes rows seeing nothing (padding rows, tree padding)."""

    def __init__(self, mask: torch.Tensor, rep: int):
        B, n, S = mask.shape
        self.rep, self.n, self.S64 = rep, n, padded_len(S)
        mask = F.pad(mask, (0, self.S64 - S))  # [B, n, S64], padding columns masked
        self.tok = max(1, MAX_ROWS // rep)  # query tokens per GEMM call
        self.chunks = []
        for i0 in range(0, n, self.tok):
            m = mask[:, i0:i0 + self.tok]
            nc = m.shape[1]
            R = rep * nc
            Rp = -(-R // ROW_TILE) * ROW_TILE
            rows = m[:, None].expand(B, rep, nc, self.S64).reshape(B, 1, R, self.S64)
            rows = F.pad(rows, (0, 0, 0, Rp - R))  # padded rows see nothing
            bias = torch.zeros(rows.shape, dtype=torch.float32, device=mask.device).masked_fill_(~rows, _MASKED)
            seen = rows.any(-1, keepdim=True)
            keep = None if bool(seen.all()) else seen.float()
            self.chunks.append((i0, nc, R, Rp, bias, keep))


def attention_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batch-invariant attention (see the module docstring). q [B, Hq, n, D]; k, v [B, Hkv, S, D];
    mask [B, n, S] bool (True = may attend) -> [B, Hq, n, D] in q's dtype. Fully masked rows give
    zeros."""
    return _attend(q, k, v, InvariantPrep(mask, q.shape[1] // k.shape[1]))


def _attend(q, k, v, prep: InvariantPrep) -> torch.Tensor:
    B, Hq, n, D = q.shape
    Hkv, S64, rep = k.shape[1], prep.S64, prep.rep
    if k.shape[2] >= S64:  # the cache handed over whole tiles (columns past kv_len are masked)
        kf, vf = k[:, :, :S64].float(), v[:, :, :S64].float()
    else:
        kf, vf = F.pad(k.float(), (0, 0, 0, S64 - k.shape[2])), F.pad(v.float(), (0, 0, 0, S64 - k.shape[2]))
    tiles = S64 // COL_TILE
    vt = vf.reshape(B, Hkv, tiles, COL_TILE, D)
    kT = kf.transpose(-1, -2)
    # rows that share a kv head form one GEMM: row = r * n_chunk + i (query head r of the group)
    q5 = q.reshape(B, Hkv, rep, n, D)
    outs = []
    for i0, nc, R, Rp, bias, keep in prep.chunks:
        qf = q5[:, :, :, i0:i0 + nc].float().reshape(B, Hkv, R, D) * (1.0 / math.sqrt(D))
        if Rp > R:
            qf = F.pad(qf, (0, 0, 0, Rp - R))
        scores = torch.matmul(qf, kT).add_(bias)  # [B, Hkv, Rp, S64]
        p = torch.exp(scores - scores.amax(-1, keepdim=True))  # masked -> exactly 0
        pt = p.view(B, Hkv, Rp, tiles, COL_TILE)
        denom = pt.sum(-1).cumsum(-1)[..., -1:]  # [B, Hkv, Rp, 1]: tile sums, added tile by tile
        part = torch.matmul(pt.transpose(2, 3), vt)  # [B, Hkv, tiles, Rp, D]: one GEMM per tile
        out = part.cumsum(2)[:, :, -1].div_(denom)  # tiles added in order
        if keep is not None:
            out = out.mul_(keep)
        outs.append(out[:, :, :R].reshape(B, Hkv, rep, nc, D))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return out.reshape(B, Hq, n, D).to(q.dtype)
