"""Fused residual add + RMSNorm: one program per row, float32 inside, one read of x and the residual,
one write of the normalized row and the new residual stream."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_cols,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_out_ptr.dtype.element_ty)  # the residual stream keeps its dtype, as unfused
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    dtype = out_ptr.dtype.element_ty
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (x * inv * w).to(dtype), mask=mask)
    else:  # V4's unweighted norm: x times its scale rounded to x's dtype, as `x * inv.to(x.dtype)`
        tl.store(out_ptr + row * stride_out + cols, (x * inv.to(dtype).to(tl.float32)).to(dtype), mask=mask)


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width] with unit column stride: a view where one does (a split's part of a wider row
    keeps its row stride, which the kernel takes), else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As ds4.kernels.reference.rmsnorm: (normalized x + residual, x + residual or None). `out` and
    `residual_out`: contiguous buffers shaped like x to write into. `weight` None: V4's unweighted norm
    (ds4.engine.layers.hyper.unweighted_rms_norm)."""
    shape = x.shape
    x2 = rows_of(x)
    fresh = torch.empty(shape, dtype=x.dtype, device=x.device)  # dense, whatever x's strides
    out = (out if out is not None else fresh).view(-1, shape[-1])
    res2 = res_out = None
    if residual is not None:
        res2 = rows_of(residual)
        res_out = residual_out if residual_out is not None else torch.empty_like(fresh)
        res_out = res_out.view(-1, shape[-1])
    rows, cols = x2.shape
    if rows:
        _rmsnorm_kernel[(rows,)](
            x2,
            res2 if res2 is not None else x2,
            weight if weight is not None else x2,
            out,
            res_out if res_out is not None else out,
            cols,
            eps,
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            BLOCK=triton.next_power_of_2(cols),
        )
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)
