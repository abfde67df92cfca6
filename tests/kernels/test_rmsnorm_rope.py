"""Fused RMSNorm (+ residual add) against its torch reference at odd shapes, fp32 and fp16."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.rmsnorm import rmsnorm, rows_of
from tests.kernels.conftest import poisoned, randn

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, cols", [(1, 16), (7, 100), (3, 512)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(gen, dtype, rows, cols, with_residual):
    x = randn(gen, rows, cols, dtype=dtype)
    weight = randn(gen, cols).abs() + 0.5
    residual = randn(gen, rows, cols, dtype=dtype) if with_residual else None
    out, res_out = poisoned(rows, cols, dtype=dtype), poisoned(rows, cols, dtype=dtype)
    got, got_res = rmsnorm(x, weight, 1e-6, residual, out=out, residual_out=res_out)
    want, want_res = reference.rmsnorm(x, weight, 1e-6, residual)
    seed = gen.initial_seed()
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    if with_residual:
        torch.testing.assert_close(got_res, want_res, atol=TOL[dtype], rtol=TOL[dtype])
        assert not torch.isnan(res_out).any()
    else:
        assert got_res is None


def test_rmsnorm_reads_a_split_part_of_wider_rows_in_place(gen):
    """The MLA latent is the first 48 of each 64-wide row (split from its rope part): the kernel reads it
    with its row stride, no copy first, and normalizes only those columns."""
    wide = randn(gen, 5, 64)
    latent, _ = wide.split([48, 16], dim=-1)
    weight = randn(gen, 48).abs() + 0.5
    assert rows_of(latent).data_ptr() == latent.data_ptr()  # the kernel's rows: the view itself
    got, _ = rmsnorm(latent, weight, 1e-6)
    torch.testing.assert_close(
        got, reference.rmsnorm(latent.contiguous(), weight, 1e-6)[0], atol=1e-5, rtol=1e-5
    )
