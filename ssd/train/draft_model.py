"""The trainable draft: the inference LlamaModel (ssd/models/llama.py) run over whole sequences
(its forward_full path: causal SDPA, no KV cache), so training and serving execute the same blocks.

Its state dict as shipped and checkpointed uses Hugging Face Llama names
(model.layers.{i}.self_attn.q_proj.weight, ..., model.norm.weight, lm_head.weight) plus
head_token_ids; ssd.models.loader maps them to and from the fused inference layout. The
embedding is the target's and stays frozen (never saved); lm_head scores only head_token_ids
(the reduced-vocabulary head), in the order of those ids.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ssd.models.llama import LlamaModel, ModelConfig
from ssd.models.loader import our_state_dict, hf_state_dict, read_tensor, read_tensors

HEAD_IDS = "head_token_ids"


class DraftModel(nn.Module):
    def __init__(self, cfg: ModelConfig, head_ids: torch.Tensor):
        super().__init__()
        if cfg.model_type != "llama" or cfg.attention_bias or cfg.o_bias or cfg.qk_norm:
            raise ValueError("the trainable draft is plain Llama (no attention bias, no QK-norm)")
        self.cfg = cfg
        head_ids = torch.as_tensor(head_ids, dtype=torch.int64)
        net = LlamaModel(dataclasses.replace(cfg, tie_word_embeddings=False))  # the head is its own
        net.set_head(torch.zeros(head_ids.numel(), cfg.hidden_size), head_ids)
        for name, p in net.named_parameters():
            p.requires_grad_(name != "embed.weight")  # the target's embedding stays frozen
        self.net = net
        self.register_buffer(HEAD_IDS, head_ids.clone())  # [Vh] target id of each head row

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids [B, n] (right-padded; positions 0..n-1) -> logits over the head [B, n, Vh] fp32
        return self.net.forward_full(input_ids)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """What a draft ships and a checkpoint stores: everything but the target's embedding."""
        ours = {k: v.detach() for k, v in self.net.state_dict().items() if k != "embed.weight"}
        return {**hf_state_dict(self.net.cfg, ours), HEAD_IDS: self.head_token_ids.clone()}

    def load_own_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        head_ids = sd.pop(HEAD_IDS, None)
        if head_ids is None or not torch.equal(head_ids.long(), self.head_token_ids):
            raise KeyError("draft state mismatch: head_token_ids missing or different")
        try:
            ours = our_state_dict(self.net.cfg, {**sd, "model.embed_tokens.weight": self.net.embed.weight})
        except KeyError as e:
            raise KeyError(f"draft state mismatch: {e}") from None
        ours.pop("embed.weight")
        missing, unexpected = self.net.load_state_dict(ours, strict=False)
        if unexpected or [k for k in missing if k != "embed.weight"]:
            raise KeyError(f"draft state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def set_embedding(self, weight: torch.Tensor) -> None:
        self.net.embed.weight.data.copy_(weight)


def draft_config(target_path: str | Path, num_layers: int) -> dict:
    """The target's HF config with L layers and an untied head (the draft's config.json)."""
    d = json.loads((Path(target_path) / "config.json").read_text())
    d = {**d, "num_hidden_layers": num_layers, "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
    for k in ("_name_or_path", "_model_name_or_path", "quantization_config", "ssd_draft"):
        d.pop(k, None)
    return d


def init_layer_ids(num_target_layers: int, num_layers: int, how: str) -> list[int]:
    if how == "first":
        return list(range(num_layers))
    if num_layers == 1:
        return [num_target_layers - 1]
    # evenly spaced, always the first and the last (the last one feeds the final norm / head)
    return [round(i * (num_target_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def draft_from_target(target_path: str | Path, num_layers: int, head_ids: torch.Tensor,
                      init_layers: str = "spread") -> DraftModel:
    """Draft initialised from the target: its embedding, chosen layers, final norm, head rows."""
    from ssd.models.loader import read_config

    tcfg = read_config(target_path)
    cfg = ModelConfig.from_hf(draft_config(target_path, num_layers))
    cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": tcfg.eos_token_ids})
    model = DraftModel(cfg, head_ids)
    embed = read_tensor(target_path, "model.embed_tokens.weight")
    head = read_tensor(target_path, "lm_head.weight")
    head = embed if head is None or tcfg.tie_word_embeddings else head
    sd = {"model.norm.weight": read_tensor(target_path, "model.norm.weight"),
          "lm_head.weight": head[torch.as_tensor(head_ids, dtype=torch.int64)].clone(),
          "head_token_ids": torch.as_tensor(head_ids, dtype=torch.int64)}
    for i, src in enumerate(init_layer_ids(tcfg.num_layers, num_layers, init_layers)):
        for name, t in read_tensors(target_path, lambda n: n.startswith(f"model.layers.{src}.")):
            sd[name.replace(f"model.layers.{src}.", f"model.layers.{i}.", 1)] = t
    sd = {k: v.float() for k, v in sd.items() if "rotary_emb" not in k}
    sd["head_token_ids"] = sd["head_token_ids"].long()
    model.load_own_state_dict(sd)
    model.set_embedding(embed.float())
    return model


def grown_sources(num_target_layers: int, added: int) -> list[int]:
    """Target layers for the layers a grown draft adds: evenly spaced strictly inside the target
    (its first and last layers already initialised the draft's ends)."""
    return [round((j + 1) * (num_target_layers - 1) / (added + 1)) for j in range(added)]


_OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def grow_draft(earlier: DraftModel, target_path: str | Path, num_layers: int) -> DraftModel:
    """A deeper draft that computes exactly what `earlier` computes, to continue training with
    more layers. The earlier draft's first L-1 layers stay first and its last layer stays last
    (it feeds the final norm and head); the new layers go between them, each a target layer
    (evenly spaced over the target's middle) whose attention output and MLP down projections
    are zero, so a new layer adds nothing to the residual stream until training moves those
    projections. Embedding, norm and head (vocabulary included) are the earlier draft's."""
    from ssd.models.loader import read_config

    old = earlier.cfg.num_layers
    if num_layers <= old:
        raise ValueError(f"growing needs more layers than the draft's {old}, not {num_layers}")
    tcfg = read_config(target_path)
    added = num_layers - old
    sources = grown_sources(tcfg.num_layers, added)
    cfg = dataclasses.replace(earlier.cfg, num_layers=num_layers)
    model = DraftModel(cfg, earlier.head_token_ids)
    sd = {}
    for name, t in earlier.own_state_dict().items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            j = i if i < old - 1 else i + added  # the earlier last layer moves to the end
            name = name.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)
        sd[name] = t.float() if name != HEAD_IDS else t
    for k, src in enumerate(sources):
        j = old - 1 + k
        for name, t in read_tensors(target_path, lambda n: n.startswith(f"model.layers.{src}.")):
            if "rotary_emb" in name:
                continue
            new = name.replace(f"model.layers.{src}.", f"model.layers.{j}.", 1)
            sd[new] = torch.zeros_like(t, dtype=torch.float32) if new.endswith(_OUTPUT_PROJECTIONS) else t.float()
    model.load_own_state_dict(sd)
    model.set_embedding(earlier.net.embed.weight.detach().clone())
    return model
