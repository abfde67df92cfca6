"""Paged absorbed-MLA decode against its torch reference: odd head counts, latent and rope widths,
scattered blocks, a sequence shorter than a block, one that is empty, fp32 and fp16 caches."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.mla_decode import paged_mla_decode
from tests.kernels.conftest import DEVICE, poisoned, randn


def paged_case(gen, lens, heads, latent, rope_dim, page, dtype):
    pages = [-(-n // page) for n in lens]
    num_blocks = sum(pages) + 3  # spare blocks that no sequence owns
    order = torch.randperm(num_blocks, generator=gen)  # blocks scattered through the pool
    table = torch.full((len(lens), max(max(pages), 1)), -1, dtype=torch.int32)
    used = 0
    for i, k in enumerate(pages):
        table[i, :k] = order[used : used + k]
        used += k
    pool = randn(gen, num_blocks * page, latent + rope_dim, dtype=dtype)
    q_latent = randn(gen, len(lens), heads, latent, dtype=dtype)
    q_rope = randn(gen, len(lens), heads, rope_dim, dtype=dtype)
    return q_latent, q_rope, pool, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize(
    "lens, heads, latent, rope_dim, page",
    [([37, 5, 64], 5, 48, 16, 16), ([70, 0, 1], 17, 64, 24, 32), ([33], 3, 96, 16, 8)],
)
def test_paged_mla_decode_matches_reference(gen, dtype, tol, lens, heads, latent, rope_dim, page):
    q_latent, q_rope, pool, table, seq_lens = paged_case(gen, lens, heads, latent, rope_dim, page, dtype)
    scale = (latent + rope_dim) ** -0.5
    out, lse = poisoned(len(lens), heads, latent), poisoned(len(lens), heads)
    paged_mla_decode(q_latent, q_rope, pool, table, seq_lens, page, scale, out=out, lse=lse)
    want, want_lse = reference.paged_mla_decode(q_latent, q_rope, pool, table, seq_lens, page, scale)
    seed = gen.initial_seed()
    torch.testing.assert_close(out, want, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    empty = [i for i, n in enumerate(lens) if n == 0]
    for i in empty:  # nothing to attend to: zeros and -inf, not NaN
        assert (out[i] == 0).all() and torch.isneginf(lse[i]).all()


def test_paged_mla_decode_reads_fp8_rows(gen):
    """FlashMLA's FP8 cache rows (656 bytes: e4m3 latent with a float32 scale per 128, bf16 rope),
    dequantized in the kernel: the same answer as the reference on the dequantized pool."""
    lens, heads, latent, rope_dim, page = [45, 9], 5, 512, 64, 16
    q_latent, q_rope, pool, table, seq_lens = paged_case(
        gen, lens, heads, latent, rope_dim, page, torch.float32
    )
    packed = reference.quantize_latent_rows(pool)
    assert packed.shape == (pool.shape[0], 656)
    rows = reference.dequantize_latent_rows(packed)
    assert (rows - pool).abs().max() < 0.1 * pool.abs().max()  # e4m3: about 2 significant digits
    scale = (latent + rope_dim) ** -0.5
    out, lse = poisoned(len(lens), heads, latent), poisoned(len(lens), heads)
    paged_mla_decode(q_latent, q_rope, packed, table, seq_lens, page, scale, out=out, lse=lse)
    want, want_lse = reference.paged_mla_decode(q_latent, q_rope, rows, table, seq_lens, page, scale)
    torch.testing.assert_close(
        out, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {gen.initial_seed()}: {m}"
    )
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
