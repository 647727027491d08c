"""Which draft model a run uses.

A draft spec is a small dict so it can cross a process boundary:
  {"path": <HF dir>}                                   a real draft model
  {"path": <target HF dir>, "standin_layers": N}        the stand-in: the target's first N layers
                                                        with its final norm and LM head.
plus "dtype" (bfloat16 | float32) and "batch_invariant" (which kernels), so the draft runs with
the same numerics wherever it is loaded.
The stand-in predates the trained default draft and is kept as a baseline. It is WEAK: a
layer-truncated SmolLM2 agrees with the full model on few top-1 tokens (measured: 6-44 % for
8-26 of 30 layers), and every report names it as a stand-in.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .loader import default_target_path, load_model, resolve_model

STANDIN = "standin"
DEFAULT = "default"
# the draft shipped for the default target, trained here with `ssd train-draft` (see its README.md)
DEFAULT_DRAFT_DIR = Path(__file__).resolve().parent.parent / "data" / "drafts" / "smollm2-135m-draft-l2"


STANDIN_HEAD_VOCAB = 8192  # BPE ids are roughly in merge (frequency) order: ids < 8192 cover ~94 % of SmolLM2's output tokens


def draft_spec(draft: str, target_path, standin_layers: int, dtype: str = "float32",
               batch_invariant: bool = True) -> dict:
    """dtype: a resolved dtype name (bfloat16 | float32); the draft runs in it wherever it is loaded."""
    spec = _draft_location(draft, target_path, standin_layers)
    spec.update(dtype=dtype, batch_invariant=bool(batch_invariant))
    return spec


def _draft_location(draft: str, target_path, standin_layers: int) -> dict:
    if draft == STANDIN:
        return {"path": str(target_path), "standin_layers": standin_layers, "head_vocab": STANDIN_HEAD_VOCAB}
    if draft == DEFAULT:
        if Path(target_path).resolve() != default_target_path(progress=False).resolve():
            raise ValueError("there is no default draft for this target: pass --draft DIR "
                             "(e.g. one made by `ssd train-draft`) or --draft standin")
        if not (DEFAULT_DRAFT_DIR / "config.json").exists():
            raise FileNotFoundError(f"the shipped default draft is missing: {DEFAULT_DRAFT_DIR}")
        return {"path": str(DEFAULT_DRAFT_DIR), "target_path": str(target_path)}
    return {"path": str(resolve_model(draft)), "target_path": str(target_path)}


def describe(spec: dict) -> str:
    dtype = spec.get("dtype", "float32")
    exact = "" if spec.get("batch_invariant", True) else ", non-invariant kernels"
    return f"{_describe_model(spec)} [{dtype}{exact}]"


def _describe_model(spec: dict) -> str:
    if "standin_layers" in spec:
        head = f", {spec['head_vocab']}-token head" if spec.get("head_vocab") else ""
        return f"stand-in draft (target truncated to its first {spec['standin_layers']} layers{head}; weak, not trained)"
    cfg_file = Path(spec["path"]) / "config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        meta = cfg.get("ssd_draft")
        if meta:
            return (f"trained draft {Path(spec['path']).name} ({cfg['num_hidden_layers']} layers, "
                    f"{meta['head_vocab_size']}-token head, distilled from {Path(str(meta['target'])).name})")
    return f"draft {spec['path']}"


def restrict_head(model, head_ids: torch.Tensor) -> None:
    """Reduced-vocabulary output head: the draft scores only head_ids (target id space).
    Tokens outside get q = 0 and are never proposed, so verification stays exact."""
    head_ids = torch.as_tensor(head_ids, dtype=torch.int64)
    if head_ids.numel() == 0 or int(head_ids.max()) >= model.cfg.vocab_size or int(head_ids.min()) < 0:
        raise ValueError("head ids must be non-empty and inside the vocabulary")
    if head_ids.unique().numel() != head_ids.numel():
        raise ValueError("head ids must be distinct")
    weight = model.lm_head.weight.detach()[head_ids].clone()  # [Vh, H]
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.head_ids = head_ids


def load_draft(spec: dict, dtype=None, device="cpu"):
    """The draft model of a spec, in the spec's dtype unless dtype overrides it."""
    model = _load_draft(spec, dtype or getattr(torch, spec.get("dtype", "float32")), device)
    model.invariant = bool(spec.get("batch_invariant", True))
    return model


def _load_draft(spec: dict, dtype, device):
    from .draft_dir import is_draft_dir, load_draft_dir

    if is_draft_dir(spec["path"]):  # a trained draft (ssd train-draft): the embedding comes from its target
        return load_draft_dir(spec["path"], spec.get("target_path"), dtype=dtype, device=device)
    model, cfg = load_model(spec["path"], dtype=dtype, device=device)
    n = spec.get("standin_layers")
    if n is not None:
        if not 1 <= n <= cfg.num_layers:
            raise ValueError(f"standin_layers must be in [1, {cfg.num_layers}]")
        model.layers = model.layers[:n]
        model.cfg = dataclasses.replace(cfg, num_layers=n)
    if spec.get("head_vocab"):
        restrict_head(model, torch.arange(min(int(spec["head_vocab"]), model.cfg.vocab_size)))
    return model
