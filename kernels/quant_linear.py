"""A linear layer over weights kept in their stored format: y [M, N] = x [M, K] @ W^T, W [N, K] FP8 with
one scale per 128 x 128 block, FP4 e2m1 or int4 packed two per byte with a scale per 32 inputs.
Each program computes a [BLOCK_M, BLOCK_N] tile of y, dequantizing W tile by tile in registers (the
same tile reader as the fused MoE), so the full-precision weight never exists in memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args
from ds4.kernels.moe import PACKED, QUANT, _weight_tile, tile_width
from ds4.kernels.tuning import autotuning, linear_configs, row_class, tuned


@triton.jit
def _quant_linear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    rows,
    dim_in,
    dim_out,
    rows_class,  # the autotuner's key (tuning.row_class), unused here
    stride_x,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_out,
    QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < rows, n < dim_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, dim_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < dim_in
        x = tl.load(
            x_ptr + m[:, None].to(tl.int64) * stride_x + k[None, :],
            mask=mmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(tl.float32)
        w = _weight_tile(
            w_ptr,
            s_ptr,
            0,
            n,
            nmask,
            k0,
            dim_in,
            0,
            stride_wn,
            stride_wk,
            0,
            stride_sn,
            QUANT,
            BLOCK_N,
            BLOCK_K,
        )
        acc += dot(x, tl.trans(w), DOT, PRECISION)
    tl.store(
        out_ptr + m[:, None].to(tl.int64) * stride_out + n[None, :], acc, mask=mmask[:, None] & nmask[None, :]
    )


_quant_linear_tuned = tuned(
    _quant_linear_kernel, linear_configs(), ["dim_in", "dim_out", "rows_class", "QUANT"]
)


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    quant: str,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequantize(weight, scale)^T in float32, returned in x's dtype. FP8: weight [N, K]
    float8_e4m3fn, scale [N/128, K/128] float32; FP4: weight [N, K/2] int8, scale [N, K/32]
    float8_e8m0fnu; int4: weight [N, K/2] uint8, scale [N, K/32] bf16. Tiles: as given, else timed on a
    GPU (ds4.kernels.tuning), else 16 x 32 x 32."""
    code = QUANT[quant]
    lead, dim_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, dim_in).contiguous()
    dim_out = weight.shape[0]
    assert weight.shape[1] * (2 if code in PACKED else 1) == dim_in, (tuple(weight.shape), dim_in)
    if code == 2:
        weight, scale = weight.view(torch.uint8), scale.view(torch.uint8)
    elif code == 3:
        weight = weight.view(torch.uint8)
    else:
        scale = scale.float().contiguous()
    out = torch.empty(x2.shape[0], dim_out, dtype=torch.float32, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out.to(x.dtype).reshape(*lead, dim_out)
    args = (x2, weight, scale, out, rows, dim_in, dim_out, row_class(rows))
    args += (x2.stride(0), weight.stride(0), weight.stride(1), scale.stride(0), out.stride(0))
    if block_m is block_n is block_k is None and autotuning(x.device):
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(dim_out, meta["BLOCK_N"]))  # noqa: E731
        _quant_linear_tuned[grid](*args, QUANT=code, **dot_args(x2.dtype))
    else:
        block_m, block_n = block_m or 16, block_n or 32
        block_k = tile_width(code, block_k or 32)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(dim_out, block_n))
        _quant_linear_kernel[grid](
            *args, QUANT=code, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **dot_args(x2.dtype)
        )
    return out.to(x.dtype).reshape(*lead, dim_out)
