"""Engines: AR (baseline), SD (sequential speculation), SSD (Saguaro, draft in its own process)."""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..config import EngineConfig
from ..models.draft import DraftDescription
from .ar import AREngine
from .base import Engine, EngineStats
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
    draft_desc: "DraftDescription"
    draft: object | None = None  # in-process draft model (SD), loaded on first use
    numerics: dict = dataclasses.field(default_factory=dict)  # dtype choice + batch-invariance probe

    @classmethod
    def load(cls, cfg: EngineConfig, quiet: bool = False) -> "ModelPair":
        from ..models.draft import draft_description
        from ..models.loader import resolve_model
        from ..models.quantized import resolve_draft_weights
        from ..tokenizer import Tokenizer

        path = resolve_model(cfg.target)
        target, numerics = load_target(cfg, path, quiet=quiet)
        desc = draft_description(cfg.draft, path, cfg.standin_layers, numerics["dtype"], cfg.batch_invariant,
                                 resolve_draft_weights(cfg.draft_weights), cfg.activations)
        return cls(str(path), target, Tokenizer(path), desc, numerics=numerics)

    def draft_model(self):
        if self.draft is None:
            from ..models.draft import load_draft

            self.draft = load_draft(self.draft_desc)
        return self.draft


def load_target(cfg: EngineConfig, path, device: str = "cpu", quiet: bool = False):
    """The target in cfg.dtype with cfg.weights and cfg.batch_invariant, and what was chosen and
    measured: {"dtype", "dtype_reason", "weights", "weights_reason", "weights_mb", "batch_invariant",
    "invariance": self_check report}. Prints both
    (stderr) unless quiet; a failed probe is always printed."""
    from ..models.invariance import self_check
    from ..models.loader import load_model
    from ..models.precision import dtype_name, resolve_dtype
    from ..kernels import quant
    from ..models.quantized import apply_weights, resolve_weights

    dtype, why = resolve_dtype(cfg.dtype, device)
    weights, weights_why = resolve_weights(cfg.weights, path, device)
    if cfg.activations == "int8" and weights == "dense":  # nothing would take 8-bit activations
        raise ValueError(f"--activations int8 multiplies quantized weights; the target runs dense weights "
                         f"({weights_why}): use --weights gguf or int8, or --activations auto")
    model, _ = load_model(path, dtype=dtype, device=device)
    resident = apply_weights(model, weights, path, cfg.activations)
    model.invariant = cfg.batch_invariant
    rows = cfg.max_batch * (cfg.speculation.num_speculative_tokens + 1)
    report = self_check(model, rows, cfg.max_model_len) if cfg.batch_invariant else None
    kernels = quant.report()
    numerics = {"dtype": dtype_name(dtype), "dtype_reason": why, "kernels": kernels, "weights": resident["weights"],
                "weights_reason": weights_why, "weights_mb": round(resident["bytes"] / 2**20, 1),
                "batch_invariant": cfg.batch_invariant, "invariance": report}
    if report is not None and not report["invariant"]:
        print(f"ssd: WARNING: batch invariance does NOT hold on this platform ({dtype_name(dtype)}, "
              f"{torch.get_num_threads()} threads): {'; '.join(report['failures'][:3])}. Greedy speculative "
              "output may differ from AR in low-probability ties.", file=sys.stderr, flush=True)
    elif not quiet:
        inv = (f"batch-invariant kernels, probed here up to {rows} rows: invariant" if report is not None
               else "non-invariant kernels (--no-batch-invariant)")
        print(f"ssd: target {dtype_name(dtype)} ({why}), weights {resident['weights']} ({weights_why}, "
              f"{numerics['weights_mb']} MB); {inv}; {kernels}", file=sys.stderr, flush=True)
    return model, numerics


def build_engine(cfg: EngineConfig, pair: ModelPair | None = None, seed: int = 0) -> Engine:
    torch.set_num_threads(cfg.target_threads)
    pair = pair or ModelPair.load(cfg)
    eos = pair.tokenizer.eos_token_ids
    # the engine's kernels are cfg's, whatever the shared models were last used with
    pair.target.invariant = cfg.batch_invariant
    if cfg.mode == "ar":
        return AREngine(cfg, pair.target, eos)
    if cfg.mode == "sd":
        # Saguaro reshaping only helps cache hits; plain SD samples the draft as it is
        sd_cfg = cfg.replace(speculation=dataclasses.replace(cfg.speculation, saguaro_c=1.0))
        draft = pair.draft_model()
        draft.invariant = cfg.batch_invariant
        return SDEngine(sd_cfg, pair.target, draft, eos)
    desc = pair.draft_desc.with_numerics(batch_invariant=cfg.batch_invariant)
    return SSDEngine(cfg, pair.target, desc, eos, seed=seed)
