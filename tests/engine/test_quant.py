"""Block-scaled FP8: dequantization at shapes that are not multiples of the block, and the quantize ->
dequantize round trip within e4m3's precision."""

from __future__ import annotations

import pytest
import torch

from ds4.engine.quant import (
    E2M1_VALUES,
    FP8_MAX,
    dequantize,
    dequantize_fp4,
    dequantize_fp8_blocks,
    quantize_fp4,
    quantize_fp8_blocks,
    quantize_int4,
    scale_shape,
)

# (weight shape, block): edge blocks partial in one or both dimensions, and a block smaller than 128.
SHAPES = [((200, 300), (128, 128)), ((129, 17), (128, 128)), ((13, 22), (3, 5)), ((128, 256), (128, 128))]


def _fp8_weight(shape, block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(scale_shape(shape, block), generator=gen) * 0.01 + 1e-4
    return weight, scale_inv


def _dequantize_loop(weight, scale_inv, block):
    out = torch.empty(weight.shape, dtype=torch.float32)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            out[rows, cols] = weight[rows, cols].float() * scale_inv[bi, bj].item()
    return out


def test_scale_shape_ceil_divides():
    assert scale_shape((200, 300), (128, 128)) == (2, 3)
    assert scale_shape((129, 17), (128, 128)) == (2, 1)
    assert scale_shape((128, 256), (128, 128)) == (1, 2)
    assert scale_shape((13, 22), (3, 5)) == (5, 5)


@pytest.mark.parametrize(("shape", "block"), SHAPES)
def test_dequantize_matches_per_block_loop(shape, block):
    weight, scale_inv = _fp8_weight(shape, block)
    got = dequantize_fp8_blocks(weight, scale_inv, block)
    assert got.dtype == torch.float32
    assert got.shape == shape
    assert torch.equal(got, _dequantize_loop(weight, scale_inv, block))


@pytest.mark.parametrize(("shape", "block"), SHAPES)
def test_quantize_shapes_and_block_amax(shape, block):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    q, scale_inv = quantize_fp8_blocks(x, block)
    assert q.dtype == torch.float8_e4m3fn
    assert q.shape == shape
    assert scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == scale_shape(shape, block)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            amax = x[rows, cols].abs().max()
            assert scale_inv[bi, bj] == amax / FP8_MAX
            # the block's largest magnitude lands on the largest finite e4m3 value
            assert q[rows, cols].float().abs().max().item() == FP8_MAX


@pytest.mark.parametrize(("shape", "block"), SHAPES)
def test_quantize_round_trip_within_e4m3_precision(shape, block):
    # e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most 2**-4 relative for normal values and
    # by half the subnormal spacing (2**-10) in scaled units below 2**-6; slack covers float32 rounding.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05
    x[0, 0] = 1e-7  # far below the block's amax: lands among the subnormals
    q, scale_inv = quantize_fp8_blocks(x, block)
    back = dequantize_fp8_blocks(q, scale_inv, block)
    scale = dequantize_fp8_blocks(torch.ones(shape, dtype=torch.float8_e4m3fn), scale_inv, block)
    bound = x.abs() * (2**-4 + 1e-6) + scale * 2**-10 * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    assert (back - x).abs().max() > 0  # not vacuous: e4m3 is lossy on random data


def test_quantize_is_exact_when_block_amax_is_fp8_max():
    # amax == FP8_MAX gives scale_inv == 1, so e4m3-representable values come back bit for bit.
    block = (3, 5)
    weight, _ = _fp8_weight((13, 22), block, seed=3)
    x = weight.float()
    x[::3, ::5] = FP8_MAX
    q, scale_inv = quantize_fp8_blocks(x, block)
    assert torch.equal(scale_inv, torch.ones(5, 5))
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, block), x)


def test_quantize_zero_block_gives_zeros():
    x = torch.zeros(129, 17)
    x[128:, :] = 3.0
    q, scale_inv = quantize_fp8_blocks(x, (128, 128))
    assert torch.equal(q[:128].view(torch.uint8), torch.zeros(128, 17, dtype=torch.uint8))
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, (128, 128)), x)


def test_quantize_matches_direct_cast_bytes():
    # Each element is its block-scaled value rounded by torch's e4m3 cast: compare raw bytes.
    block = (128, 128)
    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(4))
    q, scale_inv = quantize_fp8_blocks(x, block)
    scale = dequantize_fp8_blocks(torch.ones(200, 300, dtype=torch.float8_e4m3fn), scale_inv, block)
    want = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


# -- FP4 e2m1 (V4's routed experts) ------------------------------------------------------------------


def test_fp4_round_trips_representable_tensors_exactly():
    """e2m1 codes times a power of two per 32-group survive quantize -> dequantize bit for bit."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (7, 96), generator=gen)
    scales = torch.exp2(torch.randint(-6, 6, (7, 3), generator=gen).float())
    weight = torch.tensor(E2M1_VALUES)[codes] * scales.repeat_interleave(32, dim=1)
    weight[:, ::32] = 6.0 * scales  # each group reaches the top code, so its scale is exactly `scales`
    packed, scale = quantize_fp4(weight)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (7, 48)
    assert scale.dtype == torch.float8_e8m0fnu and tuple(scale.shape) == (7, 3)
    assert torch.equal(dequantize_fp4(packed, scale), weight)


def test_fp4_packs_the_even_element_in_the_low_nibble():
    # bytes 0x21, 0xF7: codes 1, 2 then 7, 15
    packed = torch.tensor([[0x21, 0xF7] + [0] * 14], dtype=torch.uint8).view(torch.int8)
    scale = torch.ones(1, 1).to(torch.float8_e8m0fnu)
    assert dequantize_fp4(packed, scale)[0, :4].tolist() == [0.5, 1.0, 6.0, -6.0]


def test_fp4_rounds_to_the_nearest_code_within_half_a_step():
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(16, 64, generator=gen)
    packed, scale = quantize_fp4(weight)
    error = (dequantize_fp4(packed, scale) - weight).abs()
    # the widest e2m1 step is 2 (between 4 and 6): error <= 1 x the group's scale
    assert bool((error <= scale.float().repeat_interleave(32, dim=1) + 1e-7).all())


@pytest.mark.parametrize("fmt", ["fp4", "int4"])
def test_4bit_codes_dequantize_straight_to_bf16_as_float32_rounded(fmt):
    """The bf16 lookup path writes half the bytes and must equal float32 dequantization rounded once."""
    quantize = quantize_fp4 if fmt == "fp4" else quantize_int4
    weight = torch.randn(96, 256) * torch.logspace(-6, 2, 96)[:, None]  # scales over eight decades
    codes, scales = quantize(weight)
    direct = dequantize(fmt, codes, scales, dtype=torch.bfloat16)
    assert direct.dtype == torch.bfloat16
    assert torch.equal(direct, dequantize(fmt, codes, scales).to(torch.bfloat16))
