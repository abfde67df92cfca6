"""Attention over given rows against its torch reference: V3.2's MLA shape (latent value + rope) and
V4's single K = V head with a sink; invalid (-1) indices, rows with no valid index, fp32 and fp16."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.sparse_attention import sparse_attention
from tests.kernels.conftest import DEVICE, poisoned, randn


def case(gen, tokens, heads, dim, rows, k, dtype):
    q = randn(gen, tokens, heads, dim, dtype=dtype)
    kv = randn(gen, rows, dim, dtype=dtype)
    indices = torch.randint(0, rows, (tokens, k), generator=gen, dtype=torch.int32)
    indices[torch.rand(tokens, k, generator=gen) < 0.3] = -1  # invalid entries anywhere
    indices[0] = -1  # a token with nothing to attend to
    return q, kv, indices.to(DEVICE)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize(
    "tokens, heads, value_dim, rest, rows, k, with_sink",
    [
        (5, 7, 48, 16, 90, 37, False),  # MLA: latent value + rope key part
        (4, 17, 64, 0, 50, 20, True),  # V4: K = V, attention sink
        (3, 3, 32, 0, 40, 70, False),  # more indices than rows: repeats allowed
    ],
)
def test_sparse_attention_matches_reference(
    gen, splits, dtype, tol, tokens, heads, value_dim, rest, rows, k, with_sink
):
    """One split, or three (decode: a token's rows over several programs, merged after; with 20
    indices the third split is empty)."""
    q, kv, indices = case(gen, tokens, heads, value_dim + rest, rows, k, dtype)
    sink = randn(gen, heads) if with_sink else None
    scale = (value_dim + rest) ** -0.5
    out, lse = poisoned(tokens, heads, value_dim), poisoned(tokens, heads)
    sparse_attention(q, kv, indices, scale, value_dim, sink, out=out, lse=lse, splits=splits)
    want, want_lse = reference.sparse_attention(q, kv, indices, scale, value_dim, sink)
    seed = gen.initial_seed()
    torch.testing.assert_close(out, want, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    if sink is None:  # token 0 has no valid row: zeros and -inf, never NaN
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    else:  # the sink alone takes all the probability: zero output, lse = the sink
        assert (out[0] == 0).all()
        torch.testing.assert_close(lse[0], sink.float())


def test_a_chunk_past_the_grids_second_axis_runs_in_slices(gen, monkeypatch):
    """A CUDA grid takes 65,535 programs on its second axis, where the tokens sit: a longer prefill chunk
    (V4 over a long prompt) runs in slices, here of 2 tokens (the limit lowered), with the same result."""
    from ds4.kernels import sparse_attention as module
    from ds4.kernels.targets import recording

    monkeypatch.setattr(module, "GRID_YZ", 2)
    q, kv, indices = case(gen, 5, 7, 64, 50, 20, torch.float32)
    sink = randn(gen, 7)
    recorded = contextlib.nullcontext() if DEVICE == "cuda" else recording()
    with recorded as rec:
        out, lse = sparse_attention(q, kv, indices, 0.125, 64, sink)
    want, want_lse = reference.sparse_attention(q, kv, indices, 0.125, 64, sink)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    if rec is not None:
        assert {launch.grid[1] for launch in rec.launches.values()} == {2}
