"""Flash-style absorbed MLA prefill against its torch reference: a chunk at the start of a sequence and
one over a cached prefix, odd head counts, latent and rope widths, blocks scattered through the pool,
blocks of rows that end inside a token's heads, fp32 and fp16 pools, FP8 rows."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.mla_prefill import mla_prefill
from tests.kernels.conftest import DEVICE, poisoned, randn


def chunk_case(gen, start, tokens, heads, latent, rope_dim, page, dtype):
    end = start + tokens
    num_blocks = -(-end // page) + 3  # spare blocks that the sequence does not own
    blocks = torch.randperm(num_blocks, generator=gen)[: -(-end // page)].to(torch.int32)
    pool = randn(gen, num_blocks * page, latent + rope_dim, dtype=dtype)
    q_latent = randn(gen, tokens, heads, latent, dtype=dtype)
    q_rope = randn(gen, tokens, heads, rope_dim, dtype=dtype)
    return q_latent, q_rope, pool, blocks.to(DEVICE)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize(
    "start, tokens, heads, latent, rope_dim, page, block_m",
    [
        (0, 21, 5, 48, 16, 16, 16),
        (37, 9, 3, 64, 24, 8, 32),
        (70, 1, 17, 32, 16, 32, 16),
        (5, 40, 1, 96, 16, 16, 32),
    ],
)
def test_mla_prefill_matches_reference(
    gen, dtype, tol, start, tokens, heads, latent, rope_dim, page, block_m
):
    q_latent, q_rope, pool, blocks = chunk_case(gen, start, tokens, heads, latent, rope_dim, page, dtype)
    scale = (latent + rope_dim) ** -0.5
    out, lse = poisoned(tokens, heads, latent), poisoned(tokens, heads)
    mla_prefill(
        q_latent, q_rope, pool, blocks, start, page, scale, out=out, lse=lse, block_m=block_m, block_n=16
    )
    want, want_lse = reference.mla_prefill(q_latent, q_rope, pool, blocks, start, page, scale)
    seed = gen.initial_seed()
    torch.testing.assert_close(out, want, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")


def test_each_query_of_the_chunk_equals_a_decode_query_of_its_length(gen):
    """Query t of a chunk is the decode query of a sequence of start + t + 1 rows: the two kernels agree."""
    from ds4.kernels.mla_decode import paged_mla_decode

    start, tokens, heads, latent, rope_dim, page = 19, 7, 4, 32, 16, 8
    q_latent, q_rope, pool, blocks = chunk_case(
        gen, start, tokens, heads, latent, rope_dim, page, torch.float32
    )
    scale = 0.3
    out, lse = mla_prefill(q_latent, q_rope, pool, blocks, start, page, scale)
    table = blocks[None].expand(tokens, -1).contiguous()
    lens = torch.arange(start + 1, start + tokens + 1, dtype=torch.int32, device=DEVICE)
    want, want_lse = paged_mla_decode(q_latent, q_rope, pool, table, lens, page, scale)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("latent", [512, 1024])  # the rope part after 4 scales, or after 8
def test_mla_prefill_reads_fp8_rows(gen, latent):
    """FP8 cache rows (656 bytes at 512 + 64), dequantized in the kernel: the answer on the dequantized
    pool."""
    start, tokens, heads, rope_dim, page = 11, 6, 3, 64, 16
    q_latent, q_rope, pool, blocks = chunk_case(
        gen, start, tokens, heads, latent, rope_dim, page, torch.float32
    )
    packed = reference.quantize_latent_rows(pool, latent)
    scale = (latent + rope_dim) ** -0.5
    out, lse = mla_prefill(q_latent, q_rope, packed, blocks, start, page, scale)
    rows = reference.dequantize_latent_rows(packed, latent)
    want, want_lse = reference.mla_prefill(q_latent, q_rope, rows, blocks, start, page, scale)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
