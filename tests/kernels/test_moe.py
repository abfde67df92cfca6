"""Fused MoE against its torch reference: alignment (pairs grouped by expert, padded, sentinels), the
two grouped GEMMs with SwiGLU (and V4's clamp) for float experts, FP8 block-scaled experts and FP4
e2m1 experts dequantized in the kernel; odd token, expert and width counts; experts with no tokens."""

from __future__ import annotations

import pytest
import torch

from ds4.engine.quant import CODECS
from ds4.kernels import reference
from ds4.kernels.moe import fused_moe, sum_pairs
from ds4.kernels.moe_align import align, align_pairs
from ds4.kernels.tuning import EXPERT_TILES
from tests.kernels.conftest import DEVICE, randn


def routing(gen, tokens, topk, experts):
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, topk, generator=gen).to(DEVICE)
    return weights, ids


def test_align_groups_pairs_by_expert_and_pads_each_run(gen):
    ids = torch.tensor([[3, 0], [3, 5], [0, 3]], device=DEVICE)
    sorted_ids, block_expert = align(ids, num_experts=6, block_m=4)
    sentinel = ids.numel()
    # at a size fixed by T, K, E and the block: 6 pairs + 6 partial blocks of padding, in blocks of 4
    assert sorted_ids.numel() == 24 and block_expert.numel() == 6
    assert block_expert.tolist()[:3] == [0, 3, 5]  # experts 1, 2, 4 have no pairs and no block
    assert sorted_ids.tolist()[12:] == [sentinel] * 12  # blocks past the used ones: sentinels only
    assert sorted_ids.tolist()[:12] == [
        1,
        4,
        sentinel,
        sentinel,
        0,
        2,
        5,
        sentinel,
        3,
        sentinel,
        sentinel,
        sentinel,
    ]


@pytest.mark.parametrize(
    "tokens, topk, experts, block_m",
    [(1, 8, 256, 16), (3, 2, 6, 4), (37, 6, 64, 16), (5, 4, 7, 32), (512, 8, 256, 16)],
)
def test_the_align_kernel_gives_aligns_result_bit_for_bit(gen, tokens, topk, experts, block_m):
    """One program sorting, counting and scattering the pairs (a decode step's ~17 kernels in one) gives
    the torch form's padded order and block experts exactly: a token at top-8 of 256 experts, experts
    left unused, a count that is no power of two, and 4096 pairs (the most it takes)."""
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    if tokens > 3:  # crowd a few experts, so some runs span several blocks
        ids[: tokens // 2, 0] = torch.randint(0, 3, (tokens // 2,), generator=gen)
    ids = ids.to(DEVICE)
    want = align(ids, experts, block_m)
    got = align_pairs(ids, experts, block_m)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), f"seed {gen.initial_seed()}"


def test_pairs_of_id_minus_one_are_in_no_block(gen):
    """Tiered experts compute their hot pairs on the device and mark the cold ones -1: the alignment
    leaves those out (no slot, no block), at the same fixed sizes, and the kernel form agrees."""
    ids = torch.tensor([[3, -1], [-1, 5], [0, 3]], device=DEVICE)
    sorted_ids, block_expert = align(ids, num_experts=6, block_m=4)
    sentinel = ids.numel()
    assert sorted_ids.numel() == 24 and block_expert.tolist()[:3] == [0, 3, 5]
    assert sorted_ids.tolist()[:12] == [4, *[sentinel] * 3, 0, 5, *[sentinel] * 2, 3, *[sentinel] * 3]
    assert sorted_ids.tolist()[12:] == [sentinel] * 12
    for experts in (6, 8, 256):  # 8: the kernel's bins are a power of two, one past the experts
        crowded = torch.stack([torch.randperm(experts, generator=gen)[:4] for _ in range(9)])
        crowded[torch.rand(9, 4, generator=gen) < 0.5] = -1
        crowded = crowded.to(DEVICE)
        for got, want in zip(align_pairs(crowded, experts, 4), align(crowded, experts, 4), strict=True):
            assert torch.equal(got, want), f"{experts} experts, seed {gen.initial_seed()}"


def test_fused_moe_leaves_out_the_pairs_of_id_minus_one(gen):
    x = randn(gen, 5, 48)
    w13, w2 = randn(gen, 6, 80, 48, scale=0.2), randn(gen, 6, 48, 40, scale=0.2)
    weights, ids = routing(gen, 5, 3, 6)
    skipped = torch.rand(5, 3, generator=gen).to(DEVICE) < 0.5
    skipped[0] = True  # a token with no pair left: its sum is zero
    got = fused_moe(x, w13, w2, weights, ids.masked_fill(skipped, -1), skips=True)
    want = reference.fused_moe(x, w13, w2, weights.masked_fill(skipped, 0.0), ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 5e-3)])
@pytest.mark.parametrize(
    "tokens, topk, experts, dim, inter, limit", [(5, 3, 6, 48, 40, None), (9, 2, 7, 33, 20, 0.5)]
)
def test_fused_moe_float_experts(gen, dtype, tol, tokens, topk, experts, dim, inter, limit):
    x = randn(gen, tokens, dim, dtype=dtype)
    w13, w2 = (
        randn(gen, experts, 2 * inter, dim, dtype=dtype, scale=0.2),
        randn(gen, experts, dim, inter, dtype=dtype, scale=0.2),
    )
    weights, ids = routing(gen, tokens, topk, experts)
    got = fused_moe(x, w13, w2, weights, ids, limit=limit)
    want = reference.fused_moe(x, w13, w2, weights, ids, limit=limit)
    seed = gen.initial_seed()
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")


def _per_expert(quantize, weight):
    parts = [quantize(w) for w in weight]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("blocks", [(16, 32, 32), (16, 64, 128)] + [(16, *t[:2]) for t in EXPERT_TILES])
@pytest.mark.parametrize(
    "quant, shape, tol",
    [
        ("fp8", (6, 2, 5, 160, 136), 1e-4),  # partial 128 x 128 blocks on both axes
        ("fp4", (7, 3, 4, 64, 96), 1e-3),
        ("int4", (5, 2, 3, 96, 64), 1e-3),
    ],
)
def test_fused_moe_quantized_experts(gen, quant, shape, tol, blocks):
    """FP8 block-scaled, FP4 e2m1 and int4 experts, dequantized in the kernel: the reference gets the same
    dequantized weights, so what is compared is the kernel, not the format. Tiles of 32 inputs (one
    4-bit group), and of 128 (four groups, past the end of the 96- and 64-input matrices), and every
    tile of ds4.kernels.tuning's the autotuner may pick."""
    check_quantized(gen, quant, shape, tol, dict(block_m=blocks[0], block_n=blocks[1], block_k=blocks[2]))


def check_quantized(gen, quant, shape, tol, tiles):
    """fused_moe over random experts stored as `quant`, against the reference on their dequantized weights."""
    quantize, dequantize = CODECS[quant]
    tokens, topk, experts, dim, inter = shape
    x = randn(gen, tokens, dim)
    w13, s13 = _per_expert(quantize, torch.randn(experts, 2 * inter, dim, generator=gen) * 0.1)
    w2, s2 = _per_expert(quantize, torch.randn(experts, dim, inter, generator=gen) * 0.1)
    weights, ids = routing(gen, tokens, topk, experts)
    stored = dict(quant=quant, w13_scale=s13.to(DEVICE), w2_scale=s2.to(DEVICE))
    got = fused_moe(x, w13.to(DEVICE), w2.to(DEVICE), weights, ids, **stored, **tiles)
    deq13 = torch.stack([dequantize(w, s) for w, s in zip(w13, s13, strict=True)]).to(DEVICE)
    deq2 = torch.stack([dequantize(w, s) for w, s in zip(w2, s2, strict=True)]).to(DEVICE)
    want = reference.fused_moe(x, deq13, deq2, weights, ids)
    torch.testing.assert_close(
        got, want, atol=tol, rtol=1e-4, msg=lambda m: f"seed {gen.initial_seed()}: {m}"
    )


def test_fused_moe_reads_expert_stacks_with_any_strides(gen):
    """The engine keeps some expert stacks transposed ([E, out, in] viewed over [E, in, out] storage)."""
    tokens, topk, experts, dim, inter = 6, 2, 5, 40, 24
    x = randn(gen, tokens, dim)
    w13 = randn(gen, experts, dim, 2 * inter).transpose(1, 2)  # stride (…, 1, 2I)
    w2 = randn(gen, experts, inter, dim).transpose(1, 2)
    weights, ids = routing(gen, tokens, topk, experts)
    got = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, reference.fused_moe(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


def test_fused_moe_addresses_experts_past_two_gib(gen):
    """A real model's stack passes 2^31 bytes (V3's 256 FP8 experts: 7.5 GB of gate/up rows a layer)
    while its stride fits 32 bits (29 MB an expert), so an expert's offset is computed in 64 bits: here
    three int4 experts 1 GiB apart, in a buffer whose pages between them are never touched (so never
    backed by memory)."""
    quantize, dequantize = CODECS["int4"]
    tokens, experts, dim, inter = 4, 3, 64, 32
    x = randn(gen, tokens, dim)
    w13, s13 = _per_expert(quantize, torch.randn(experts, 2 * inter, dim, generator=gen) * 0.1)
    w2, s2 = _per_expert(quantize, torch.randn(experts, dim, inter, generator=gen) * 0.1)
    gap = (1 << 30) + 64  # a 32-bit stride; the last expert starts past 2^31
    far = torch.empty(2 * gap + w13[0].numel(), dtype=torch.uint8, device=DEVICE)
    far = far.as_strided(w13.shape, (gap, *w13.stride()[1:]))
    far.copy_(w13)  # the experts' bytes only
    ids = torch.tensor([[2, 0], [1, 2], [2, 1], [0, 1]], device=DEVICE)
    weights = torch.rand(tokens, 2, generator=gen).to(DEVICE)
    stored = dict(quant="int4", w13_scale=s13.to(DEVICE), w2_scale=s2.to(DEVICE))
    got = fused_moe(x, far, w2.to(DEVICE), weights, ids, **stored)
    deq13 = torch.stack([dequantize(w, s) for w, s in zip(w13, s13, strict=True)]).to(DEVICE)
    deq2 = torch.stack([dequantize(w, s) for w, s in zip(w2, s2, strict=True)]).to(DEVICE)
    torch.testing.assert_close(got, reference.fused_moe(x, deq13, deq2, weights, ids), atol=1e-3, rtol=1e-4)


def test_fused_moe_with_its_default_tiles(gen, monkeypatch):
    """The default path: on a GPU the autotuner times the tiles (gate/up and down) and runs its pick."""
    monkeypatch.setenv("DS4_AUTOTUNE", "1")
    check_quantized(gen, "int4", (6, 2, 5, 128, 64), 1e-3, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_pairs_sum_adds_the_shared_output_as_the_unfused_ops_do(gen, dtype):
    """One kernel for the MoE's sum over each token's pairs, the cast to the model dtype and the add of
    the shared experts: the same values as `pairs.sum(1).to(dtype) + shared`, each rounding in place."""
    tokens, topk, dim = 5, 3, 200
    pairs = randn(gen, tokens * topk, dim)
    shared = randn(gen, tokens, dim, dtype=dtype)
    out = torch.empty(tokens, dim, dtype=dtype, device=DEVICE)
    sum_pairs(pairs, topk, out, shared)
    want = pairs.view(tokens, topk, dim).sum(1).to(dtype) + shared
    torch.testing.assert_close(out, want, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=1e-5)
    sum_pairs(pairs, topk, out)
    torch.testing.assert_close(out, pairs.view(tokens, topk, dim).sum(1).to(dtype), atol=1e-6, rtol=1e-5)
