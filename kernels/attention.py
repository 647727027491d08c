"""Attention over already-gathered KV-cache columns, behind one checked wrapper.

Two families:
- `invariant=True` (the engine's default): `attention_invariant`, a blocked kernel whose every
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

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    @property
    def num_new(self) -> int:
        return self.positions.shape[1]

    def to(self, device) -> "AttnBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return AttnBatch(mv(self.slots), mv(self.positions), mv(self.write_cols), mv(self.mask),
                         self.kv_len, mv(self.prefix_lens), self.slot_start, self.write_start)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttnBatch) -> None:
    B, Hq, n, D = q.shape
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"bad k/v shapes {tuple(k.shape)} {tuple(v.shape)} for q {tuple(q.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"num_heads {Hq} not a multiple of num_kv_heads {k.shape[1]}")
    if k.shape[2] != batch.kv_len:
        raise ValueError(f"k has {k.shape[2]} columns, batch.kv_len={batch.kv_len}")
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
        mask = batch.mask if batch.mask is not None else _append_mask(batch.prefix_lens, n, batch.kv_len)
        return attention_invariant(q, k, v, mask)
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


def attention_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batch-invariant attention (see the module docstring). q [B, Hq, n, D]; k, v [B, Hkv, S, D];
    mask [B, n, S] bool (True = may attend) -> [B, Hq, n, D] in q's dtype. Fully masked rows give
    zeros."""
    B, Hq, n, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    S64 = -(-S // COL_TILE) * COL_TILE
    kf = F.pad(k.float(), (0, 0, 0, S64 - S))  # [B, Hkv, S64, D]; padded columns are masked
    vf = F.pad(v.float(), (0, 0, 0, S64 - S))
    mask = F.pad(mask, (0, S64 - S))  # [B, n, S64], padding False
    # the rep query heads that share a kv head become rows of one GEMM: row = r * n + i
    qf = q.float().reshape(B, Hkv, rep, n, D) * (1.0 / math.sqrt(D))
    tok = max(1, MAX_ROWS // rep)  # query tokens per GEMM call (rows are independent)
    outs = [_attend_block(qf[:, :, :, i0:i0 + tok], kf, vf, mask[:, i0:i0 + tok]) for i0 in range(0, n, tok)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)  # [B, Hkv, rep, n, D]
    return out.reshape(B, Hq, n, D).to(q.dtype)


def _attend_block(q5, kf, vf, mask):
    # q5 [B, Hkv, rep, n, D]; kf, vf [B, Hkv, S64, D]; mask [B, n, S64] -> [B, Hkv, rep, n, D]
    B, Hkv, rep, n, D = q5.shape
    S64 = kf.shape[2]
    R = rep * n
    qf = q5.reshape(B, Hkv, R, D)
    Rp = -(-R // ROW_TILE) * ROW_TILE
    if Rp > R:
        qf = F.pad(qf, (0, 0, 0, Rp - R))
    allowed = mask[:, None, None].expand(B, 1, rep, n, S64).reshape(B, 1, R, S64)
    if Rp > R:
        allowed = F.pad(allowed, (0, 0, 0, Rp - R))  # padded rows see nothing
    scores = torch.matmul(qf, kf.transpose(-1, -2))  # [B, Hkv, Rp, S64]
    scores = scores.masked_fill(~allowed, float("-inf"))
    mx = scores.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(scores - mx)  # masked -> exactly 0
    tiles = S64 // COL_TILE
    pt = p.view(B, Hkv, Rp, tiles, COL_TILE)
    denom = pt.sum(-1).cumsum(-1)[..., -1:]  # [B, Hkv, Rp, 1]: tile sums, added tile by tile
    part = torch.matmul(pt.transpose(2, 3), vf.view(B, Hkv, tiles, COL_TILE, D))  # [B, Hkv, tiles, Rp, D]
    num = part.cumsum(2)[:, :, -1]  # [B, Hkv, Rp, D]
    out = num / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out[:, :, :R].reshape(B, Hkv, rep, n, D)
