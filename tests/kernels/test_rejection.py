import pytest
import torch

from ssd.kernels.rejection import greedy_verify, rejection_sample, rejection_sample_reference, verify


def test_greedy_hand_made_logits():
    V = 5
    logits = torch.full((2, 4, V), -10.0)
    # row 0: target argmax 1, 2, 3, then bonus 4 -> drafts 1, 2, 0 accept two, recovery 3
    for i, t in enumerate([1, 2, 3, 4]):
        logits[0, i, t] = 5.0
    # row 1: target argmax 0 everywhere -> all three drafts 0 accepted, bonus 0
    logits[1, :, 0] = 5.0
    d = torch.tensor([[1, 2, 0], [0, 0, 0]])
    k, t = greedy_verify(d, logits)
    assert k.tolist() == [2, 3]
    assert t.tolist() == [3, 0]


def _random_case(B, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1)
    d = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, K)
    return d, q, p, torch.rand(B, K, generator=g), torch.rand(B, generator=g)


@pytest.mark.parametrize("seed", range(5))
def test_batched_matches_reference_draw_for_draw(seed):
    d, q, p, ua, ut = _random_case(16, 4, 11, seed)
    k1, t1 = rejection_sample(d, q, p, ua, ut)
    k2, t2 = rejection_sample_reference(d, q, p, ua, ut)
    assert torch.equal(k1, k2) and torch.equal(t1, t2)


def test_identical_p_and_q_accept_everything():
    d, q, p, ua, ut = _random_case(8, 3, 7, 0)
    p = torch.cat([q, p[:, -1:]], 1)
    k, _ = rejection_sample(d, q, p, ua, ut)
    assert k.tolist() == [3] * 8


def test_output_token_follows_target_distribution():
    """One-position speculations: the emitted first token must be distributed as p_1 exactly,
    whatever q is (chi-square, alpha = 1e-3)."""
    from scipy.stats import chisquare

    V, N = 6, 40000
    g = torch.Generator().manual_seed(0)
    p1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p = torch.stack([p1, torch.full((V,), 1.0 / V)]).expand(N, 2, V)
    q = q1.expand(N, 1, V)
    d = torch.multinomial(q1, N, replacement=True, generator=g).view(N, 1)
    k, t = verify(d, p, q, generator=g)
    first = torch.where(k == 1, d[:, 0], t)
    counts = torch.bincount(first, minlength=V).double()
    assert chisquare(counts.numpy(), (p1.double() * N).numpy()).pvalue > 1e-3
    # and a wrong rule (accept on greedy match) is detected by the same test
    wrong_first = torch.where(d[:, 0] == p1.argmax(), d[:, 0], t)
    wrong = torch.bincount(wrong_first, minlength=V).double()
    assert chisquare(wrong.numpy(), (p1.double() * N).numpy()).pvalue < 1e-3
