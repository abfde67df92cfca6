"""Rope (interleaved and half-split pairs, [T, H, R] and [T, R]) and V4's mHC mixing with Sinkhorn
against their torch references, fp32 and fp16, odd head and stream counts."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import forced, reference
from ds4.kernels.rmsnorm import rmsnorm
from ds4.kernels.small_ops import mhc_mix, rope, write_latent_rows
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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("limit", [None, 0.7])
def test_swiglu_kernel_matches_the_torch_ops(gen, dtype, tol, limit):
    """SwiGLU on the halves of one [T, 2I] product (strided rows), V4's clamps or none: the same values as
    the engine's torch form (silu rounded to the dtype, then the product)."""
    from ds4.engine.layers.moe import swiglu

    product = randn(gen, 6, 2 * 300, dtype=dtype)
    gate, up = product.chunk(2, dim=-1)
    with forced(False):
        want = swiglu(gate, up, limit)
    with forced(True):
        got = swiglu(gate, up, limit)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_latent_rows_go_to_their_slots_as_the_unfused_ops_write_them(gen, dtype, interleaved):
    """A decode step's MLA cache rows in one kernel: each token's latent normed and its key's rope part
    rotated, written to its slot of the pool; the other rows untouched. Bit for bit what the norm, rope,
    concatenation and copy kernels write."""
    tokens, latent, rope_dim = 4, 48, 16
    kv = randn(gen, tokens, latent + rope_dim, dtype=dtype)
    weight = (randn(gen, latent).abs() + 0.5).to(dtype)
    cos, sin = randn(gen, tokens, rope_dim // 2), randn(gen, tokens, rope_dim // 2)
    slots = torch.tensor([7, 2, 11, 0], device=kv.device)
    pool = randn(gen, 12, latent + rope_dim, dtype=dtype)
    want = pool.clone()
    normed = rmsnorm(kv[:, :latent], weight, 1e-6)[0]
    want.index_copy_(0, slots, torch.cat([normed, rope(kv[:, latent:], cos, sin, interleaved)], dim=-1))
    write_latent_rows(kv, weight, 1e-6, cos, sin, interleaved, pool, slots)
    assert torch.equal(pool, want), f"seed {gen.initial_seed()}"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape", [(5, 40), (3, 7, 48)])
@pytest.mark.parametrize("negate", [False, True])
def test_rope_tail_kernel_matches_the_torch_form(gen, dtype, tol, shape, negate):
    """V4's rope on the trailing 16 dims, interleaved pairs kept in place (and the rotation back, by -sin),
    for key rows [T, D] and query heads [T, H, D]: the engine's torch form and the kernel agree."""
    from ds4.engine.layers.rope import apply_rope_tail

    x = randn(gen, *shape, dtype=dtype)
    cos, sin = randn(gen, shape[0], 8, dtype=dtype), randn(gen, shape[0], 8, dtype=dtype)
    with forced(False):
        want = apply_rope_tail(x, cos, sin, negate)
    with forced(True):
        got = apply_rope_tail(x, cos, sin, negate)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}")
    assert torch.equal(got[..., :-16], x[..., :-16])  # the part without rope, as it was


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_unweighted_norm_kernel_matches_the_torch_form(gen, dtype, tol):
    """V4's weightless RMSNorm (query heads, mHC streams): x times its inverse RMS rounded to x's dtype."""
    from ds4.engine.layers.hyper import unweighted_rms_norm

    x = randn(gen, 4, 3, 96, dtype=dtype, scale=2.0)
    with forced(False):
        want = unweighted_rms_norm(x, 1e-6)
    with forced(True):
        got = unweighted_rms_norm(x, 1e-6)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 1e-3)])
def test_rope_tables_in_one_kernel_match_the_torch_form(dtype, tol):
    """The rotary tables (cos, sin times YaRN's factor) for positions up to 100K: one kernel, the values
    of the torch form."""
    from ds4.engine.config import RopeConfig
    from ds4.engine.layers.rope import RotaryEmbedding

    rope = RopeConfig(theta=10000.0, kind="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    rotary = RotaryEmbedding(rope, 64)
    positions = torch.tensor([0, 1, 7, 4095, 4096, 65537, 100000])
    with forced(False):
        want = rotary(positions, dtype)
    with forced(True):
        got = rotary(positions, dtype)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == (7, 32)
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_the_streams_update_kernel_matches_the_torch_form(gen, dtype, tol):
    """V4's residual streams after a block (4 streams, hidden 200): spread plus mix in one kernel."""
    from ds4.engine.layers.hyper import hyper_update

    streams, block_out = randn(gen, 3, 4, 200, dtype=dtype), randn(gen, 3, 200, dtype=dtype)
    post, comb = randn(gen, 3, 4).sigmoid() * 2, randn(gen, 3, 4, 4).softmax(-1)
    with forced(False):
        want = hyper_update(streams, block_out, post, comb)
    with forced(True):
        got = hyper_update(streams, block_out, post, comb)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}")
