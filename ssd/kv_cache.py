"""Static slot-based KV cache and the AttnBatch builders (append / tree step).

One slot holds one sequence's columns; speculation trees live in the same slot after the
committed prefix, so nothing is ever copied per branch. Masks are built on the host from plain
lists and moved to the device once per forward (shared by all layers).
"""
from __future__ import annotations

import torch

from ssd.kernels.attention import AttnBatch, padded_len


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        # storage rounded up to whole 64-column tiles so the batch-invariant attention can read
        # whole tiles without copying (columns past a row's length are masked)
        shape = (num_layers, num_slots, num_kv_heads, padded_len(max_len), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, max_len, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, Hkv, max_len, D]
        self.num_slots, self.max_len = num_slots, max_len
        self.lengths: list[int] = [0] * num_slots  # committed columns per slot
        self._free = list(range(num_slots))  # kept sorted so batches tend to be contiguous ranges

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"KV cache full ({self.num_slots} slots)")
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        self._free.sort()
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        # also used to commit: columns past `length` are simply ignored by later masks
        if not 0 <= length <= self.max_len:
            raise ValueError(f"length {length} outside [0, {self.max_len}]")
        self.lengths[slot] = length

    def write_and_read(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
                       batch: AttnBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # k_new, v_new [B, Hkv, n, D] -> k, v [B, Hkv, S, D] (cache columns [0, S) of each row's slot)
        B, n, S = k_new.shape[0], k_new.shape[2], batch.read_len or batch.kv_len
        kc, vc = self.k[layer], self.v[layer]  # [slots, Hkv, max_len, D]
        s0, w0 = batch.slot_start, batch.write_start
        if s0 is not None and w0 is not None:
            kc[s0:s0 + B, :, w0:w0 + n] = k_new
            vc[s0:s0 + B, :, w0:w0 + n] = v_new
        else:
            rows = batch.slots[:, None]  # [B, 1] broadcast against write_cols [B, n]
            # advanced indices on dims 0 and 2 put the [B, n] index dims first: values are [B, n, Hkv, D]
            kc[rows, :, batch.write_cols] = k_new.transpose(1, 2)
            vc[rows, :, batch.write_cols] = v_new.transpose(1, 2)
        if s0 is not None:
            return kc[s0:s0 + B, :, :S], vc[s0:s0 + B, :, :S]
        return kc[:, :, :S].index_select(0, batch.slots), vc[:, :, :S].index_select(0, batch.slots)


def _slot_start(slots: list[int]) -> int | None:
    return slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None


def append_batch(slots: list[int], lengths: list[int], num_new: list[int] | int, device="cpu") -> AttnBatch:
    # row b appends num_new[b] tokens at columns/positions lengths[b]..; rows are right-padded to
    # n = max(num_new): padding token i writes column lengths[b] + i (after the real tokens, so no
    # real token sees it) and attends causally like a real token, so no row is fully masked.
    # Needs lengths[b] + n <= max_len for every row.
    B = len(slots)
    counts = [num_new] * B if isinstance(num_new, int) else list(num_new)
    if len(lengths) != B or len(counts) != B:
        raise ValueError("slots, lengths and num_new must have one entry per row")
    n = max(counts)
    S = max(lengths) + n
    prefix = torch.tensor(lengths, dtype=torch.long)  # [B]
    cols = prefix[:, None] + torch.arange(n)  # [B, n]
    mask = torch.arange(S)[None, None, :] <= cols[:, :, None]  # [B, n, S]
    same = all(x == lengths[0] for x in lengths)
    return AttnBatch(
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        positions=cols.to(device), write_cols=cols.to(device), mask=mask.to(device), kv_len=S,
        prefix_lens=prefix.to(device), slot_start=_slot_start(slots), write_start=lengths[0] if same else None)


def tree_step_batch(slots: list[int], visible_prefix: list[list[int]], region_start: list[int],
                    num_branches: list[int], step: int, base_positions: list[list[int]],
                    device="cpu") -> AttnBatch:
    # One step of tree decode: one new token per branch, for all branches of all rows at once.
    # Row b, branch j, step t: written at column region_start[b] + t * num_branches[b] + j, RoPE
    # position base_positions[b][j] + t; sees columns [0, visible_prefix[b][j]) and its own
    # tokens of steps 0..t. Rows are padded to n = max(num_branches): padding tokens see nothing
    # (zero output) and write at region_start[b] + (t + 1) * num_branches[b] + (j - num_branches[b]),
    # a column the row's next step overwrites, so a row needs
    # region_start[b] + (t + 1) * num_branches[b] + n - num_branches[b] <= max_len.
    B = len(slots)
    if not (len(visible_prefix) == len(region_start) == len(num_branches) == len(base_positions) == B):
        raise ValueError("one entry per row expected in every argument")
    n = max(num_branches)
    write = torch.zeros(B, n, dtype=torch.long)
    pos = torch.zeros(B, n, dtype=torch.long)
    vis = torch.zeros(B, n, dtype=torch.long)  # visible prefix length per token; 0 for padding
    real = torch.zeros(B, n, dtype=torch.bool)
    S = 0
    for b in range(B):
        nb = num_branches[b]
        if len(visible_prefix[b]) != nb or len(base_positions[b]) != nb:
            raise ValueError(f"row {b}: expected {nb} visible_prefix/base_positions entries")
        if nb and max(visible_prefix[b]) > region_start[b]:
            raise ValueError(f"row {b}: a branch's visible prefix overlaps the tree region")
        j = torch.arange(n)
        write[b] = torch.where(j < nb, region_start[b] + step * nb + j, region_start[b] + (step + 1) * nb + j - nb)
        pos[b, :nb] = torch.tensor(base_positions[b], dtype=torch.long) + step
        vis[b, :nb] = torch.tensor(visible_prefix[b], dtype=torch.long)
        real[b, :nb] = True
        if nb:
            S = max(S, region_start[b] + (step + 1) * nb)
    cols = torch.arange(S)  # [S]
    mask = cols[None, None, :] < vis[:, :, None]  # [B, n, S]
    # own earlier tokens: column c is branch j's step-s token iff c - start = s * nb + j, s <= step
    nbs = torch.tensor(num_branches, dtype=torch.long).clamp(min=1)[:, None, None]  # [B, 1, 1]
    rel = cols[None, None, :] - torch.tensor(region_start, dtype=torch.long)[:, None, None]  # [B, 1, S]
    own = (rel >= 0) & (rel % nbs == torch.arange(n)[None, :, None]) & (rel // nbs <= step)  # [B, n, S]
    mask |= own & real[:, :, None]
    return AttnBatch(
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        positions=pos.to(device), write_cols=write.to(device), mask=mask.to(device), kv_len=S,
        prefix_lens=None, slot_start=_slot_start(slots), write_start=None)
