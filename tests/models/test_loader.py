import json

import pytest
import torch

from ssd.kv_cache import append_batch
from ssd.models import loader
from ssd.models.loader import default_target_path, load_model, resolve_model
from ssd.tokenizer import StreamDecoder, Tokenizer


def prefill_logits(model, ids):
    cache = model.new_cache(1, ids.shape[1])
    return model(ids, append_batch([cache.allocate()], [0], ids.shape[1]), cache)


def test_sharded_checkpoint_loads(tiny_dirs, tmp_path):
    _, hf = tiny_dirs["llama_untied"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, _ = load_model(tmp_path)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert (prefill_logits(model, ids) - hf(ids).logits).abs().max() <= 1e-4


def test_bf16_load(tiny_dirs):
    model, _ = load_model(tiny_dirs["qwen3"][0], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.bfloat16
    assert prefill_logits(model, torch.arange(1, 6)[None]).dtype == torch.float32


def test_missing_and_extra_tensors_are_errors(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    src, _ = tiny_dirs["llama_untied"]
    sd = load_file(src / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.down_proj" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError):
        load_model(tmp_path)
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError):
        load_model(tmp_path)


def test_generation_config_eos_is_merged(tiny_dirs, tmp_path):
    src, _ = tiny_dirs["llama_tied"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model(tmp_path)[1].eos_token_ids == (2, 7)


def test_resolve_model(tiny_dirs, tmp_path):
    d, _ = tiny_dirs["llama_tied"]
    assert resolve_model(d) == d and resolve_model(str(d)) == d
    with pytest.raises(ValueError):
        resolve_model("no-such-model")
    with pytest.raises(ValueError):
        resolve_model(tmp_path)  # a directory without config.json


def test_default_target_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_CACHE_DIR", str(tmp_path))
    calls = []

    def broken(gguf_dir, name, dst, progress):
        (dst / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted mid-way

    monkeypatch.setattr(loader, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        default_target_path(progress=False)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written cache left behind

    def fake(gguf_dir, name, dst, progress):
        calls.append(name)
        (dst / "config.json").write_text("{}")
        (dst / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loader, "_convert_gguf", fake)
    p = default_target_path(progress=False)
    assert p == tmp_path / "models" / "smollm2-135m-instruct" and (p / "config.json").exists()
    assert default_target_path(progress=False) == p and resolve_model("smollm2-135m-instruct") == p
    assert calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


@pytest.fixture(scope="module")
def real_tok():
    return Tokenizer(default_target_path())


@pytest.mark.slow
def test_real_target_directory():
    p = default_target_path()
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    model, mc = load_model(p)
    assert mc.num_layers == 30 and mc.vocab_size == 49152 and mc.eos_token_ids == (2,) and mc.bos_token_id == 1


@pytest.mark.slow
def test_tokenizer_round_trip(real_tok):
    text = "Hello, world! Ünïcödé ✓ 日本語 🤖 and\n  code: x = f(y) ** 2"
    ids = real_tok.encode(text)
    assert ids and real_tok.decode(ids) == text
    assert real_tok.eos_token_ids == (2,) and real_tok.bos_token_id == 1 and real_tok.vocab_size == 49152


@pytest.mark.slow
def test_chat_template_is_chatml(real_tok):
    ids = real_tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}])
    im_start, im_end, nl = 1, 2, real_tok.encode("\n")
    expected = ([im_start] + real_tok.encode("system") + nl + real_tok.encode("Be brief.") + [im_end] + nl
                + [im_start] + real_tok.encode("user") + nl + real_tok.encode("Hi") + [im_end] + nl
                + [im_start] + real_tok.encode("assistant") + nl)
    assert ids == expected
    no_prompt = real_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt[-2:] == [im_end] + nl and real_tok.decode(no_prompt, skip_special_tokens=False).count("<|im_start|>") == 2


@pytest.mark.slow
def test_stream_decoder_matches_decode(real_tok):
    ids = real_tok.encode("Streaming 日本語 text with emoji 🤖🎨 and   spaces.\nNew line") + [2]
    dec = real_tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == real_tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)


class ByteTok:
    # each id is one byte: multi-byte characters span several tokens
    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_decoder_holds_back_partial_utf8():
    text = "a🤖b日本"
    data = list(text.encode())
    dec = StreamDecoder(ByteTok())
    pieces = [dec.push(i) for i in data]
    assert "".join(pieces) == text
    assert pieces[1:4] == ["", "", ""] and pieces[4] == "🤖"


def test_conversion_progress_reads_well_on_a_pipe_and_silences_the_libraries_bars():
    """StageProgress: on a pipe or a log, one plain line per stage and no cursor escapes; on a
    terminal, one bar; transformers' own bars (its switch and its GGUF module's plain tqdm) are off
    while it is open and back afterwards."""
    import io

    import transformers.modeling_gguf_pytorch_utils as gguf_module
    from transformers.utils import logging as hf_logging

    from ssd.models.loader import StageProgress

    class Pipe(io.StringIO):
        def isatty(self):
            return False

    class Terminal(Pipe):
        def isatty(self):
            return True

    before = gguf_module.tqdm
    out = Pipe()
    p = StageProgress("converting x.gguf", ["dequantize", "weights"], stream=out)
    assert not hf_logging.is_progress_bar_enabled() and gguf_module.tqdm([1, 2]).disable
    for i in range(2):
        p.start(i)
        p.finish(i)
    p.close()
    assert out.getvalue().splitlines() == ["converting x.gguf: dequantize (1/2)", "converting x.gguf: weights (2/2)",
                                           "converting x.gguf: done"]
    assert gguf_module.tqdm is before and hf_logging.is_progress_bar_enabled()
    term = Terminal()
    p = StageProgress("converting x.gguf", ["dequantize", "weights"], stream=term)
    for i in range(2):
        p.start(i)
        p.finish(i)
    p.close()
    assert "\r" in term.getvalue() and "2/2" in term.getvalue() and "done" not in term.getvalue()  # one tqdm bar
    quiet = Pipe()
    p = StageProgress("x", ["a"], enabled=False, stream=quiet)
    p.start(0)
    p.finish(0)
    p.close()
    assert quiet.getvalue() == ""
