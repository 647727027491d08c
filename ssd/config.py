"""One source of truth for run-time configuration.

Frozen dataclasses that validate themselves; the CLI derives its flags from these fields so
defaults cannot drift between the library and the command line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum


class Mode(str, Enum):
    """How a request is decoded: plain autoregressive, speculative (draft then verify), or
    speculative speculative (Saguaro). A str, so "ar" == Mode.AR and JSON/proto carry the value."""

    AR = "ar"
    SD = "sd"
    SSD = "ssd"

    def __str__(self) -> str:
        return self.value


MODES = tuple(m.value for m in Mode)
FANOUT_KINDS = ("geometric", "uniform")
DTYPES = ("auto", "bfloat16", "float32")
WEIGHTS = ("auto", "gguf", "int8", "dense")  # ssd/models/quantized.py
DRAFT_WEIGHTS = ("auto", "int8", "dense")
ACTIVATIONS = ("auto", "int8", "bf16")  # kernels/quant.py: choose_layout


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy; below GREEDY_BELOW too (logits / T would overflow)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_tokens: int = 128  # new tokens to generate
    seed: int | None = None
    ignore_eos: bool = False
    # applied to the target's logits before temperature / top-k / top-p, identically in AR, SD
    # and SSD, so speculation stays exact for the adjusted distribution (ssd/sampling.py)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit) pairs
    min_tokens: int = 0  # end-of-sequence tokens are impossible before this many new tokens
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)

    def __post_init__(self):
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")
        # a mapping or pairs, stored as sorted (int, float) pairs: equal biases, equal params
        items = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in items)))
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        for t, b in self.logit_bias:
            if t < 0:
                raise ValueError(f"logit_bias token id {t} is negative")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias value for token {t} must be in [-100, 100], got {b}")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("logit_bias names a token twice")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs (alternatives per token) must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def adjusts_logits(self) -> bool:
        """True when penalties, biases or min_tokens change the target's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def greedy(self) -> bool:
        # the limit of sampling as T -> 0; a tiny T would turn logits / T into inf and NaN
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class RequestOptions:
    """What travels with one request besides its sampling settings: the mode it asked for (None:
    the engine's own), the draft the gateway picked for it (its node-local draft; "" = any), its
    W3C trace context and its id (for the draft's spans). The target fills it in; it reaches the
    draft with the sequence (in process, through the draft process's pipe, as gRPC
    SequenceSetup fields)."""

    mode: Mode | None = None
    draft: str = ""
    traceparent: str = ""
    request_id: str = ""

    def __post_init__(self):
        if self.mode is not None:
            try:
                object.__setattr__(self, "mode", Mode(self.mode))
            except ValueError:
                raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}") from None


@dataclass(frozen=True)
class SpeculationConfig:
    """Speculation settings shared by SD and SSD (names follow the literature)."""

    num_speculative_tokens: int = 4  # K
    fan_out_budget: int = 12  # B = sum_k F_k, branches per sequence per round
    fan_out: str = "geometric"  # geometric (Saguaro) | uniform
    saguaro_c: float = 1.0  # C in [0, 1]; 1 = plain draft sampling
    critical_batch_size: int = 8  # b*: at or above it a miss uses the fast backup, below it the JIT draft
    backup: str = "ngram"  # fast backup speculator
    ngram_max: int = 3  # longest suffix the prompt-lookup backup matches
    init_acceptance: float = 0.6  # acceptance rate assumed before any measurement
    init_power_r: float = 1.0  # power-law exponent assumed before any fit
    # adaptive speculation (docs/algorithm.md section 7): K per round and sequence (at most
    # num_speculative_tokens) from measured acceptance and costs, the miss fallback (JIT or backup)
    # from measured tokens per second instead of b*, the fan-out budget (at most fan_out_budget)
    # from measured build vs verify time. On by default: the fastest setting measured for SSD (1.07x
    # greedy, 1.14x sampled its fixed K = 4: docs/results/benchmarks-journal-to-2026-12-05.md);
    # --no-adaptive keeps them fixed
    adaptive: bool = True
    # adaptive: per load class and temperature mix, measure realised tokens per second with and
    # without speculation and speculate only where it pays (ssd/speculation/adaptive.py,
    # SpeculationGate); --no-gate: always speculate (the lengths are still planned)
    gate: bool = True
    p_min: float = 0.0  # stop drafting a row when the draft's top probability at the next position is below this (0 = off)
    # adaptive SSD: verify only the first m* tokens of a cached speculation (docs/algorithm.md 7d);
    # off by default: on the CPUs measured a verify's cost hardly grows with its width, and the cut lost tokens
    cut_cached: bool = False

    def __post_init__(self):
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16]")
        if self.fan_out_budget < 1:
            raise ValueError("fan_out_budget must be >= 1")
        if self.fan_out not in FANOUT_KINDS:
            raise ValueError(f"fan_out must be one of {FANOUT_KINDS}")
        if not 0.0 <= self.saguaro_c <= 1.0:
            raise ValueError("saguaro_c must be in [0, 1]")
        if self.critical_batch_size < 1:
            raise ValueError("critical_batch_size must be >= 1")
        if self.backup not in ("ngram",):
            raise ValueError("backup must be 'ngram'")
        if not 0.0 < self.init_acceptance < 1.0:
            raise ValueError("init_acceptance must be in (0, 1)")
        if not 0.0 <= self.p_min < 1.0:
            raise ValueError("p_min must be in [0, 1)")


@dataclass(frozen=True)
class EngineConfig:
    target: str = "default"  # model dir or "default" (SmolLM2-135M-Instruct)
    draft: str = "default"  # "default" (the shipped trained draft), "feature" (the shipped feature drafter), a draft/model dir, or "standin" (truncated target; weak)
    standin_layers: int = 4  # layers kept by the stand-in draft
    mode: str = "ssd"
    max_batch: int = 8  # running sequences per step (continuous batching)
    max_model_len: int = 2048  # prompt + output tokens per sequence
    max_queue: int = 256  # requests waiting for a batch slot per target; beyond it RESOURCE_EXHAUSTED / HTTP 429 (0 = unbounded)
    target_threads: int = 1  # torch intra-op threads of the target (this process)
    draft_threads: int = 1  # torch intra-op threads of the draft process (SSD) / in-process draft (SD)
    dtype: str = "auto"  # auto | bfloat16 | float32, for target and draft (auto: bf16 where native)
    batch_invariant: bool = True  # kernels whose results do not depend on the batch shape (exact greedy)
    # the target's weights: auto | gguf (the GGUF file's own 4/8-bit blocks) | int8 (quantized on
    # load) | dense (--dtype); auto = gguf where the model has a GGUF file and the CPU kernels run
    weights: str = "auto"
    # the draft's weights: auto | int8 (quantized on load, the CPU kernels) | dense (--dtype);
    # auto = int8 where the CPU kernels run (a draft step costs ~half), dense elsewhere
    draft_weights: str = "auto"
    # what quantized weights (target and draft) multiply: auto | int8 (each activation row quantized
    # to 8 bits per block of 32, integer dot products, AVX-512 VNNI) | bf16 (the activations as they
    # are, AVX-512 BF16 dot products); auto = int8 where the CPU has VNNI (the fastest measured)
    activations: str = "auto"
    # SSD: seconds a published speculation stays in the speculation index (in-process map or Redis),
    # where a retried or repeated request continues from it
    index_ttl_s: float = 60.0
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.max_model_len < 16:
            raise ValueError("max_model_len must be >= 16")
        if self.target_threads < 1 or self.draft_threads < 1:
            raise ValueError("thread counts must be >= 1")
        if self.standin_layers < 1:
            raise ValueError("standin_layers must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(f"draft_weights must be one of {DRAFT_WEIGHTS}, got {self.draft_weights!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if not self.index_ttl_s > 0:
            raise ValueError(f"index_ttl_s must be > 0, got {self.index_ttl_s}")

    def replace(self, **kw) -> "EngineConfig":
        return dataclasses.replace(self, **kw)


def config_args(cfg: EngineConfig) -> list[str]:
    """The engine/speculation flags that reproduce cfg in a child process."""
    out = []
    for obj in (cfg, cfg.speculation):
        for f in dataclasses.fields(obj):
            if f.name in ("speculation", "mode"):
                continue
            flag, value = f.name.replace("_", "-"), getattr(obj, f.name)
            out += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return out
