"""`--weights` (ssd/models/quantized.py) on the real default target: the GGUF file's blocks land
in this project's fused layout exactly (the q/k rows put back in the checkpoint's order), the
model keeps about a third of its dense bf16 bytes, and the choice is explained or refused."""
import pytest
import torch

from ssd.kernels import quant
from ssd.models.loader import default_target_path, load_model
from ssd.models.quantized import apply_weights, gguf_blocks, gguf_source, resolve_weights

pytestmark = pytest.mark.skipif(not quant.available(), reason="no quantized kernels here")


@pytest.fixture(scope="module")
def dense():
    path = default_target_path()
    model, cfg = load_model(path, dtype=torch.float32)
    return path, model, cfg


def test_gguf_blocks_are_the_converted_checkpoint_exactly(dense):
    # the checkpoint was de-quantized from the same file, so every fused weight must match bit
    # for bit once the q and k rows are un-permuted (a wrong row order fails here)
    path, model, cfg = dense
    blocks = gguf_blocks(gguf_source(path), cfg)
    for i in (0, cfg.num_layers - 1):
        layer = model.layers[i]
        for attr in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
            kind, b = blocks[f"layers.{i}.{attr}"]
            w = getattr(layer, attr)
            assert torch.equal(quant.dequantize(kind, b, tuple(w.shape)), w), (i, attr)
    kind, b = blocks["embed.weight"]
    assert kind == "q8_0" and torch.equal(quant.dequantize(kind, b, tuple(model.embed.weight.shape)), model.embed.weight)


def test_resident_size_is_about_a_third_of_bf16_and_the_head_stays_tied():
    path = default_target_path()
    model, _ = load_model(path, dtype=torch.bfloat16)
    dense_bytes = apply_weights(model, "dense")["bytes"]
    got = apply_weights(model, "gguf", path)
    acts = "int8" if quant.choose_layout(torch.bfloat16, 576) == "vnni" else "bfloat16"
    assert got["weights"] == f"gguf (q4_1/q8_0, {acts} activations)"
    assert got["bytes"] < 0.4 * dense_bytes, (got["bytes"], dense_bytes)
    assert model.lm_head.weight is model.embed.weight  # one Q8_0 table: embedding and head
    ids = torch.tensor([[1, 2, 3]])
    assert model.embed(ids).dtype == torch.bfloat16 and model.embed(ids).shape == (1, 3, 576)


def test_int8_activations_with_dense_weights_are_refused_not_ignored():
    from ssd.config import EngineConfig
    from ssd.engine import load_target

    with pytest.raises(ValueError, match="--activations int8 multiplies quantized weights"):
        load_target(EngineConfig(weights="dense", activations="int8"), default_target_path(), quiet=True)


def test_resolution_explains_itself_and_refuses_what_cannot_run(tmp_path):
    path = default_target_path()
    assert resolve_weights("auto", path)[0] == "gguf"
    assert resolve_weights("dense", path) == ("dense", "requested")
    assert resolve_weights("int8", path) == ("int8", "requested")
    assert resolve_weights("auto", path, "cuda:0")[0] == "dense"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_weights("auto", tmp_path) == ("dense", "auto: the model has no GGUF file")
    with pytest.raises(ValueError, match="no GGUF file known"):
        resolve_weights("gguf", tmp_path)
    with pytest.raises(ValueError, match="weights must be one of"):
        resolve_weights("int4", path)
    with pytest.raises(ValueError, match="CPU kernels only"):
        resolve_weights("int8", path, "cuda:0")


@pytest.mark.parametrize("activations", ["int8", "bf16"])
def test_the_fused_layer_is_the_python_layer_bit_for_bit(activations):
    # DecoderLayer._fused (one native call per layer) against the same operations from Python:
    # prefill, a verify block, rows of other lengths, non-contiguous slots (the index_put path)
    from ssd.kv_cache import append_batch

    if activations == "int8" and not quant.vnni_supported():
        pytest.skip("no AVX-512 VNNI here")
    path = default_target_path()
    model, _ = load_model(path, dtype=torch.bfloat16)
    apply_weights(model, "gguf", path, activations)
    assert {layer.qkv_weight.layout for layer in model.layers} == {"vnni" if activations == "int8" else "panels"} \
        or not quant.panels_supported()
    if not model.layers[0].fusable(torch.zeros(1, 1, 576, dtype=torch.bfloat16)):
        pytest.skip("no panel kernels here")
    ids = torch.randint(0, 40000, (3, 40), generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (False, True):
        model.fused = fused
        cache = model.new_cache(4, 128)
        out = [model(ids[:, :30], append_batch([0, 1, 2], [0, 0, 0], 30), cache),
               model(ids[:, 30:35], append_batch([0, 1, 2], [30, 30, 30], 5), cache),
               model(ids[[0, 2], 35:38], append_batch([0, 2], [35, 35], [3, 1]), cache),
               model(ids[[2, 1], 36:37], append_batch([2, 1], [36, 35], 1), cache)]
        runs.append((out, cache.k.clone(), cache.v.clone()))
    (a, ka, va), (b, kb, vb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(ka, kb) and torch.equal(va, vb)
