"""Every benchmark of the project, in one place. Each prints side-by-side ratios from one run on
one machine and writes JSON + PNG:

- `engines`  (`ssd bench`): AR vs SD vs SSD on one pair, plus AR on plain kernels and on every
  core, Hugging Face `generate` / assisted generation in the same dtype, and llama.cpp on the
  target's own GGUF file (`llamacpp`, where llama-cpp-python is installed);
- `serving`  (`ssd bench --serve`): AR, SD and SSD through the running services under 1..N
  concurrent streaming clients: throughput, TTFT, inter-token latency, cache hits, backup use;
- `numerics` (`ssd bench --numerics`): fp32 vs bf16, batch-invariant vs plain kernels;
- `services` (`python -m ssd.benchmarks.services`): the three gRPC services vs the in-process
  engine, with and without tracing;
- `channel`  (`python -m ssd.benchmarks.channel`): q-row transfer, inline gRPC bytes vs the
  tensor channel;
- `control`  (`python -m ssd.benchmarks.control`): the round protocol's control overhead.

`engines` and `numerics` import no network library; the others import `ssd.services`
(`serving` only when it runs).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What `ssd bench` is asked beyond the engine and sampling settings (ssd/config.py): the
    prompts, the systems and repeats, where the results go; with --serve the levels and kinds."""

    prompts: str | None = None  # a JSONL file or "sharegpt-heldout"; None: the built-in set
    num_prompts: int = 0  # the first N prompts (0: all)
    modes: str = "ar,sd,ssd"
    repeats: int = 1
    out: str = "bench-results"
    no_hf: bool = False
    no_llama_cpp: bool = False
    json: bool = False  # print the result JSON
    concurrency: str = "1,2,4,8,16"  # --serve: clients per level
    sampling: str = "greedy,sampled,seeded"  # --serve: the kinds of request
    seed: int | None = None  # --serve: request i of a seeded cell gets seed + i
    command_line: str | None = None  # recorded in the result

    @classmethod
    def from_args(cls, ns) -> "BenchOptions":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def paired_ratio(mine: list[float], base: list[float], what: str = "") -> tuple[float, list[float]]:
    """A system's speed over a baseline's, repeat by repeat (both ran in the same stretch of
    machine time): (median, [lowest, highest]) of the per-repeat ratios."""
    if len(mine) != len(base):
        raise ValueError(f"{what}: {len(mine)} repeats against {len(base)} of the baseline")
    xs = [x / y for x, y in zip(mine, base)]
    return statistics.median(xs), [min(xs), max(xs)]


def repeat_error_bars(centers: list[float], repeats: list[list[float]]):
    """matplotlib yerr spanning each bar's lowest to highest repeat; None with a single repeat."""
    if max(len(x) for x in repeats) <= 1:
        return None
    return [[c - min(x) for c, x in zip(centers, repeats)], [max(x) - c for c, x in zip(centers, repeats)]]


def save_results(out_dir, stem: str, result: dict, plot) -> tuple[Path, Path]:
    """Write <out_dir>/<stem>.json and draw <out_dir>/<stem>.png with plot(result, path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{stem}.json", out / f"{stem}.png"
    js.write_text(json.dumps(result, indent=1, default=str))
    plot(result, str(png))
    return js, png
