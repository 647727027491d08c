"""Which draft model a run uses.

A draft spec is a small dict so it can cross a process boundary:
  {"path": <HF dir>}                                   a real draft model
  {"path": <target HF dir>, "standin_layers": N}        the stand-in: the target's first N layers
                                                        with its final norm and LM head.
The stand-in exists only until a trained draft ships (issue 3). It is WEAK: a layer-truncated
SmolLM2 agrees with the full model on few top-1 tokens (ENVIRONMENT.md: 6-44 % for 8-26 of 30
layers), and every report names it as a stand-in.
"""
from __future__ import annotations

import dataclasses

import torch

from .loader import load_model, resolve_model

STANDIN = "standin"


def draft_spec(draft: str, target_path, standin_layers: int) -> dict:
    if draft == STANDIN:
        return {"path": str(target_path), "standin_layers": standin_layers}
    return {"path": str(resolve_model(draft))}


def describe(spec: dict) -> str:
    if "standin_layers" in spec:
        return f"stand-in draft (target truncated to its first {spec['standin_layers']} layers; weak, not trained)"
    return f"draft {spec['path']}"


def load_draft(spec: dict, dtype=torch.float32, device="cpu"):
    model, cfg = load_model(spec["path"], dtype=dtype, device=device)
    n = spec.get("standin_layers")
    if n is not None:
        if not 1 <= n <= cfg.num_layers:
            raise ValueError(f"standin_layers must be in [1, {cfg.num_layers}]")
        model.layers = model.layers[:n]
        model.cfg = dataclasses.replace(cfg, num_layers=n)
    return model
