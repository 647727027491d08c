"""Which draft model a run uses: a DraftDescription, small and picklable so it crosses process
boundaries (the local draft process, the draft service's own process).

  DraftDescription(path=<HF dir>)                          a real draft model (or a trained draft
                                                           directory, whose embedding comes from
                                                           target_path)
  DraftDescription(path=<target dir>, standin_layers=N)    the stand-in: the target's first N layers
                                                           with its final norm and LM head
plus the numerics it runs with (dtype, batch_invariant), the same wherever it is loaded.
The stand-in predates the trained default draft and is kept as a baseline. It is WEAK: a
layer-truncated SmolLM2 agrees with the full model on few top-1 tokens (measured: 6-44 % for
8-26 of 30 layers), and every report names it as a stand-in.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .llama import LlamaModel, check_head_ids
from .loader import default_target_path, load_model, resolve_model

STANDIN = "standin"
DEFAULT = "default"
FEATURE = "feature"
# the draft shipped for the default target, trained here with `ssd train-draft` (see its README.md)
DEFAULT_DRAFT_DIR = Path(__file__).resolve().parent.parent / "data" / "drafts" / "smollm2-135m-draft-l2"
# the feature drafter shipped for the default target (--draft feature): one layer over the
# target's hidden states, trained with training-time test (its README.md)
FEATURE_DRAFT_DIR = Path(__file__).resolve().parent.parent / "data" / "drafts" / "smollm2-135m-feature-l1"


STANDIN_HEAD_VOCAB = 8192  # BPE ids are roughly in merge (frequency) order: ids < 8192 cover ~94 % of SmolLM2's output tokens


@dataclass(frozen=True)
class DraftDescription:
    path: str
    target_path: str | None = None  # a trained draft directory reads its embedding from its target
    standin_layers: int | None = None  # the stand-in: keep the target's first N layers
    head_vocab: int | None = None  # the stand-in's reduced head: token ids < head_vocab
    dtype: str = "float32"  # bfloat16 | float32, resolved (never "auto")
    batch_invariant: bool = True
    weights: str = "dense"  # int8 | dense, resolved (ssd/models/quantized.py: resolve_draft_weights)
    activations: str = "auto"  # what int8 weights multiply: auto | int8 | bf16 (kernels/quant.py: choose_layout)

    def with_numerics(self, dtype: str | None = None, batch_invariant: bool | None = None) -> "DraftDescription":
        return dataclasses.replace(self, dtype=dtype or self.dtype,
                                   batch_invariant=self.batch_invariant if batch_invariant is None else bool(batch_invariant))

    def describe(self) -> str:
        exact = "" if self.batch_invariant else ", non-invariant kernels"
        acts = "" if self.activations == "auto" else f", {self.activations} activations"
        weights = f", int8 weights{acts}" if self.weights == "int8" else ""
        return f"{self._model()} [{self.dtype}{weights}{exact}]"

    def _model(self) -> str:
        if self.standin_layers is not None:
            head = f", {self.head_vocab}-token head" if self.head_vocab else ""
            return f"stand-in draft (target truncated to its first {self.standin_layers} layers{head}; weak, not trained)"
        cfg_file = Path(self.path) / "config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text())
            meta = cfg.get("ssd_draft")
            if meta and meta.get("kind") == "feature":
                return (f"feature drafter {Path(self.path).name} (1 layer over target layers {meta['feature_layers']}, "
                        f"{meta['head_vocab_size']}-token head, distilled from {Path(str(meta['target'])).name})")
            if meta:
                return (f"trained draft {Path(self.path).name} ({cfg['num_hidden_layers']} layers, "
                        f"{meta['head_vocab_size']}-token head, distilled from {Path(str(meta['target'])).name})")
        return f"draft {self.path}"


def draft_description(draft: str, target_path, standin_layers: int, dtype: str = "float32",
                      batch_invariant: bool = True, weights: str = "dense",
                      activations: str = "auto") -> DraftDescription:
    """--draft (default | standin | a directory) for a target. dtype: a resolved dtype name
    (bfloat16 | float32), weights a resolved one (int8 | dense), activations what int8 weights
    multiply (--activations); the draft runs with them wherever it is loaded."""
    if draft == STANDIN:
        return DraftDescription(str(target_path), standin_layers=standin_layers, head_vocab=STANDIN_HEAD_VOCAB,
                                dtype=dtype, batch_invariant=batch_invariant, weights=weights, activations=activations)
    if draft in (DEFAULT, FEATURE):
        if Path(target_path).resolve() != default_target_path(progress=False).resolve():
            raise ValueError(f"there is no shipped {draft} draft for this target: pass --draft DIR "
                             "(e.g. one made by `ssd train-draft`) or --draft standin")
        path = DEFAULT_DRAFT_DIR if draft == DEFAULT else FEATURE_DRAFT_DIR
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the shipped {draft} draft is missing: {path}")
    else:
        path = resolve_model(draft)
    return DraftDescription(str(path), str(target_path), dtype=dtype, batch_invariant=batch_invariant,
                            weights=weights, activations=activations)


def describe(d: DraftDescription) -> str:
    return d.describe()


def restrict_head(model, head_ids: torch.Tensor) -> None:
    """Reduced-vocabulary output head: the draft scores only head_ids (target id space), with
    the rows its full head gives them. Tokens outside get q = 0 and are never proposed."""
    head_ids = check_head_ids(head_ids, model.cfg.vocab_size)
    model.set_head(model.lm_head.weight.detach()[head_ids].clone(), head_ids)


def load_draft(d: DraftDescription, dtype=None, device="cpu"):
    """The draft model of a description, in its dtype unless dtype overrides it."""
    model = _load_draft(d, dtype or getattr(torch, d.dtype), device)
    model.invariant = d.batch_invariant
    if d.weights == "int8" and isinstance(model, LlamaModel):  # a feature drafter keeps dense weights
        from .quantized import apply_weights

        apply_weights(model, "int8", activations=d.activations)
    return model


def _load_draft(d: DraftDescription, dtype, device):
    from .draft_dir import is_draft_dir, load_draft_dir

    from .feature_draft import is_feature_dir, load_feature_dir

    if is_feature_dir(d.path):  # a feature drafter: embedding and head rows from its target
        if d.target_path is None:
            raise ValueError(f"{d.path} is a feature drafter: it needs its target's directory")
        return load_feature_dir(d.path, d.target_path, dtype=dtype, device=device)
    if is_draft_dir(d.path):  # a trained draft (ssd train-draft): the embedding comes from its target
        return load_draft_dir(d.path, d.target_path, dtype=dtype, device=device)
    model, cfg = load_model(d.path, dtype=dtype, device=device)
    n = d.standin_layers
    if n is not None:
        if not 1 <= n <= cfg.num_layers:
            raise ValueError(f"standin_layers must be in [1, {cfg.num_layers}]")
        model.layers = model.layers[:n]
        model.cfg = dataclasses.replace(cfg, num_layers=n)
    if d.head_vocab:
        restrict_head(model, torch.arange(min(int(d.head_vocab), model.cfg.vocab_size)))
    return model
