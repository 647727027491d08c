"""The feature drafter: a one-layer draft that reads the target's own hidden states.

EAGLE-3's recipe, in our own layout. The target's residual stream entering three of its layers
(low, middle, high: ssd/train/data.py: feature_layers) is concatenated per position into a fused
feature F_p [3H]. The draft's input at position p is its token and the feature of position p-1:

    g_{p-1} = fc(F_{p-1})                   (a "true" feature: the target has processed p-1)
            | h_{p-1}                       (a "self-fed" one: the draft's own output there)
    x_p     = in_proj([rms(emb(x_p)) * w_e ; rms(g_{p-1}) * w_g])          [2H] -> [H]
    h_p     = DecoderLayer(x_p)             (the target's block type, own weights, KV cache)
    logits  = head(rms(h_p) * w_n)          (the target's head rows of a reduced vocabulary)

Each F_i is RMS-normalised (no weight) before fc, so the three layers' very different scales
meet on equal terms. The embedding and the head rows are the target's and are never trained or
shipped; the draft directory holds fc, in_proj, the layer, the norms and the head's token ids.

Positions whose previous feature is not known yet (drafted tokens; in SSD also the tokens
being verified) are self-fed: the draft feeds its own h. Training unrolls that (training-time
test, ssd/train/feature_train.py), so proposals stay accurate several self-fed positions deep.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssd.kernels.attention import AttnBatch, padded_len
from ssd.kernels.linear import LinearPacks, linear
from ssd.kv_cache import KVCache

from .llama import DecoderLayer, ModelConfig, check_head_ids, rope_inv_freq

KIND = "feature"


class FeatureDraft(nn.Module):
    kind = KIND

    def __init__(self, cfg: ModelConfig, feature_layers: tuple[int, ...], head_ids: torch.Tensor):
        super().__init__()
        if cfg.num_layers != 1:
            raise ValueError("the feature drafter has exactly one decoder layer")
        self.cfg = cfg
        self.feature_layers = tuple(int(i) for i in feature_layers)
        H, nf = cfg.hidden_size, len(self.feature_layers)
        p = lambda *s: nn.Parameter(torch.zeros(*s))
        self.embed = nn.Embedding(cfg.vocab_size, H, _freeze=True)
        self.fc_weight = p(H, nf * H)
        self.emb_norm_weight = p(H)
        self.feat_norm_weight = p(H)
        self.in_weight = p(H, 2 * H)
        self.layers = nn.ModuleList([DecoderLayer(cfg)])
        self.norm_weight = p(H)
        head_ids = check_head_ids(head_ids, cfg.vocab_size)
        self.register_buffer("head_ids", head_ids.clone(), persistent=False)  # [Vh] token id of each head row
        self.head_weight = nn.Parameter(torch.zeros(head_ids.numel(), H), requires_grad=False)  # the target's rows
        self.invariant = True
        self.packs = LinearPacks()
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    # ---- shared pieces ------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.fc_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc_weight.device

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.cfg.hidden_size

    def init_rope(self, device=None, dtype=None) -> None:
        device, dtype = device or self.device, dtype or self.dtype
        freqs = torch.outer(torch.arange(self.cfg.max_position, device="cpu").float(), rope_inv_freq(self.cfg))
        self.rope_cos = freqs.cos().to(device, dtype)
        self.rope_sin = freqs.sin().to(device, dtype)

    def _lin(self, x, w, name):
        return linear(x, w, packs=self.packs, name=name, invariant=self.invariant) if not torch.is_grad_enabled() \
            else F.linear(x, w)

    def project(self, fused: torch.Tensor) -> torch.Tensor:
        """Target features [..., nf*H] (the captured layer inputs, concatenated) -> g [..., H]."""
        H, eps = self.cfg.hidden_size, self.cfg.rms_norm_eps
        parts = fused.to(self.dtype).unflatten(-1, (len(self.feature_layers), H))
        return self._lin(F.rms_norm(parts, (H,), None, eps).flatten(-2), self.fc_weight, "fc")

    def inputs(self, ids: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
        """ids [B, n], g_prev [B, n, H] (the feature of each position's predecessor) -> x [B, n, H]"""
        H, eps = self.cfg.hidden_size, self.cfg.rms_norm_eps
        e = F.rms_norm(self.embed(ids), (H,), self.emb_norm_weight, eps)
        g = F.rms_norm(g_prev.to(e.dtype), (H,), self.feat_norm_weight, eps)
        return self._lin(torch.cat([e, g], -1), self.in_weight, "in")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Layer outputs h [..., H] -> logits over the head [..., Vh] fp32."""
        h = F.rms_norm(h, (h.shape[-1],), self.norm_weight, self.cfg.rms_norm_eps)
        return self._lin(h, self.head_weight, "head").float()

    # ---- inference: over a KV cache (the engines) ------------------------------------------------
    def new_cache(self, num_slots: int, max_len: int, dtype=None, device=None) -> KVCache:
        if max_len > self.cfg.max_position:
            raise ValueError(f"max_len {max_len} > max_position {self.cfg.max_position}")
        c = self.cfg
        return KVCache(1, num_slots, c.num_kv_heads, c.head_dim, max_len, dtype=dtype or self.dtype,
                       device=device or self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, g_prev: torch.Tensor, batch: AttnBatch, cache: KVCache,
                logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, n], g_prev [B, n, H] -> (logits [B, n or m, Vh] fp32, h [B, n, H]): h is
        what a later position reads as its self-fed feature."""
        if self.invariant:
            batch.read_len = min(padded_len(batch.kv_len), cache.k.shape[3])
        x = self.inputs(input_ids, g_prev)
        cos = self.rope_cos[batch.positions].unsqueeze(2)
        sin = self.rope_sin[batch.positions].unsqueeze(2)
        h = self.layers[0].forward(x, cos, sin, batch, cache, 0, self.packs, self.invariant)
        hr = h if logits_rows is None else h.gather(1, logits_rows[:, :, None].expand(-1, -1, h.shape[-1]))
        return self.logits(hr), h

    # ---- the directory format ---------------------------------------------------------------------
    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """What a draft directory ships: everything but the target's embedding and head rows."""
        skip = ("embed.weight", "head_weight")
        sd = {k: v.detach() for k, v in self.state_dict().items() if k not in skip}
        sd["head_token_ids"] = self.head_ids.clone()
        return sd

    def load_own_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        ids = sd.pop("head_token_ids", None)
        if ids is None or not torch.equal(ids.long().cpu(), self.head_ids.cpu()):
            raise KeyError("feature draft state mismatch: head_token_ids missing or different")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in ("embed.weight", "head_weight")]
        if missing or unexpected:
            raise KeyError(f"feature draft state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def attach_target(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """The target's embedding [V, H] and its full head [V, H] (the rows of head_ids are kept)."""
        self.embed.weight.data = embed.to(self.device, self.dtype).contiguous()
        self.head_weight.data = head[self.head_ids.to(head.device)].to(self.device, self.dtype).contiguous()


def feature_config(target_cfg_json: dict) -> dict:
    """The drafter's HF-style config: the target's, one layer, untied."""
    d = {**target_cfg_json, "num_hidden_layers": 1, "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
    for k in ("_name_or_path", "_model_name_or_path", "quantization_config", "ssd_draft"):
        d.pop(k, None)
    return d


def is_feature_dir(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    return f.exists() and json.loads(f.read_text()).get("ssd_draft", {}).get("kind") == KIND


def target_embed_and_head(target_path) -> tuple[torch.Tensor, torch.Tensor]:
    from .loader import read_config, read_tensor

    tcfg = read_config(target_path)
    embed = read_tensor(target_path, "model.embed_tokens.weight")
    head = read_tensor(target_path, "lm_head.weight")
    return embed, (embed if head is None or tcfg.tie_word_embeddings else head)


def load_feature_dir(draft_dir: str | Path, target_path, dtype=torch.float32, device="cpu") -> FeatureDraft:
    from safetensors.torch import load_file

    from .loader import read_config

    draft_dir = Path(draft_dir)
    d = json.loads((draft_dir / "config.json").read_text())
    meta = d.pop("ssd_draft")
    cfg = ModelConfig.from_hf(d)
    cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": read_config(target_path).eos_token_ids})
    own = load_file(str(draft_dir / "model.safetensors"))
    model = FeatureDraft(cfg, tuple(meta["feature_layers"]), own["head_token_ids"].long())
    model.load_own_state_dict({k: (v if k == "head_token_ids" else v.float()) for k, v in own.items()})
    embed, head = target_embed_and_head(target_path)
    if tuple(embed.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"target {target_path} has no embedding of shape {(cfg.vocab_size, cfg.hidden_size)}")
    model = model.to(device=device, dtype=dtype)
    model.attach_target(embed, head)
    model.init_rope(device=device, dtype=dtype)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()
