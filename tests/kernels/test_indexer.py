"""The lightning indexer's scores and its streaming top-k against the torch reference: odd head
counts and widths, causal masking with keys offset into the context, ties (duplicate keys) going to
the lower index, -1 where fewer keys than k are visible."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.indexer import (
    indexer_scores,
    indexer_topk,
    paged_indexer_scores,
    paged_topk_rows,
    topk_ties_low,
)
from tests.kernels.conftest import DEVICE, poisoned, randn


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 5e-3)])
@pytest.mark.parametrize("tokens, heads, dim, keys", [(5, 7, 24, 90), (3, 16, 64, 33)])
def test_indexer_scores_match_reference(gen, dtype, tol, tokens, heads, dim, keys):
    q, k = randn(gen, tokens, heads, dim, dtype=dtype), randn(gen, keys, dim, dtype=dtype)
    weights = randn(gen, tokens, heads)
    positions = torch.randint(0, keys, (tokens,), generator=gen).to(DEVICE)
    out = poisoned(tokens, keys)
    indexer_scores(q, weights, k, positions, out=out)
    want = reference.indexer_scores(q, weights, k, positions)
    seed = gen.initial_seed()
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)), f"seed {seed}: causal mask differs"
    finite = torch.isfinite(want)
    torch.testing.assert_close(
        out[finite], want[finite], atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}"
    )


def quarters(x: torch.Tensor) -> torch.Tensor:
    return (x * 4).round() / 4


@pytest.mark.parametrize("keys_per_block", [16, 37, 1000])
def test_streaming_topk_is_the_stable_topk_of_all_scores(gen, keys_per_block):
    tokens, heads, dim, keys, topk = 6, 4, 16, 120, 10
    # quarters: every product and sum is exact in float32, so duplicate keys score exactly equal whatever
    # order a tile's dot sums in (numpy's under the interpreter depends on the row's place in the tile)
    q, weights = quarters(randn(gen, tokens, heads, dim)), quarters(randn(gen, tokens, heads).abs())
    k = quarters(randn(gen, keys, dim))
    k[60:80] = k[10:30]  # duplicate keys: equal scores, the lower index must win
    positions = torch.tensor([3, 9, 45, 70, 100, 119], device=DEVICE)  # the first two see < 10 keys
    got = indexer_topk(q, weights, k, positions, topk, keys_per_block=keys_per_block)
    want = reference.stable_topk(reference.indexer_scores(q, weights, k, positions), topk)
    assert torch.equal(got, want), f"seed {gen.initial_seed()}"
    assert (got[0, 4:] == -1).all() and (got[0, :4] >= 0).all()


def test_streaming_topk_over_128k_keys_in_blocks_matches_one_pass():
    """At 128K keys, block by block (scored here by the torch reference, the interpreter being slow)."""
    gen = torch.Generator().manual_seed(0)
    tokens, heads, dim, keys, topk = 2, 2, 8, 131072, 64
    q = torch.randn(tokens, heads, dim, generator=gen)
    weights = torch.rand(tokens, heads, generator=gen)
    k = torch.randn(keys, dim, generator=gen).round(decimals=1)  # coarse keys: many exact ties
    positions = torch.tensor([keys - 1, keys // 3])
    got = indexer_topk(
        q, weights, k, positions, topk, keys_per_block=8192, scores_fn=reference.indexer_scores
    )
    want = reference.stable_topk(reference.indexer_scores(q, weights, k, positions), topk)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 5e-3)])
def test_paged_indexer_scores_match_reference(gen, dtype, tol):
    batch, heads, dim, page, blocks, width = 3, 5, 24, 16, 6, 96
    q, weights = randn(gen, batch, heads, dim, dtype=dtype), randn(gen, batch, heads).abs()
    pool = randn(gen, 40 * page, dim, dtype=dtype)
    table = torch.randperm(40, generator=gen)[: batch * blocks].view(batch, blocks).to(DEVICE)
    lens = torch.tensor([1, 37, 90], device=DEVICE)  # one key, part of a block, near the width
    got = paged_indexer_scores(q, weights, pool, table, lens, page, width, out=poisoned(batch, width))
    want = reference.paged_indexer_scores(q, weights, pool, table, lens, page, width)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"seed {gen.initial_seed()}"
    finite = torch.isfinite(want)
    torch.testing.assert_close(
        got[finite], want[finite], atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}"
    )


def test_topk_ties_low_is_the_stable_sort_cut_to_k(gen):
    scores = quarters(randn(gen, 4, 300)) * (torch.rand(4, 300, generator=gen) < 0.5).to(DEVICE)  # many 0s
    scores[0, 10] = -0.0  # equal to +0.0: index order decides
    scores[1, 200:] = float("-inf")  # 200 finite keys; row 2 has only 3
    scores[2, 3:] = float("-inf")
    for k in (1, 7, 64, 300):
        assert torch.equal(topk_ties_low(scores, k), reference.stable_topk(scores, k)), (
            k,
            gen.initial_seed(),
        )


def test_the_paged_top_k_rows_are_the_torch_forms(gen):
    """Decode's selection on the Triton path (sortable keys and the rows through the block table, each one
    kernel, around torch.topk): the rows topk_ties_low's positions map to, ties to the lower position,
    -1 where fewer are finite, for k below and above the width."""
    scores = quarters(randn(gen, 3, 300)) * (torch.rand(3, 300, generator=gen) < 0.5).to(DEVICE)  # ties
    scores[0, 10] = -0.0
    scores[1, 200:] = float("-inf")
    scores[2, 3:] = float("-inf")
    page = 16
    table = torch.stack([torch.randperm(40, generator=gen)[:19] for _ in range(3)]).to(torch.int32).to(DEVICE)
    for k in (1, 64, 300, 512):
        chosen = topk_ties_low(scores, k)
        pages = table.long().gather(1, chosen.clamp(min=0) // page)
        want = torch.where(chosen >= 0, pages * page + chosen % page, -1)
        assert torch.equal(paged_topk_rows(scores, k, table, page), want), (k, gen.initial_seed())
