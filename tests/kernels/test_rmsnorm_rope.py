"""Fused RMSNorm (+ residual add) against its torch reference at odd shapes, fp32 and fp16."""

from __future__ import annotations

import pytest
import torch

from ds4.kernels import reference
from ds4.kernels.rmsnorm import rmsnorm
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
