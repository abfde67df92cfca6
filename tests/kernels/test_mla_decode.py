"""Paged absorbed-MLA decode against its torch reference: odd head counts, latent and rope widths,
scattered blocks, a sequence shorter than a block, one that is empty, fp32 and fp16 caches."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.mla_decode import paged_mla_decode, split_count
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


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize(
    "lens, heads, latent, rope_dim, page",
    [([37, 5, 64], 5, 48, 16, 16), ([70, 0, 1], 17, 64, 24, 32), ([33], 3, 96, 16, 8)],
)
def test_paged_mla_decode_matches_reference(gen, splits, dtype, tol, lens, heads, latent, rope_dim, page):
    """One split, or four (flash-decoding: each sequence's positions over four programs, merged after;
    short sequences leave some splits empty)."""
    q_latent, q_rope, pool, table, seq_lens = paged_case(gen, lens, heads, latent, rope_dim, page, dtype)
    scale = (latent + rope_dim) ** -0.5
    out, lse = poisoned(len(lens), heads, latent), poisoned(len(lens), heads)
    paged_mla_decode(q_latent, q_rope, pool, table, seq_lens, page, scale, out=out, lse=lse, splits=splits)
    want, want_lse = reference.paged_mla_decode(q_latent, q_rope, pool, table, seq_lens, page, scale)
    seed = gen.initial_seed()
    torch.testing.assert_close(out, want, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    empty = [i for i, n in enumerate(lens) if n == 0]
    for i in empty:  # nothing to attend to: zeros and -inf, not NaN
        assert (out[i] == 0).all() and torch.isneginf(lse[i]).all()


def test_the_split_count_fills_the_gpu_from_shapes_alone():
    """The rule's figures on an H200 (132 SMs, splits of at least 256 positions): one sequence of 128
    heads (8 programs) over a 128K cache takes the 32 splits allowed; 32 sequences already fill the card
    (256 programs) and take none; a short cache is not split; 3 sequences (4 x 8 programs) take 9."""
    assert split_count(1, 8, 131072, 132, 256) == 32
    assert split_count(32, 8, 131072, 132, 256) == 1
    assert split_count(1, 8, 300, 132, 256) == 1
    assert split_count(3, 8, 8192, 132, 256) == 9
    assert split_count(3, 8, 1024, 132, 256) == 4  # no more splits than 256-position pieces of the cache


def test_a_decode_graphs_padded_batch_splits_as_its_real_batch():
    """Graphs pad a batch of n to 1, 2, 4, 8 or a multiple of 8 (and the largest, max_num_seqs); the
    split count must be the same for both, or graphs on and off would sum differently."""
    from ds4.engine.graphs import buckets

    for max_batch in (6, 30, 64):
        sizes = buckets(max_batch)
        for n in range(1, max_batch + 1):
            padded = next(b for b in sizes if b >= n)
            for head_blocks in (1, 2, 8):  # on an H200 (132 SMs) and under the interpreter (4)
                for sms, least in ((132, 256), (4, 32)):
                    assert split_count(n, head_blocks, 1 << 16, sms, least) == split_count(
                        padded, head_blocks, 1 << 16, sms, least
                    )


@pytest.mark.parametrize("splits", [1, 2])
def test_paged_mla_decode_reads_fp8_rows(gen, splits):
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
    paged_mla_decode(q_latent, q_rope, packed, table, seq_lens, page, scale, out=out, lse=lse, splits=splits)
    want, want_lse = reference.paged_mla_decode(q_latent, q_rope, rows, table, seq_lens, page, scale)
    torch.testing.assert_close(
        out, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {gen.initial_seed()}: {m}"
    )
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)


def test_a_batch_past_the_grids_second_axis_runs_in_slices(gen, monkeypatch):
    """Sequences sit on the grid's second axis (at most 65,535 programs on a card): more run in slices,
    here of 2 (the limit lowered), with the same result."""
    from ds4.kernels import mla_decode
    from ds4.kernels.targets import recording

    monkeypatch.setattr(mla_decode, "GRID_YZ", 2)
    q_latent, q_rope, pool, table, seq_lens = paged_case(
        gen, [37, 5, 64, 1, 20], 5, 48, 16, 16, torch.float32
    )
    recorded = contextlib.nullcontext() if DEVICE == "cuda" else recording()
    with recorded as rec:
        out, lse = paged_mla_decode(q_latent, q_rope, pool, table, seq_lens, 16, 0.1, splits=2)
    want, want_lse = reference.paged_mla_decode(q_latent, q_rope, pool, table, seq_lens, 16, 0.1)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    if rec is not None:
        assert (
            max(launch.grid[1] for launch in rec.launches.values() if launch.kernel == "_mla_decode_kernel")
            == 2
        )
