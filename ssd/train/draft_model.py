"""Trainable Llama-style draft: plain PyTorch over full sequences (causal SDPA, no KV cache).

Parameter names are Hugging Face Llama's (model.layers.{i}.self_attn.q_proj.weight, ...,
model.norm.weight, lm_head.weight), so the shipped weights go through ssd.models.loader's name
mapping. The embedding is the target's and stays frozen; lm_head scores only head_token_ids
(the reduced-vocabulary head), in the order of those ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssd.models.llama import ModelConfig, rope_inv_freq
from ssd.models.loader import read_tensor, read_tensors


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, Hq, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.q_proj = nn.Linear(H, Hq * D, bias=False)
        self.k_proj = nn.Linear(H, Hkv * D, bias=False)
        self.v_proj = nn.Linear(H, Hkv * D, bias=False)
        self.o_proj = nn.Linear(Hq * D, H, bias=False)
        self.Hq, self.Hkv, self.D = Hq, Hkv, D

    def forward(self, x, cos, sin):
        # x [B, n, H]; cos, sin [n, D/2]
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.Hq, self.D).transpose(1, 2)  # [B, Hq, n, D]
        k = self.k_proj(x).view(B, n, self.Hkv, self.D).transpose(1, 2)  # [B, Hkv, n, D]
        v = self.v_proj(x).view(B, n, self.Hkv, self.D).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, Hq, n, D]
        return self.o_proj(a.transpose(1, 2).reshape(B, n, self.Hq * self.D))


def _rope(x, cos, sin):
    # rotate-half RoPE, as the inference model and HF Llama
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen, never saved
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DraftModel(nn.Module):
    def __init__(self, cfg: ModelConfig, head_ids: torch.Tensor):
        super().__init__()
        if cfg.model_type != "llama" or cfg.attention_bias or cfg.o_bias or cfg.qk_norm:
            raise ValueError("the trainable draft is plain Llama (no attention bias, no QK-norm)")
        self.cfg = cfg
        self.model = _Body(cfg)
        head_ids = torch.as_tensor(head_ids, dtype=torch.int64)
        self.lm_head = nn.Linear(cfg.hidden_size, head_ids.numel(), bias=False)
        self.register_buffer("head_token_ids", head_ids.clone())  # [Vh] target id of each head row
        inv = rope_inv_freq(cfg)  # [D/2]
        freqs = torch.outer(torch.arange(cfg.max_position).float(), inv)  # [max_position, D/2]
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids [B, n] (right-padded; positions 0..n-1) -> logits over the head [B, n, Vh] fp32
        n = input_ids.shape[1]
        cos, sin = self.rope_cos[:n], self.rope_sin[:n]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x)).float()

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """What a draft ships and a checkpoint stores: everything but the target's embedding."""
        return {k: v.detach() for k, v in self.state_dict().items() if k != "model.embed_tokens.weight"}

    def load_own_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if k != "model.embed_tokens.weight"]:
            raise KeyError(f"draft state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def set_embedding(self, weight: torch.Tensor) -> None:
        self.model.embed_tokens.weight.data.copy_(weight)


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
