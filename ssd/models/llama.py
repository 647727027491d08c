"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2 with qkv bias, Qwen3 with QK-norm).

One implementation for inference and training. Weights are stored fused (q|k|v and gate|up) so a
layer is four matmuls; RoPE cos/sin tables are computed once and indexed by position. Two paths
run the same blocks:
  forward / hidden       over a KVCache with the batch-invariant kernels (the engines);
  forward_full           whole sequences from position 0, causal SDPA, no cache, differentiable
                         (draft training: ssd/train/draft_model.py).
Numerics follow Hugging Face transformers in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssd.kernels import quant
from ssd.kernels.attention import AttnBatch, NativePrep, attention, padded_len, rms_norm
from ssd.kernels.linear import LinearPacks, linear
from ssd.kernels.quant import NATIVE_KINDS, QuantWeight
from ssd.kv_cache import KVCache

_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling / rope_parameters when not the default rope
    max_position: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each q/k head before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias=True sets it too)
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling {kind!r}")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type", "llama")
        if mt not in _MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r} (supported: {_MODEL_TYPES})")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        rope = d.get("rope_parameters") or {}  # transformers >= 5
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or rope or None
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        heads = d["num_attention_heads"]
        bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if mt == "qwen2" else bias,
            qk_norm=mt == "qwen3",
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos,
            o_bias=bias if mt in ("llama", "qwen3") else False,
            model_type=mt)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))  # [D/2]
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, mid, scaled)
    return inv


def apply_rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate-half RoPE (as HF Llama) on the last dim; cos, sin broadcast to qk[..., :D/2]
    h = qk.shape[-1] // 2
    x1, x2 = qk[..., :h], qk[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def check_head_ids(head_ids, vocab_size: int) -> torch.Tensor:
    """A reduced head's token ids as int64, refused unless non-empty, distinct and in the vocabulary."""
    head_ids = torch.as_tensor(head_ids, dtype=torch.int64)
    if head_ids.numel() == 0 or int(head_ids.max()) >= vocab_size or int(head_ids.min()) < 0:
        raise ValueError("head ids must be non-empty and inside the vocabulary")
    if head_ids.unique().numel() != head_ids.numel():
        raise ValueError("head ids must be distinct")
    return head_ids


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, Hq, Hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        e = lambda *s: nn.Parameter(torch.empty(*s), requires_grad=False)
        self.in_norm_weight = e(H)
        self.qkv_weight = e((Hq + 2 * Hkv) * D, H)
        self.qkv_bias = e((Hq + 2 * Hkv) * D) if cfg.attention_bias else None
        self.qk_norm_weight = e(Hq + Hkv, D) if cfg.qk_norm else None
        self.o_weight = e(H, Hq * D)
        self.o_bias = e(H) if cfg.o_bias else None
        self.post_norm_weight = e(H)
        self.gate_up_weight = e(2 * inter, H)
        self.down_weight = e(H, inter)
        self.eps, self.Hq, self.Hkv, self.D, self.inter = cfg.rms_norm_eps, Hq, Hkv, D, inter
        self._native_args = None  # see native_args

    def forward(self, x, cos, sin, batch: AttnBatch, cache: KVCache, layer: int,
                packs: LinearPacks | None = None, invariant: bool = True, fused: bool = False):
        # x [B, n, H]; cos, sin [B, n, 1, D/2]
        if fused and invariant and self.fusable(x):
            return self._fused(x, cos, sin, batch, cache, layer)
        B, n, _ = x.shape
        Hq, Hkv, D = self.Hq, self.Hkv, self.D
        lin = lambda t, name, w, b=None: linear(t, w, b, packs=packs, name=f"{layer}.{name}", invariant=invariant)
        q, k, v = self._qkv(x, cos, sin, lambda h: lin(h, "qkv", self.qkv_weight, self.qkv_bias))
        k, v = cache.write_and_read(layer, k, v, batch)  # [B, Hkv, S, D]
        a = attention(q, k, v, batch, invariant=invariant).transpose(1, 2).reshape(B, n, Hq * D)
        return self._rest(x, a, lambda t, name, w, b=None: lin(t, name, w, b))

    def fusable(self, x: torch.Tensor) -> bool:
        """The whole layer can run as one native call (csrc/layer_ops.cpp: layer_forward): bf16
        activations, every weight in a quantized panel layout (bf16 or 8-bit activations), no biases,
        no QK-norm."""
        return x.dtype == torch.bfloat16 and x.is_cpu and self.native_args() is not None

    def native_args(self) -> tuple | None:
        """The weights' part of layer_forward's arguments, built once (None: not fusable). Whoever
        replaces a weight calls forget_native_args (ssd/models/quantized.py does)."""
        if self._native_args is None:
            ws = (self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight)
            ok = (self.qkv_bias is None and self.o_bias is None and self.qk_norm_weight is None and self.D % 16 == 0
                  and all(isinstance(w, QuantWeight) and w.layout in NATIVE_KINDS for w in ws) and quant.available())
            self._native_args = (([self.in_norm_weight, self.post_norm_weight], [w.data for w in ws],
                                  [NATIVE_KINDS[w.layout][w.kind] for w in ws], [self.Hq, self.Hkv, self.D, self.inter])
                                 if ok else False)
        return self._native_args or None

    def forget_native_args(self) -> None:
        self._native_args = None

    def _fused(self, x, cos, sin, batch: AttnBatch, cache: KVCache, layer: int) -> torch.Tensor:
        """The same operations as the Python path below, in one native call (bit for bit the same)."""
        if not isinstance(batch.prep, NativePrep):
            batch.prep = NativePrep(batch, x.shape[1])
        norms, panels, kinds, dims = self._native_args
        return quant.build().layer_forward(
            x.contiguous(), norms, panels, kinds, dims, cos, sin, cache.k[layer], cache.v[layer], batch.slots,
            batch.write_cols, -1 if batch.slot_start is None else batch.slot_start,
            -1 if batch.write_start is None else batch.write_start, batch.prep.mask, batch.prep.limits, batch.kv_len,
            self.eps)

    def forward_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Whole sequences from position 0 (right padding is harmless under the causal mask),
        no cache, plain differentiable ops. x [B, n, H]; cos, sin [n, 1, D/2] -> [B, n, H]"""
        B, n, _ = x.shape
        q, k, v = self._qkv(x, cos, sin, lambda h: F.linear(h, self.qkv_weight, self.qkv_bias))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, Hq, n, D]
        return self._rest(x, a.transpose(1, 2).reshape(B, n, self.Hq * self.D),
                          lambda t, name, w, b=None: F.linear(t, w, b))

    def _qkv(self, x, cos, sin, qkv_proj):
        # -> q [B, Hq, n, D], k, v [B, Hkv, n, D] (q and k rotated)
        B, n, _ = x.shape
        Hq, Hkv, D = self.Hq, self.Hkv, self.D
        h = rms_norm(x, self.in_norm_weight, self.eps)
        qkv = qkv_proj(h).view(B, n, Hq + 2 * Hkv, D)
        qk, v = qkv[:, :, :Hq + Hkv], qkv[:, :, Hq + Hkv:]  # [B, n, Hq+Hkv, D], [B, n, Hkv, D]
        if self.qk_norm_weight is not None:
            qk = F.rms_norm(qk, (D,), None, self.eps) * self.qk_norm_weight
        qk = apply_rope(qk, cos, sin)
        return qk[:, :, :Hq].transpose(1, 2), qk[:, :, Hq:].transpose(1, 2), v.transpose(1, 2)

    def _rest(self, x, a, lin):
        # attention output a [B, n, Hq*D] -> o projection, residual, MLP, residual
        x = x + lin(a, "o", self.o_weight, self.o_bias)
        h = rms_norm(x, self.post_norm_weight, self.eps)
        gu = lin(h, "gate_up", self.gate_up_weight)  # [B, n, 2*inter]
        return x + lin(F.silu(gu[..., :self.inter]) * gu[..., self.inter:], "down", self.down_weight)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm_weight = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.tie_weights()
        # batch invariance (kernels/): the same token gets the same bits in any batch shape;
        # False selects the fast non-invariant kernels (SDPA / flash-attn, F.linear)
        self.invariant = True
        self.packs = LinearPacks()  # oneDNN-packed copies of the linear weights (CPU)
        # a layer whose weights are quantized panels runs as one native call (DecoderLayer.fusable);
        # False: the same operations from Python (the tests compare the two bit for bit)
        self.fused = True
        self._native_stack = None  # native_stack
        self.register_buffer("rope_cos", None, persistent=False)  # [max_position, D/2]
        self.register_buffer("rope_sin", None, persistent=False)
        self.head_ids = None  # a reduced-vocabulary head's token ids (set_head)
        if not self.embed.weight.is_meta:  # under torch.device("meta") the loader calls init_rope
            self.init_rope()

    def native_stack(self, x: torch.Tensor) -> tuple | None:
        """layers_forward's weight arguments for every layer (csrc/layer_ops.cpp), built once; None
        unless every layer is fusable with the same dims and eps. forget_native_args resets it."""
        if self._native_stack is None:
            layers = list(self.layers)
            args = [layer.native_args() for layer in layers]
            ok = (bool(layers) and all(a is not None for a in args) and len({tuple(a[3]) for a in args}) == 1
                  and all(layer.eps == self.cfg.rms_norm_eps for layer in layers))
            self._native_stack = ((sum((a[0] for a in args), []), sum((a[1] for a in args), []),
                                   sum((a[2] for a in args), []), args[0][3]) if ok else False)
        return self._native_stack if self._native_stack and self.layers[0].fusable(x) else None

    def forget_native_args(self) -> None:
        """Call after replacing any layer's weights: the native call arguments are rebuilt."""
        self._native_stack = None
        for layer in self.layers:
            layer.forget_native_args()

    def set_head(self, weight: torch.Tensor, head_ids: torch.Tensor | None = None) -> None:
        """Install an output head. head_ids [Vh] (the reduced-vocabulary head): row i of weight
        [Vh, H] scores token head_ids[i]; the engines map head indices back to token ids and give
        q = 0 outside head_ids, so verification stays exact. None: the full vocabulary."""
        if head_ids is not None:
            head_ids = check_head_ids(head_ids, self.cfg.vocab_size)
            if weight.shape[0] != head_ids.numel():
                raise ValueError(f"head weight has {weight.shape[0]} rows for {head_ids.numel()} head ids")
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        self.lm_head.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.head_ids = head_ids

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_rope(self, device=None, dtype=None) -> None:
        # [max_position, D/2] tables computed in fp32 (as HF does) then cast to the model dtype
        device = device or self.device
        dtype = dtype or self.dtype
        freqs = torch.outer(torch.arange(self.cfg.max_position, device="cpu").float(), rope_inv_freq(self.cfg))
        self.rope_cos = freqs.cos().to(device, dtype)
        self.rope_sin = freqs.sin().to(device, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm_weight.device

    def new_cache(self, num_slots: int, max_len: int, dtype=None, device=None) -> KVCache:
        if max_len > self.cfg.max_position:
            raise ValueError(f"max_len {max_len} > max_position {self.cfg.max_position}")
        c = self.cfg
        return KVCache(c.num_layers, num_slots, c.num_kv_heads, c.head_dim, max_len,
                       dtype=dtype or self.dtype, device=device or self.device)

    @torch.no_grad()  # not inference_mode: a trainer may feed these states into autograd
    def hidden(self, input_ids: torch.Tensor, batch: AttnBatch, cache: KVCache) -> torch.Tensor:
        # input_ids [B, n] -> final-normed hidden states [B, n, H]
        return self._hidden(input_ids, batch, cache)

    def _hidden(self, input_ids: torch.Tensor, batch: AttnBatch, cache: KVCache, capture: tuple[int, ...] = (),
                seen: dict | None = None) -> torch.Tensor:
        if self.invariant:  # whole 64-column tiles straight from the cache (see kernels/attention.py)
            batch.read_len = min(padded_len(batch.kv_len), cache.k.shape[3])
        x = self.embed(input_ids)
        cos = self.rope_cos[batch.positions].unsqueeze(2)  # [B, n, 1, D/2]
        sin = self.rope_sin[batch.positions].unsqueeze(2)
        stack = self.native_stack(x) if self.fused and self.invariant else None
        if stack is not None:  # every layer in one native call (the same operations as the loop below)
            if not isinstance(batch.prep, NativePrep):
                batch.prep = NativePrep(batch, x.shape[1])
            norms, panels, kinds, dims = stack
            out = quant.build().layers_forward(
                x.contiguous(), norms, panels, kinds, dims, cos, sin, cache.k, cache.v, batch.slots, batch.write_cols,
                -1 if batch.slot_start is None else batch.slot_start,
                -1 if batch.write_start is None else batch.write_start, batch.prep.mask, batch.prep.limits,
                batch.kv_len, self.cfg.rms_norm_eps, list(capture))
            seen.update(zip(capture, out[1:]))
            return rms_norm(out[0], self.norm_weight, self.cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            if i in capture:
                seen[i] = x
            x = layer.forward(x, cos, sin, batch, cache, i, self.packs, self.invariant, self.fused)
        return rms_norm(x, self.norm_weight, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttnBatch, cache: KVCache,
                logits_rows: torch.Tensor | None = None, capture: tuple[int, ...] = ()):
        """input_ids [B, n]; logits_rows [B, m] indices into n -> logits [B, n or m, V] fp32.
        capture: layers whose inputs are also returned, concatenated in that order, for every fed
        position (what a feature drafter reads) -> (logits, features [B, n, len(capture) * H])."""
        seen: dict[int, torch.Tensor] = {}
        h = self._hidden(input_ids, batch, cache, capture, seen)
        if logits_rows is not None:
            h = h.gather(1, logits_rows[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, m, H]
        head = self.lm_head.weight
        if isinstance(head, QuantWeight) and head.layout in NATIVE_KINDS:  # fp32 logits straight from the sums
            logits = head.matmul(h, fp32_out=True)
        else:
            logits = linear(h, head, packs=self.packs, name="lm_head", invariant=self.invariant).float()
        if not capture:
            return logits
        return logits, torch.cat([seen[i] for i in capture], -1)

    def hidden_full(self, input_ids: torch.Tensor, capture: tuple[int, ...] = ()):
        """input_ids [B, n] from position 0 -> final-normed hidden states [B, n, H] (training
        path). capture: layer indices whose inputs (the residual stream entering layer i) are
        also returned, as a list [B, n, H] in the order given: -> (hidden, captured)."""
        n = input_ids.shape[1]
        cos, sin = self.rope_cos[:n, None], self.rope_sin[:n, None]  # [n, 1, D/2]
        x = self.embed(input_ids)
        seen = {}
        for i, layer in enumerate(self.layers):
            if i in capture:
                seen[i] = x
            x = layer.forward_full(x, cos, sin)
        h = F.rms_norm(x, (x.shape[-1],), self.norm_weight, self.cfg.rms_norm_eps)
        if not capture:
            return h
        return h, [seen[i] for i in capture]

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids [B, n] from position 0 -> logits [B, n, V or Vh] fp32, differentiable
        return self.lm_head(self.hidden_full(input_ids)).float()
