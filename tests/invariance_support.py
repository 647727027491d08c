"""Shared by the batch-invariance tests (kernels and the real model): a negative control, and the
mark for tests of bf16's row-invariant kernels."""
import pytest
import torch

from ssd.kernels.linear import bf16_packing_supported

# bf16's row-invariant matmul is oneDNN's packed kernel, which needs AVX-512 (BW, VL, DQ) or
# AVX-NE-CONVERT: on other CPUs bf16 runs through F.linear and the start-up probe reports the
# kernels not invariant (tests/kernels/test_invariance.py checks that fallback)
needs_bf16_packing = pytest.mark.skipif(
    not bf16_packing_supported(), reason="this CPU cannot pack bf16 weights for oneDNN (no AVX-512 BW/VL/DQ or "
    "AVX-NE-CONVERT): bf16 is not row-invariant here")


def shape_dependent_attention(q, k, v, mask):
    """A deliberately non-invariant attention: it sums P @ V in column order for one query token
    and in reverse column order for blocks of several, the way shape-driven kernels differ."""
    scores = (q.float() @ k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
    p = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), -1).nan_to_num(0.0)
    vv = v.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    if q.shape[2] > 1:
        p, vv = p.flip(-1), vv.flip(-2)
    terms = p[..., :, :, None] * vv[:, :, None]  # [B, H, n, S, D]
    return terms.cumsum(-2)[..., -1, :].to(q.dtype)


def block_precision_attention(q, k, v, mask):
    """Another non-invariant attention, as a kernel that keeps P in bf16 for blocks of several
    query tokens and in fp32 for one: differences of bf16's step (2^-8), which survive the 8-bit
    quantization of the next projection's input where last-bit ones mostly do not."""
    scores = (q.float() @ k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
    p = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), -1).nan_to_num(0.0)
    if q.shape[2] > 1:
        p = p.bfloat16().float()
    return (p @ v.float().repeat_interleave(q.shape[1] // k.shape[1], 1)).to(q.dtype)

