"""Every benchmark of the project, in one place. Each prints side-by-side ratios from one run on
one machine and writes JSON + PNG:

- `engines`  (`ssd bench`): AR vs SD vs SSD on one pair, plus plain-kernel AR and Hugging Face;
- `numerics` (`ssd bench --numerics`): fp32 vs bf16, batch-invariant vs plain kernels;
- `services` (`python -m ssd.benchmarks.services`): the three gRPC services vs the in-process
  engine, with and without tracing;
- `channel`  (`python -m ssd.benchmarks.channel`): q-row transfer, inline gRPC bytes vs the
  tensor channel;
- `control`  (`python -m ssd.benchmarks.control`): the round protocol's control overhead.

`engines` and `numerics` import no network library; the others import `ssd.services`.
"""
from __future__ import annotations

import json
from pathlib import Path


def save_results(out_dir, stem: str, result: dict, plot) -> tuple[Path, Path]:
    """Write <out_dir>/<stem>.json and draw <out_dir>/<stem>.png with plot(result, path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{stem}.json", out / f"{stem}.png"
    js.write_text(json.dumps(result, indent=1, default=str))
    plot(result, str(png))
    return js, png
