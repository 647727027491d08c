import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SMALL_VOCAB = 4


def _save(path, seed, perturb_from=None, noise=0.0):
    cfg = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=SMALL_VOCAB - 1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if perturb_from is not None:
                p.copy_(dict(perturb_from.named_parameters())[name])
                p.add_(torch.randn_like(p) * noise * (p.std() if p.numel() > 1 else 1.0))
            elif "lm_head" in name:
                p.mul_(40.0)  # sharper next-token distributions, like a real LM
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory):
    """A small-vocabulary target and a draft that is a noisy copy of it (moderate acceptance)."""
    t_dir, d_dir = tmp_path_factory.mktemp("small_target"), tmp_path_factory.mktemp("small_draft")
    target = _save(t_dir, 0)
    _save(d_dir, 1, perturb_from=target, noise=0.6)
    return t_dir, d_dir, target


@pytest.fixture(scope="session")
def small_feature_draft(small_pair, tmp_path_factory):
    """A feature drafter for the small target (ssd/models/feature_draft.py): its decoder layer
    starts from the target's last layer, fc and in_proj random. Untrained, but over a 4-token
    vocabulary it agrees with the target often enough to exercise multi-token acceptance."""
    from ssd.train.data import feature_layers
    from ssd.train.feature_train import feature_draft_from_target, save_feature_draft

    t_dir = small_pair[0]
    out = tmp_path_factory.mktemp("small_feature_draft")
    model = feature_draft_from_target(t_dir, feature_layers(2), torch.arange(SMALL_VOCAB), init_layer=1, seed=3)
    save_feature_draft(out, model, t_dir, str(t_dir), dtype=torch.float32)
    return out


@pytest.fixture(scope="session")
def pair():
    """The real default pair (SmolLM2-135M-Instruct target, the shipped draft), loaded once per
    test session for every module that needs it."""
    from ssd.config import EngineConfig
    from ssd.engine import ModelPair

    return ModelPair.load(EngineConfig(mode="ar"))
