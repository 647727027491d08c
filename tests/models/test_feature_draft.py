"""The feature drafter: its training-time-test unroll computes exactly what the inference path
computes with the same positions self-fed, so training optimises what SSD and SD run."""
import pytest
import torch

from ssd.kv_cache import append_batch
from ssd.models.feature_draft import FeatureDraft
from ssd.models.llama import ModelConfig
from ssd.train.feature_train import ttt_hidden

torch.set_num_threads(2)


def tiny_feature_draft(seed: int = 0) -> FeatureDraft:
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position=256, rms_norm_eps=1e-6)
    m = FeatureDraft(cfg, (0, 1, 2), torch.arange(40))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.init_rope()
    return m.eval()


def inference_hidden(m: FeatureDraft, ids: torch.Tensor, fused: torch.Tensor, selffed: int) -> torch.Tensor:
    """h at the last position of ids [n] when the last `selffed` positions read the drafter's own
    previous output instead of the target's feature (one token at a time through the KV cache)."""
    n = ids.shape[0]
    g = m.project(fused)  # [n, H]
    known = n - selffed
    cache = m.new_cache(1, n + 1)
    g_prev = torch.cat([torch.zeros(1, g.shape[1]), g[:known - 1]])
    _, h = m(ids[None, :known], g_prev[None], append_batch([0], [0], [known]), cache)
    last = h[0, -1]
    for p in range(known, n):
        _, h = m(ids[None, p:p + 1], last[None, None], append_batch([0], [p], [1]), cache)
        last = h[0, -1]
    return last


@pytest.mark.parametrize("j", [0, 1, 3, 7])
def test_ttt_step_equals_inference_with_j_selffed_positions(j):
    m = tiny_feature_draft()
    m.invariant = False
    g = torch.Generator().manual_seed(1)
    n = 20
    ids = torch.randint(0, 61, (2, n), generator=g)
    fused = torch.randn(2, n, 192, generator=g)
    with torch.no_grad():
        outs = ttt_hidden(m, ids, fused, j + 1)
    for b in range(2):
        for p in (j + 2, n - 1):
            want = inference_hidden(m, ids[b, :p + 1], fused[b, :p + 1], j)
            torch.testing.assert_close(outs[j][b, p], want, atol=1e-4, rtol=1e-4)


def test_selffed_differs_from_true_fed():
    """The check above would pass trivially if self-fed inputs were ignored."""
    m = tiny_feature_draft()
    m.invariant = False
    g = torch.Generator().manual_seed(2)
    ids, fused = torch.randint(0, 61, (12,), generator=g), torch.randn(12, 192, generator=g)
    assert not torch.allclose(inference_hidden(m, ids, fused, 0), inference_hidden(m, ids, fused, 3), atol=1e-3)
