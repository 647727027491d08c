"""Writing a draft directory (the format: ssd/models/draft_dir.py) and loading one for more
training."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ssd.models.draft_dir import FORMAT_VERSION, WEIGHTS, draft_model_config
from ssd.models.loader import read_tensor
from ssd.train.draft_model import DraftModel, draft_config

SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --save-dtype


def save_draft(out_dir: str | Path, model: DraftModel, target_path: str | Path, target_ref: str,
               dtype: torch.dtype = torch.float16, readme: str | None = None) -> Path:
    """Write config.json and model.safetensors (and README.md when given) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = draft_config(target_path, model.cfg.num_layers)
    cfg["ssd_draft"] = {"target": str(target_ref), "head_vocab_size": int(model.head_token_ids.numel()),
                        "embed_from_target": True, "version": FORMAT_VERSION}
    write_draft_dir(out, cfg, model.own_state_dict(), dtype)
    if readme is not None:
        (out / "README.md").write_text(readme)
    return out


def write_draft_dir(out: Path, cfg: dict, own_state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """config.json (with the weights' dtype) and model.safetensors (written atomically; the head's
    token ids stay int64), for any kind of draft."""
    cfg = {**cfg, "dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sd = {k: (v if k == "head_token_ids" else v.to(dtype)).contiguous().clone() for k, v in own_state.items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    (out / WEIGHTS).chmod(0o644)  # shared like any model directory


def load_trainable(draft_dir: str | Path, target_path: str | Path) -> DraftModel:
    """The training module of a saved draft (weights upcast to fp32)."""
    draft_dir = Path(draft_dir)
    cfg = draft_model_config(draft_dir, Path(target_path))
    own = load_file(str(draft_dir / WEIGHTS))
    model = DraftModel(cfg, own["head_token_ids"])
    model.load_own_state_dict({k: v if k == "head_token_ids" else v.float() for k, v in own.items()})
    model.set_embedding(read_tensor(target_path, "model.embed_tokens.weight").float())
    return model
