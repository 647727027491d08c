"""Engines: AR (baseline), SD (sequential speculation), SSD (Saguaro, draft in its own process)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import EngineConfig
from .base import AREngine, Engine, EngineStats
from .sd import SDEngine
from .sequence import Sequence
from .ssd_engine import SSDEngine

__all__ = ["AREngine", "SDEngine", "SSDEngine", "Engine", "EngineStats", "Sequence", "build_engine", "ModelPair"]


@dataclasses.dataclass
class ModelPair:
    """Loaded once, shared by engines of several modes in one process (bench)."""

    target_path: str
    target: object
    tokenizer: object
    draft_spec: dict
    draft: object | None = None  # in-process draft model (SD), loaded on first use

    @classmethod
    def load(cls, cfg: EngineConfig) -> "ModelPair":
        from ..models.draft import draft_spec
        from ..models.loader import load_model, resolve_model
        from ..tokenizer import Tokenizer

        path = resolve_model(cfg.target)
        target, _ = load_model(path)
        return cls(str(path), target, Tokenizer(path), draft_spec(cfg.draft, path, cfg.standin_layers))

    def draft_model(self):
        if self.draft is None:
            from ..models.draft import load_draft

            self.draft = load_draft(self.draft_spec)
        return self.draft


def build_engine(cfg: EngineConfig, pair: ModelPair | None = None, seed: int = 0) -> Engine:
    torch.set_num_threads(cfg.target_threads)
    pair = pair or ModelPair.load(cfg)
    eos = pair.tokenizer.eos_token_ids
    if cfg.mode == "ar":
        return AREngine(cfg, pair.target, eos)
    if cfg.mode == "sd":
        # Saguaro reshaping only helps cache hits; plain SD samples the draft as it is
        sd_cfg = cfg.replace(spec=dataclasses.replace(cfg.spec, saguaro_c=1.0))
        return SDEngine(sd_cfg, pair.target, pair.draft_model(), eos)
    return SSDEngine(cfg, pair.target, pair.draft_spec, eos, seed=seed)
