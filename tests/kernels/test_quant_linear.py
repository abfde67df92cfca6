"""The quantized linear kernel: x @ W^T with W kept as stored (FP8 with 128 x 128 block scales, FP4 e2m1
or int4 with a scale per 32 inputs), dequantized tile by tile. The reference multiplies by the same
dequantized weight, so what is compared is the kernel, not the format."""

from __future__ import annotations

import pytest
import torch

from ds4.engine.quant import dequantize, quantize_fp4, quantize_fp8_blocks, quantize_int4
from ds4.kernels.quant_linear import quant_linear
from ds4.kernels.tuning import LINEAR_TILES
from tests.kernels.conftest import DEVICE, randn

QUANTIZE = {"fp8": quantize_fp8_blocks, "fp4": quantize_fp4, "int4": quantize_int4}


@pytest.mark.parametrize(
    "quant, lead, dim_out, dim_in, dtype, tol",
    [
        ("fp8", (7,), 200, 160, torch.float32, 1e-4),  # partial blocks on both axes
        ("fp8", (2, 3), 130, 256, torch.float16, 2e-2),
        ("fp4", (5,), 96, 64, torch.float32, 1e-4),
        ("int4", (3, 4), 72, 96, torch.float32, 1e-4),
        ("int4", (1,), 33, 224, torch.float16, 2e-2),  # decode: one row
    ],
)
@pytest.mark.parametrize("blocks", [(16, 32, 32), (16, 64, 128)])
def test_quant_linear_matches_the_dequantized_matmul(gen, quant, lead, dim_out, dim_in, dtype, tol, blocks):
    """Tiles of 32 inputs (one 4-bit group) and of 128 (four groups; FP8: a whole scale block)."""
    check(gen, quant, lead, dim_out, dim_in, dtype, tol, blocks)


@pytest.mark.parametrize("quant", ["fp8", "int4"])
@pytest.mark.parametrize("blocks", [tile[:3] for tile in LINEAR_TILES])
def test_every_tile_the_tuner_may_pick_is_exact(gen, quant, blocks):
    """Each of ds4.kernels.tuning's tiles, at a decode shape (5 rows) and a partial FP8 block."""
    check(gen, quant, (5,), 200, 256, torch.float32, 1e-4, blocks)


def test_the_default_tiles_are_exact(gen, monkeypatch):
    """The default path: on a GPU the autotuner times the tiles and runs its pick; elsewhere fixed ones."""
    monkeypatch.setenv("DS4_AUTOTUNE", "1")
    check(gen, "int4", (3,), 160, 256, torch.float32, 1e-4, (None, None, None))


def check(gen, quant, lead, dim_out, dim_in, dtype, tol, blocks):
    weight, scale = QUANTIZE[quant](torch.randn(dim_out, dim_in, generator=gen) * 0.1)
    x = randn(gen, *lead, dim_in, dtype=dtype)
    block_m, block_n, block_k = blocks
    got = quant_linear(
        x, weight.to(DEVICE), scale.to(DEVICE), quant, block_m=block_m, block_n=block_n, block_k=block_k
    )
    dense = dequantize(quant, weight, scale).to(DEVICE)
    want = (x.float() @ dense.T).to(dtype)
    assert got.shape == (*lead, dim_out) and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"seed {gen.initial_seed()}: {m}")


def test_quant_linear_with_no_rows_returns_an_empty_result(gen):
    weight, scale = quantize_int4(torch.randn(64, 32, generator=gen))
    got = quant_linear(torch.empty(0, 32, device=DEVICE), weight.to(DEVICE), scale.to(DEVICE), "int4")
    assert got.shape == (0, 64)
