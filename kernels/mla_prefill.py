"""Paged MLA prefill, absorbed and causal, flash-style: a chunk of T query tokens of one sequence against
its cached latent rows (the chunk's own rows included), read through the sequence's blocks with an online
softmax. No [T x context] score matrix exists anywhere: memory is the queries, the output and one tile of
scores per program, however long the cached prefix.

The query rows are the chunk's (token, head) pairs, heads inner. In the absorbed form every head shares
one key/value head (the latent row, 512 + 64 wide on DeepSeek), so one program's block of rows loads each
tile of cached rows once for all its heads and tokens; a token sees the positions up to its own. The
output is the probability-weighted latent before W_UV, and the log-sum-exp, as the decode kernel's."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args, key_rows
from ds4.kernels.mla_decode import check_pool, load_rows, softmax_result


@triton.jit
def _mla_prefill_kernel(
    ql_ptr,
    qr_ptr,
    pool_ptr,
    blocks_ptr,
    out_ptr,
    lse_ptr,
    scale,
    start,
    rows_total,
    heads,
    stride_qlt,
    stride_qlh,
    stride_qrt,
    stride_qrh,
    stride_pool,
    stride_ot,
    stride_oh,
    stride_lt,
    C: tl.constexpr,
    R: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    first_row = tl.program_id(0) * BLOCK_M
    m = first_row + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    mmask, cmask, rmask = m < rows_total, c < C, r < R
    t, h = m // heads, m % heads
    ql = tl.load(
        ql_ptr + t[:, None] * stride_qlt + h[:, None] * stride_qlh + c[None, :],
        mask=mmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    qr = tl.load(
        qr_ptr + t[:, None] * stride_qrt + h[:, None] * stride_qrh + r[None, :],
        mask=mmask[:, None] & rmask[None, :],
        other=0.0,
    ).to(tl.float32)
    q_pos = start + t  # [BLOCK_M]: each row's position; it sees keys at or before it
    end = start + (tl.minimum(first_row + BLOCK_M, rows_total) - 1) // heads + 1  # past the block's last
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for first in range(0, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)
        pmask = pos < end
        page = tl.load(blocks_ptr + pos // PAGE, mask=pmask, other=0)
        row = page.to(tl.int64) * PAGE + pos % PAGE
        latent, roped = load_rows(
            pool_ptr, row, pmask, c, r, cmask, rmask, stride_pool, C, FP8, BLOCK_N, BLOCK_C
        )
        s = (dot(ql, tl.trans(latent), DOT, PRECISION) + dot(qr, tl.trans(roped), DOT, PRECISION)) * scale
        s = tl.where(pmask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no inf - inf
        alpha = tl.exp(m_run - base)
        p = tl.exp(s - base[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p, latent, DOT, PRECISION)
        m_run = m_new
    out, lse = softmax_result(acc, total, m_run)
    tl.store(
        out_ptr + t[:, None] * stride_ot + h[:, None] * stride_oh + c[None, :],
        out,
        mask=mmask[:, None] & cmask[None, :],
    )
    tl.store(lse_ptr + t * stride_lt + h, lse, mask=mmask)


def mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    pool: torch.Tensor,
    blocks: torch.Tensor,
    start: int,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ds4.kernels.reference.mla_prefill: queries q_latent [T, H, C] (folded with W_UK) and q_rope
    [T, H, R] at positions start .. start + T - 1 over the sequence's pool rows (its `blocks`, in
    order, holding positions 0 .. start + T - 1). Returns `out` [T, H, C] and `lse` [T, H] in float32. A
    uint8 pool holds FP8 rows (656 bytes at 512 + 64), dequantized in the kernel as the decode kernel
    reads them."""
    tokens, heads, latent = q_latent.shape
    rope_dim = q_rope.shape[-1]
    fp8 = check_pool(pool, q_latent, q_rope)
    assert blocks.numel() * block_size >= start + tokens, "the blocks must hold every position of the chunk"
    device = pool.device
    out = out if out is not None else torch.empty(tokens, heads, latent, dtype=torch.float32, device=device)
    lse = lse if lse is not None else torch.empty(tokens, heads, dtype=torch.float32, device=device)
    blocks = blocks.to(device=device, dtype=torch.int32).contiguous()
    rows = tokens * heads
    dots = dot_args(q_latent.dtype)
    width = triton.next_power_of_2(latent)
    block_n = block_n or key_rows(width, q_latent.dtype)
    # query rows: as many as key rows, 16 over FP8 rows. Each program keeps [BLOCK_M, C] float32 sums in
    # registers, over 8 warps: at 4, or at 32 rows over FP8 rows (their dequantized tile lives beside them),
    # real sizes spilled 150-950 bytes a thread to local memory on sm_89/sm_90 (ds4.kernels.targets)
    block_m = block_m or key_rows(width, q_latent.dtype, most=16 if fp8 else 32)
    _mla_prefill_kernel[(triton.cdiv(rows, block_m),)](
        q_latent,
        q_rope,
        pool,
        blocks,
        out,
        lse,
        scale,
        start,
        rows,
        heads,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        pool.stride(0),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        C=latent,
        R=rope_dim,
        PAGE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_C=max(16, triton.next_power_of_2(latent)),
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        FP8=fp8,
        **dots,
        num_warps=8,
    )
    return out, lse
