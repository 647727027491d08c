"""The native per-token ops of kernels/csrc/layer_ops.cpp that are not attention: RMSNorm against
torch's, row for row bit-identical whatever the batch, and out of the way where gradients flow."""
import pytest
import torch
import torch.nn.functional as F

from ssd.kernels import attention

pytestmark = pytest.mark.skipif(attention._native() is None, reason="no native kernels here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch_and_is_row_invariant(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 576, generator=g) * 3).to(dtype)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    y = attention.rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x.float(), (576,), w.float(), 1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    flat = x.reshape(14, 576)
    for i in (0, 5, 13):
        assert torch.equal(attention.rms_norm(flat[i:i + 1], w, 1e-5)[0], y.reshape(14, 576)[i])


def test_rms_norm_leaves_training_to_torch():
    x = torch.randn(3, 64)
    w = torch.ones(64, requires_grad=True)
    y = attention.rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None  # the weight gets its gradient through F.rms_norm
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert attention.rms_norm(x, w, 1e-6).grad_fn is None
