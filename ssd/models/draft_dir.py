"""The draft directory, as inference reads it: config.json (HF Llama config + "ssd_draft"),
model.safetensors (the draft's own weights, no embedding), README.md. The embedding is read from
the target at load. `ssd train-draft` writes it (ssd/train/draft_io.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .llama import LlamaModel, ModelConfig
from .loader import our_state_dict, read_config, read_tensor

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def is_draft_dir(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    return f.exists() and "ssd_draft" in json.loads(f.read_text())


def draft_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())["ssd_draft"]


def draft_model_config(draft_dir: Path, target_path: Path) -> ModelConfig:
    d = json.loads((draft_dir / "config.json").read_text())
    d.pop("ssd_draft")
    cfg = ModelConfig.from_hf(d)
    # stop tokens as the target defines them (its generation_config may add some)
    return ModelConfig(**{**cfg.__dict__, "eos_token_ids": read_config(target_path).eos_token_ids})


def load_draft_dir(draft_dir: str | Path, target_path: str | Path | None = None,
                   dtype=torch.float32, device="cpu") -> LlamaModel:
    """Inference LlamaModel of a trained draft with its reduced-vocabulary head
    (model.lm_head [Vh, H], model.head_ids [Vh]) and the target's embedding."""
    from ssd.models.loader import resolve_model

    draft_dir = Path(draft_dir)
    target_path = Path(target_path) if target_path is not None else resolve_model(draft_meta(draft_dir)["target"])
    cfg = draft_model_config(draft_dir, target_path)
    own = load_file(str(draft_dir / WEIGHTS))
    head_ids = own.pop("head_token_ids").long()
    embed = read_tensor(target_path, "model.embed_tokens.weight")
    if embed is None or tuple(embed.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"target {target_path} has no embedding of shape {(cfg.vocab_size, cfg.hidden_size)}")
    hf = {k: v.to(dtype) for k, v in own.items()}
    hf["model.embed_tokens.weight"] = embed.to(dtype)
    sd = our_state_dict(cfg, hf)
    head = sd.pop("lm_head.weight")  # [Vh, H]
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.load_state_dict({k: v.to(device).contiguous() for k, v in sd.items()}, strict=False, assign=True)
    model.set_head(head.to(device), head_ids)  # the reduced-vocabulary head
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"parameters missing from {draft_dir}: {missing[:5]}")
    model.init_rope(device=device, dtype=dtype)
    return model.eval()
