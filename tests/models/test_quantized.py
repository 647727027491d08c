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
    assert got["weights"] == "gguf (q4_1/q8_0)"
    assert got["bytes"] < 0.4 * dense_bytes, (got["bytes"], dense_bytes)
    assert model.lm_head.weight is model.embed.weight  # one Q8_0 table: embedding and head
    ids = torch.tensor([[1, 2, 3]])
    assert model.embed(ids).dtype == torch.bfloat16 and model.embed(ids).shape == (1, 3, 576)


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
