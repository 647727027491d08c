"""What a draft is trained on: KL from the teacher's top-k over the head plus cross-entropy on its
top-1, for one batch of examples."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ssd.train.config import TrainDraftConfig
from ssd.train.draft_model import DraftModel
from ssd.train.examples import Example, collate



def distill_loss(draft_logits, teacher_logits, teacher_idx, mask, ce_weight: float):
    """KL(target || draft) over the head vocabulary + ce_weight * CE on the target's top head token.
    The target's distribution is renormalised over its top-k head tokens; the draft's over the
    whole head. -> (loss, mean KL) scalars"""
    logq = F.log_softmax(draft_logits, -1)  # [B, n, Vh]
    teacher_logits = teacher_logits.masked_fill(~mask[..., None], 0.0)  # rows not trained on: any finite values
    logp = F.log_softmax(teacher_logits, -1)  # [B, n, k]; -inf columns (outside the head) get p = 0
    p = logp.exp()
    logq_k = logq.gather(-1, teacher_idx)  # [B, n, k]
    kl = torch.where(p > 0, p * (logp - logq_k), 0.0).sum(-1)  # [B, n]
    ce = -logq_k[..., 0]  # topk is sorted: column 0 is the target's argmax over the head
    w = mask.float()
    denom = w.sum().clamp(min=1)
    kl_mean = (kl * w).sum() / denom
    return kl_mean + ce_weight * (ce * w).sum() / denom, kl_mean


def standalone_loss(draft: DraftModel, examples: list[Example], cfg: TrainDraftConfig, use_bf16: bool):
    ids, tl, ti, mask = collate(examples)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):  # fp32 weights and loss either way
        logits = draft(ids)
    return distill_loss(logits.float(), tl, ti, mask, cfg.ce_weight)
