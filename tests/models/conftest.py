import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

torch.set_num_threads(2)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def tiny_hf_config(kind: str):
    if kind == "llama_tied":
        return LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=10000.0)
    if kind == "llama_untied":
        return LlamaConfig(**TINY, tie_word_embeddings=False, rope_theta=500000.0)
    if kind == "llama3_scaled":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16, "rope_theta": 500000.0}
        return LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=scaling)
    if kind == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=False)
    if kind == "qwen3":
        return Qwen3Config(**{**TINY, "head_dim": 32}, tie_word_embeddings=True)
    raise KeyError(kind)


def save_tiny(kind: str, path, seed: int = 0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases / unit-inits norms: randomize so they are tested
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    return hf


class _TinyDirs(dict):
    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, kind):  # saved on first use, once per session
        d = self.factory.mktemp(kind)
        self[kind] = (d, save_tiny(kind, d))
        return self[kind]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    # kind -> (directory written by save_pretrained, the HF model)
    return _TinyDirs(tmp_path_factory)
