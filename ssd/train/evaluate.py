"""Evaluate a draft directory (standalone or feature drafter) on held-out `ssd make-data` shards:
top-1 agreement with the target, KL over the draft's head, and the offline n-alpha acceptance curve.

    python -m ssd.train.evaluate DRAFT_DIR [--data DIR] [--positions 256] [--target default]

DIR defaults to the held-out ShareGPT shards of the default target in the cache directory.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def evaluate_draft_dir(draft_dir: str | Path, target_path: str | Path, data_dir: str | Path, positions: int = 256,
                       seq_len: int = 512) -> dict:
    from ssd.models.loader import read_config
    from ssd.train.data import DataDir, load_shards
    from ssd.train.distill import acceptance_curve, evaluate, examples_from_shards
    from ssd.train.draft_io import load_trainable

    from ssd.models.feature_draft import is_feature_dir

    m = DataDir(data_dir).manifest()
    if m is None or m["key"]["split"] != "heldout":
        raise ValueError(f"{data_dir} holds no held-out `ssd make-data` shards")
    if is_feature_dir(draft_dir):
        return _evaluate_feature_dir(draft_dir, target_path, data_dir, m, positions, seq_len)
    draft = load_trainable(draft_dir, target_path)
    ex = examples_from_shards(load_shards(data_dir), draft.head_token_ids, read_config(target_path).vocab_size, seq_len)
    out = {"draft": str(draft_dir), "data": str(data_dir), "sequences": len(ex)}
    out.update(evaluate(draft, ex))
    out["acceptance_curve"] = acceptance_curve(draft, ex, positions=positions)
    return out


def _evaluate_feature_dir(draft_dir, target_path, data_dir, manifest: dict, positions: int, seq_len: int) -> dict:
    """A feature drafter: agreement at self-fed depth 0..7 and the n-alpha curves with 0 and 5
    self-fed context positions (SD's case, and SSD's at K = 4)."""
    from ssd.models.feature_draft import load_feature_dir
    from ssd.models.loader import read_config
    from ssd.train.data import load_shards
    from ssd.train.distill import examples_from_shards
    from ssd.train.feature_train import evaluate_feature, feature_acceptance_curve

    if not manifest.get("feature_layers"):
        raise ValueError(f"{data_dir} was made without --features; a feature drafter needs them")
    draft = load_feature_dir(draft_dir, target_path)
    draft.invariant = False
    ex = examples_from_shards(load_shards(data_dir), draft.head_ids, read_config(target_path).vocab_size, seq_len,
                              with_features=True)
    out = {"draft": str(draft_dir), "data": str(data_dir), "sequences": len(ex)}
    out.update(evaluate_feature(draft, ex))
    out["acceptance_curve"] = feature_acceptance_curve(draft, ex, positions=positions)
    out["acceptance_curve_ssd"] = feature_acceptance_curve(draft, ex, positions=positions, prefix_selffed=5)
    return out


def main(argv=None) -> int:
    from ssd.models.loader import DEFAULT_TARGET, resolve_model
    from ssd.train.data import default_out

    ap = argparse.ArgumentParser(prog="python -m ssd.train.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("draft")
    ap.add_argument("--target", default="default")
    ap.add_argument("--data", default="")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    target = resolve_model(ns.target)
    data = ns.data or default_out(DEFAULT_TARGET if ns.target == "default" else target.name, "heldout")
    print(json.dumps(evaluate_draft_dir(ns.draft, target, data, ns.positions), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
