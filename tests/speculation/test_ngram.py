import torch

from ssd.speculation.ngram import point_mass_probs, propose


def test_prompt_lookup_continues_the_latest_match():
    ctx = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    assert propose(ctx, 3) == [2, 3, 5]  # most recent earlier "5 6 7" is followed by 2 3 5


def test_short_match_is_padded_and_no_match_repeats_last():
    assert propose([1, 2, 3, 1, 2], 4) == [3, 1, 2, 2]
    assert propose([1, 2, 3, 4], 2) == [4, 4]
    assert propose([7], 3) == [7, 7, 7]


def test_point_mass_rows():
    q = point_mass_probs([2, 0], 4)
    assert torch.equal(q, torch.tensor([[0, 0, 1.0, 0], [1.0, 0, 0, 0]]))
