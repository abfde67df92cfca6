"""Paged MLA decode, absorbed: one query token per sequence against its cached latent rows, read
through the block table, with an online softmax. Queries come folded with W_UK (q_latent) plus their
roped part; the output is the probability-weighted latent, before W_UV, and the log-sum-exp.

One program per (sequence, block of heads): the latent rows of a block of positions are loaded once
and serve every head in the block, which is what makes MLA decode cheap in bandwidth."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args


@triton.jit
def load_rows(pool_ptr, row, pmask, c, r, cmask, rmask, stride_pool, C: tl.constexpr, FP8: tl.constexpr):
    """Pool rows `row` [N] as float32: their latent [N, BLOCK_C] and roped key [N, BLOCK_R] (masked by
    pmask, cmask, rmask). FP8: e4m3 latent, a float32 scale per 128 (C // 32 bytes), then bf16 rope
    (656-byte rows at 512 + 64)."""
    lmask = pmask[:, None] & cmask[None, :]
    rmask2 = pmask[:, None] & rmask[None, :]
    base = pool_ptr + row[:, None] * stride_pool
    if FP8:
        codes = tl.load(base + c[None, :], mask=lmask, other=0)
        scales = tl.load(
            (base + C).to(tl.pointer_type(tl.float32)) + c[None, :] // 128, mask=lmask, other=0.0
        )
        latent = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scales
        rope = (base + C + C // 32).to(tl.pointer_type(tl.bfloat16))
        roped = tl.load(rope + r[None, :], mask=rmask2, other=0.0)
    else:
        latent = tl.load(base + c[None, :], mask=lmask, other=0.0).to(tl.float32)
        roped = tl.load(base + C + r[None, :], mask=rmask2, other=0.0)
    return latent, roped.to(tl.float32)


@triton.jit
def softmax_result(acc, total, m):
    """An online softmax's output (acc / total) and log-sum-exp per row; zeros and -inf for a row that
    saw nothing, never NaN."""
    has = total > 0
    out = tl.where(has[:, None], acc / tl.where(has, total, 1.0)[:, None], 0.0)
    return out, tl.where(has, m + tl.log(tl.where(has, total, 1.0)), float("-inf"))


@triton.jit
def _mla_decode_kernel(
    ql_ptr,
    qr_ptr,
    pool_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    lse_ptr,
    scale,
    heads,
    stride_qlb,
    stride_qlh,
    stride_qrb,
    stride_qrh,
    stride_pool,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_lb,
    C: tl.constexpr,
    R: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    hmask, cmask, rmask = h < heads, c < C, r < R
    ql = tl.load(
        ql_ptr + b * stride_qlb + h[:, None] * stride_qlh + c[None, :],
        mask=hmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    qr = tl.load(
        qr_ptr + b * stride_qrb + h[:, None] * stride_qrh + r[None, :],
        mask=hmask[:, None] & rmask[None, :],
        other=0.0,
    ).to(tl.float32)
    n = tl.load(lens_ptr + b)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for start in range(0, n, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < n
        page = tl.load(table_ptr + b * stride_tb + pos // PAGE, mask=pmask, other=0)
        row = page.to(tl.int64) * PAGE + pos % PAGE
        latent, roped = load_rows(pool_ptr, row, pmask, c, r, cmask, rmask, stride_pool, C, FP8)
        s = (dot(ql, tl.trans(latent), DOT, PRECISION) + dot(qr, tl.trans(roped), DOT, PRECISION)) * scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p, latent, DOT, PRECISION)
        m = m_new
    out, lse = softmax_result(acc, total, m)
    tl.store(
        out_ptr + b * stride_ob + h[:, None] * stride_oh + c[None, :],
        out,
        mask=hmask[:, None] & cmask[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + h, lse, mask=hmask)


def check_pool(pool: torch.Tensor, q_latent: torch.Tensor, q_rope: torch.Tensor) -> bool:
    """Checks a pool's rows against the queries' widths (latent C, rope R) for `load_rows`; returns
    whether they are FP8 rows (uint8: C + C // 32 + 2R bytes, 656 for 512 + 64), else [latent | rope]."""
    latent, rope_dim = q_latent.shape[-1], q_rope.shape[-1]
    fp8 = pool.dtype == torch.uint8
    if fp8:
        width = latent + latent // 32 + 2 * rope_dim
        assert latent % 128 == 0 and pool.shape[-1] == width, f"FP8 rows of {width} bytes expected"
        assert (latent + latent // 32) % 16 == 0, "the rope part must start 16-byte aligned (latent 512 does)"
    else:
        assert pool.shape[-1] == latent + rope_dim, "pool rows must be [latent | rope]"
    assert pool.stride(-1) == 1
    assert q_latent.stride(-1) == 1 and q_rope.stride(-1) == 1
    return fp8


def paged_mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_h: int = 16,
    block_n: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ds4.kernels.reference.paged_mla_decode; `out` [B, H, C] and `lse` [B, H] float32 buffers. A
    uint8 pool holds FP8 rows (reference.quantize_latent_rows: 656 bytes for latent 512 + rope 64),
    dequantized in the kernel."""
    batch, heads, latent = q_latent.shape
    rope_dim = q_rope.shape[-1]
    fp8 = check_pool(pool, q_latent, q_rope)
    out = (
        out if out is not None else torch.empty(batch, heads, latent, dtype=torch.float32, device=pool.device)
    )
    lse = lse if lse is not None else torch.empty(batch, heads, dtype=torch.float32, device=pool.device)
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    grid = (batch, triton.cdiv(heads, block_h))
    _mla_decode_kernel[grid](
        q_latent,
        q_rope,
        pool,
        table,
        lens,
        out,
        lse,
        scale,
        heads,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        pool.stride(0),
        table.stride(0),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        C=latent,
        R=rope_dim,
        PAGE=block_size,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_C=max(16, triton.next_power_of_2(latent)),
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        FP8=fp8,
        **dot_args(q_latent.dtype),
    )
    return out, lse
