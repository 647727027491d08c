"""llama.cpp on the very GGUF file the default target is converted from: the CPU baseline a
skeptic runs first. Optional: `llama-cpp-python` builds llama.cpp from source when installed
(several minutes; docs/benchmarks.md gives the command), so the bench reports the row as
skipped, with the reason, where it is missing.

The same prompt token ids, the same number of new tokens, the same sampling settings and stop
tokens as our engines; timed as they are, from the first prompt token in to the last token out
(prefill included), on the target's thread count and on every core. llama.cpp computes in its
own 4-bit blocks where ssd runs the same weights de-quantized to bf16/fp32, so its greedy
output need not equal ours: the report gives how many leading tokens agree.

llama.cpp runs in a child process of its own (one per thread count, for the whole bench): a
native crash there (a build whose CPU features the machine does not grant, say) becomes a
reported skip, not the end of the bench and its other rows.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm


def gguf_of(target: str, target_path: str | Path) -> tuple[Path | None, str]:
    """The GGUF file of the target -> (path, "") or (None, why not)."""
    from ..models.loader import DEFAULT_TARGET, default_gguf_path

    if target in ("default", DEFAULT_TARGET):
        return default_gguf_path(), ""
    found = sorted(Path(target_path).glob("*.gguf"))
    return (found[0], "") if found else (None, f"no .gguf file in {target_path}")


def available() -> str:
    """"" when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); docs/benchmarks.md says how to build it"
    return ""


def sampling_kwargs(params) -> dict:
    """Our sampling settings in llama.cpp's names."""
    if params.greedy:
        return {"temp": 0.0, "repeat_penalty": 1.0}
    # llama.cpp's top_k <= 0 is the whole vocabulary, as our top_k = 0; min_p off as ours
    return {"temp": params.temperature, "top_k": params.top_k or 0, "top_p": params.top_p, "min_p": 0.0,
            "repeat_penalty": 1.0}


_LLM = {}  # the child's one model instance: (gguf, threads) -> Llama


def generate_pass(gguf: str, threads: int, n_ctx: int, seed: int, prompts: list[list[int]], max_tokens: int,
                  eos: set, kw: dict, label: str) -> tuple[int, float, list]:
    """llama.cpp's generation loop over every prompt -> (new tokens, seconds, outputs). The model is
    loaded on first use and kept (llama.cpp fixes its threads when a context is made)."""
    from llama_cpp import Llama

    llm = _LLM.get((gguf, threads))
    if llm is None:
        llm = _LLM[(gguf, threads)] = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                             n_batch=512, seed=seed, verbose=False)
    tokens, wall, outs = 0, 0.0, []
    for ids in tqdm(prompts, desc=f"{label:>13}", leave=False):
        out = []
        t0 = time.perf_counter()
        for tok in llm.generate(ids, reset=True, **kw):
            out.append(int(tok))
            if tok in eos or len(out) >= max_tokens:
                break
        wall += time.perf_counter() - t0
        tokens += len(out)
        outs.append(out)
    return tokens, wall, outs


class LlamaCppReference:
    """llama.cpp's own generation loop over the prompts, on `threads` and on `all_cores` threads.
    isolate=False runs it in this process (tests, with a stand-in for llama-cpp-python)."""

    def __init__(self, gguf: Path, prompt_ids: list[list[int]], params, eos_ids, threads: int, all_cores: int,
                 label_of, isolate: bool = True):
        self.n_ctx = max(map(len, prompt_ids)) + params.max_tokens + 16
        self.prompt_ids, self.params, self.eos = prompt_ids, params, set(eos_ids)
        self.gguf, self.all_cores, self.isolate = str(gguf), all_cores, isolate
        counts = [("llama.cpp", threads)] + ([("llama.cpp-all", all_cores)] if all_cores != threads else [])
        self.systems = [(name, n, label_of(name, n)) for name, n in counts]
        self.pools = {name: ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) if isolate else None
                      for name, _ in counts}
        self.failed: str | None = None  # why llama.cpp stopped (a crash in its process)

    def _pass(self, name: str, n: int, label: str, max_tokens: int, prompts) -> tuple[int, float, list]:
        args = (self.gguf, n, self.n_ctx, self.params.seed or 0, prompts, max_tokens, self.eos,
                sampling_kwargs(self.params), label)
        if self.pools[name] is None:
            return generate_pass(*args)
        return self.pools[name].submit(generate_pass, *args).result()

    def run(self, first: bool) -> dict:
        """One timed pass of each thread count -> {name: result}; the first call warms each up
        (8 tokens of the first prompt) and makes one untimed pass on a count other than the
        target's, as the engine rows do. After a crash of llama.cpp: {} (self.failed says why)."""
        out = {}
        if self.failed:
            return out
        try:
            for name, n, label in self.systems:
                load = os.getloadavg()[0]
                first_pass = None
                if first:
                    self._pass(name, n, name + " warm-up", 8, self.prompt_ids[:1])
                    if name != "llama.cpp":
                        t, w, _ = self._pass(name, n, name + " (untimed)", self.params.max_tokens, self.prompt_ids)
                        first_pass = t / w
                tokens, wall, outs = self._pass(name, n, name, self.params.max_tokens, self.prompt_ids)
                out[name] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "outputs": outs,
                             "threads": n, "load_avg_1m_at_start": load, "dtype": "GGUF blocks", "gguf": self.gguf,
                             "label": label}
                if first_pass is not None:
                    out[name]["first_pass_tokens_per_s"] = first_pass
                print(f"{label}: {tokens / wall:7.2f} tok/s", flush=True)
        except BrokenProcessPool:
            self.failed = "llama.cpp's process crashed (a native fault in llama-cpp-python; see docs/benchmarks.md)"
            print(f"llama.cpp reference stopped: {self.failed}", flush=True)
            self.close()
            return {}
        return out

    def close(self) -> None:
        for pool in self.pools.values():
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def agreeing_prefix(outs: list[list[int]], ours: list[list[int]]) -> float:
    """Mean number of leading tokens a reference's outputs share with ours, per prompt."""
    def common(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n
    return sum(common(a, b) for a, b in zip(outs, ours)) / max(len(ours), 1)
