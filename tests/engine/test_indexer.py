"""The indexer's deterministic top-k rule: the k highest scores, ties to the lower index, -0.0 == +0.0."""

import torch

from ds4.engine.layers.indexer import stable_topk_indices


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 0.5]])
    assert stable_topk_indices(scores, 4).tolist() == [[1, 3, 5, 0]]


def test_negative_zero_ties_with_positive_zero():
    scores = torch.tensor([[-0.0, 0.0, -0.0, 2.0, 0.0]])
    assert stable_topk_indices(scores, 3).tolist() == [[3, 0, 1]]


def test_selection_does_not_depend_on_row_length():
    gen = torch.Generator().manual_seed(0)
    scores = torch.relu(torch.randn(1, 300, generator=gen))  # about half exactly 0.0
    short = stable_topk_indices(scores[:, :200], 150)
    padded = torch.cat([scores[:, :200], torch.full((1, 100), float("-inf"))], dim=1)
    assert torch.equal(stable_topk_indices(padded, 150), short)
