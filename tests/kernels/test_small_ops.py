"""Rope (interleaved and half-split pairs, [T, H, R] and [T, R]) and V4's mHC mixing with Sinkhorn
against their torch references, fp32 and fp16, odd head and stream counts."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.small_ops import mhc_mix, rope
from tests.kernels.conftest import poisoned, randn


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(5, 7, 16), (3, 24), (4, 17, 64)])
def test_rope_matches_reference(gen, dtype, tol, interleaved, shape):
    x = randn(gen, *shape, dtype=dtype)
    cos, sin = randn(gen, shape[0], shape[-1] // 2), randn(gen, shape[0], shape[-1] // 2)
    out = poisoned(*shape, dtype=dtype)
    got = rope(x, cos, sin, interleaved, out=out)
    x3 = x[:, None] if x.dim() == 2 else x
    want = reference.rope(x3, cos, sin, interleaved)
    want = want[:, 0] if x.dim() == 2 else want
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}")
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("hc, dim, iters", [(4, 96, 20), (3, 50, 3), (1, 16, 1)])
def test_mhc_mix_matches_reference(gen, hc, dim, iters):
    tokens, eps = 6, 1e-6
    mix, base = randn(gen, tokens, (2 + hc) * hc), randn(gen, (2 + hc) * hc)
    scale, streams = randn(gen, 3), randn(gen, tokens, hc, dim)
    got = mhc_mix(mix, base, scale, streams, iters, eps)
    want = reference.mhc_mix(mix, base, scale, streams, iters, eps)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(
            g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {gen.initial_seed()}: {m}"
        )
    if iters > 1:  # doubly stochastic, up to eps
        comb = got[1]
        torch.testing.assert_close(
            comb.sum(-2), torch.ones(tokens, hc, device=comb.device), atol=1e-4, rtol=0
        )
