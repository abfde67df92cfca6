"""Small fused ops: rope (interleaved or half-split pairs in, half-split out, as the engine lays queries
and keys) and DeepSeek-V4's mHC mixing (the stream weights, Sinkhorn-Knopp to a doubly-stochastic
mix, and the collapse of the streams into the block input), float32 inside, one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_pairs(base, i, mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The rotated pairs' two halves at offsets i from base, as float32: (x_2i, x_2i+1) interleaved,
    else (x_i, x_i+HALF)."""
    if INTERLEAVED:
        return (
            tl.load(base + 2 * i, mask=mask, other=0.0).to(tl.float32),
            tl.load(base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32),
        )
    return (
        tl.load(base + i, mask=mask, other=0.0).to(tl.float32),
        tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32),
    )


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    heads,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_ot,
    stride_oh,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_P)
    mask = (h < heads)[:, None] & (i < HALF)[None, :]
    base = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x1, x2 = _rope_pairs(base, i[None, :], mask, HALF, INTERLEAVED)
    c = tl.load(cos_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + t * stride_ot + h[:, None] * stride_oh
    tl.store(out + i[None, :], (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF + i[None, :], (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """As ds4.kernels.reference.rope for x [T, H, R] or [T, R]."""
    squeeze = x.dim() == 2
    x3 = x[:, None, :] if squeeze else x
    assert x3.stride(-1) == 1, "the rotated dim must be contiguous"
    tokens, heads, dim = x3.shape
    out3 = out if out is not None else torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    out3 = out3.view(tokens, heads, dim)
    c, s = cos.contiguous(), sin.contiguous()
    if tokens:
        block_h = min(16, triton.next_power_of_2(heads))
        _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
            x3,
            c,
            s,
            out3,
            heads,
            x3.stride(0),
            x3.stride(1),
            c.stride(0),
            out3.stride(0),
            out3.stride(1),
            HALF=dim // 2,
            INTERLEAVED=interleaved,
            BLOCK_H=block_h,
            BLOCK_P=triton.next_power_of_2(dim // 2),
        )
    return out3[:, 0, :] if squeeze else out3


@triton.jit
def _mhc_kernel(
    mix_ptr,
    base_ptr,
    scale_ptr,
    streams_ptr,
    post_ptr,
    comb_ptr,
    collapsed_ptr,
    dim,
    eps,
    stride_mix,
    stride_st,
    stride_sn,
    stride_ct,
    N: tl.constexpr,
    ITERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)
    rmask = r < N
    mix = mix_ptr + t * stride_mix
    pre_s = tl.load(scale_ptr)
    post_s = tl.load(scale_ptr + 1)
    comb_s = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(
        tl.load(mix + r, mask=rmask, other=0.0) * pre_s + tl.load(base_ptr + r, mask=rmask, other=0.0)
    )
    pre = pre + eps
    post = 2.0 * tl.sigmoid(
        tl.load(mix + N + r, mask=rmask, other=0.0) * post_s
        + tl.load(base_ptr + N + r, mask=rmask, other=0.0)
    )
    square = rmask[:, None] & rmask[None, :]
    cell = r[:, None] * N + r[None, :]
    logits = tl.load(mix + 2 * N + cell, mask=square, other=0.0) * comb_s + tl.load(
        base_ptr + 2 * N + cell, mask=square, other=0.0
    )
    logits = tl.where(square, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    e = tl.where(square, e, 0.0)
    comb = e / tl.where(rmask, tl.sum(e, axis=1), 1.0)[:, None] + eps
    comb = tl.where(square, comb, 0.0)
    comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    for _ in tl.static_range(ITERS - 1):  # Sinkhorn-Knopp: rows, then columns
        comb = comb / (tl.sum(comb, axis=1)[:, None] + eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    tl.store(post_ptr + t * N + r, post, mask=rmask)
    tl.store(comb_ptr + t * N * N + cell, comb, mask=square)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tile = tl.load(
            streams_ptr + t * stride_st + r[:, None] * stride_sn + d[None, :],
            mask=rmask[:, None] & (d < dim)[None, :],
            other=0.0,
        ).to(tl.float32)
        collapsed = tl.sum(pre[:, None] * tile, axis=0)
        tl.store(
            collapsed_ptr + t * stride_ct + d, collapsed.to(collapsed_ptr.dtype.element_ty), mask=d < dim
        )


def mhc_mix(
    mix: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    streams: torch.Tensor,
    iters: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ds4.kernels.reference.mhc_mix: (post [T, N], comb [T, N, N], collapsed [T, D])."""
    tokens, hc, dim = streams.shape
    streams = streams.contiguous()
    mix = mix.float().contiguous()
    post = torch.empty(tokens, hc, dtype=torch.float32, device=streams.device)
    comb = torch.empty(tokens, hc, hc, dtype=torch.float32, device=streams.device)
    collapsed = torch.empty(tokens, dim, dtype=streams.dtype, device=streams.device)
    if tokens:
        _mhc_kernel[(tokens,)](
            mix,
            base.float().contiguous(),
            scale.float().contiguous(),
            streams,
            post,
            comb,
            collapsed,
            dim,
            eps,
            mix.stride(0),
            streams.stride(0),
            streams.stride(1),
            collapsed.stride(0),
            N=hc,
            ITERS=iters,
            BLOCK_N=max(2, triton.next_power_of_2(hc)),
            BLOCK_D=min(1024, triton.next_power_of_2(dim)),
        )
    return post, comb, collapsed


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, out_ptr, width, stride_g, stride_u, limit, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < width
    gate = tl.load(gate_ptr + t * stride_g + i, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + t * stride_u + i, mask=mask, other=0.0).to(tl.float32)
    if HAS_LIMIT:  # V4: the gate clamped from above, the up both ways
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.silu's result
    tl.store(out_ptr + t * width + i, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up for [T, I] rows (V4: both clamped to `limit` first), one kernel instead of two to
    four; each row may be a strided view (gate and up as halves of one product)."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.stride(-1) == up.stride(-1) == 1
    tokens, width = gate.shape
    out = torch.empty(tokens, width, dtype=gate.dtype, device=gate.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(width))
        _swiglu_kernel[(tokens, triton.cdiv(width, block))](
            gate,
            up,
            out,
            width,
            gate.stride(0),
            up.stride(0),
            float(limit) if limit is not None else 0.0,
            HAS_LIMIT=limit is not None,
            BLOCK=block,
        )
    return out


@triton.jit
def _latent_rows_kernel(
    kv_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    pool_ptr,
    slot_ptr,
    stride_kv,
    stride_c,
    stride_pool,
    eps,
    C: tl.constexpr,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0)
    dtype = pool_ptr.dtype.element_ty
    row = pool_ptr + tl.load(slot_ptr + t).to(tl.int64) * stride_pool
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    latent = tl.load(kv_ptr + t * stride_kv + c, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(latent * latent, axis=0) / C + eps)  # as _rmsnorm_kernel
    tl.store(row + c, (latent * inv * w).to(dtype), mask=cmask)
    i = tl.arange(0, BLOCK_P)
    pmask = i < HALF
    key = kv_ptr + t * stride_kv + C
    x1, x2 = _rope_pairs(key, i, pmask, HALF, INTERLEAVED)  # as _rope_kernel: half-split out
    cos = tl.load(cos_ptr + t * stride_c + i, mask=pmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_c + i, mask=pmask, other=0.0).to(tl.float32)
    tl.store(row + C + i, (x1 * cos - x2 * sin).to(dtype), mask=pmask)
    tl.store(row + C + HALF + i, (x2 * cos + x1 * sin).to(dtype), mask=pmask)


def write_latent_rows(
    kv: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    pool: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """pool[slots[t]] = [rmsnorm(latent), rope(k_pe)] for each token's product kv [T, C + R] = [latent |
    k_pe]: the MLA cache rows of a decode step written in one kernel (instead of the norm, the rope, the
    concatenation and the copy into the pool), with the same roundings."""
    tokens, width = kv.shape
    rope_dim = 2 * cos.shape[-1]
    latent = width - rope_dim
    assert pool.shape[-1] == width and pool.dtype == kv.dtype and kv.stride(-1) == pool.stride(-1) == 1
    c, s = cos.contiguous(), sin.contiguous()
    if tokens:
        _latent_rows_kernel[(tokens,)](
            kv,
            norm_weight,
            c,
            s,
            pool,
            slots,
            kv.stride(0),
            c.stride(0),
            pool.stride(0),
            eps,
            C=latent,
            HALF=rope_dim // 2,
            INTERLEAVED=interleaved,
            BLOCK_C=triton.next_power_of_2(latent),
            BLOCK_P=triton.next_power_of_2(rope_dim // 2),
        )


@triton.jit
def _rope_tail_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    heads,
    stride_xt,
    stride_xh,
    stride_c,
    NOPE: tl.constexpr,
    HALF: tl.constexpr,
    NEGATE: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    t, h = tl.program_id(0), tl.program_id(1)
    src = x_ptr + t * stride_xt + h * stride_xh
    dst = out_ptr + (t * heads + h).to(tl.int64) * (NOPE + 2 * HALF)
    if NOPE > 0:
        d = tl.arange(0, BLOCK_NOPE)
        tl.store(dst + d, tl.load(src + d, mask=d < NOPE), mask=d < NOPE)
    i = tl.arange(0, BLOCK_P)
    m = i < HALF
    x1, x2 = _rope_pairs(src + NOPE, i, m, HALF, True)
    cos = tl.load(cos_ptr + t * stride_c + i, mask=m, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_c + i, mask=m, other=0.0).to(tl.float32)
    if NEGATE:  # the rotation back (V4's values): -sin, without a kernel to negate it
        sin = -sin
    dtype = out_ptr.dtype.element_ty
    tl.store(dst + NOPE + 2 * i, (x1 * cos - x2 * sin).to(dtype), mask=m)
    tl.store(dst + NOPE + 2 * i + 1, (x2 * cos + x1 * sin).to(dtype), mask=m)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """As ds4.engine.layers.rope.apply_rope_tail (V4: the trailing R dims of x [T, D] or [T, H, D] rotated
    as interleaved pairs in place, float32 inside), into a new tensor, in one kernel; `negate`: by -sin."""
    squeeze = x.dim() == 2
    x3 = x[:, None, :] if squeeze else x
    assert x3.dim() == 3 and x3.stride(-1) == 1, "rows of [T, D] or [T, H, D] with unit stride"
    tokens, heads, dim = x3.shape
    half = cos.shape[-1]
    c, s = cos.contiguous(), sin.contiguous()
    out = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    if tokens and heads:
        _rope_tail_kernel[(tokens, heads)](
            x3,
            c,
            s,
            out,
            heads,
            x3.stride(0),
            x3.stride(1),
            c.stride(0),
            NOPE=dim - 2 * half,
            HALF=half,
            NEGATE=negate,
            BLOCK_NOPE=triton.next_power_of_2(max(dim - 2 * half, 1)),
            BLOCK_P=triton.next_power_of_2(half),
        )
    return out[:, 0, :] if squeeze else out


@triton.jit
def _rope_table_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, factor, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + i, mask=m, other=0.0)
    dtype = cos_ptr.dtype.element_ty
    tl.store(cos_ptr + t * HALF + i, (tl.cos(freq) * factor).to(dtype), mask=m)
    tl.store(sin_ptr + t * HALF + i, (tl.sin(freq) * factor).to(dtype), mask=m)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float, dtype: torch.dtype):
    """(cos, sin) [T, R/2] in `dtype` of positions [T] times inv_freq [R/2] (float32), scaled by
    `factor`: the rotary tables in one kernel instead of six."""
    tokens, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty(tokens, half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    if tokens:
        inv = inv_freq.float().contiguous()
        _rope_table_kernel[(tokens,)](
            positions, inv, cos, sin, float(factor), HALF=half, BLOCK=triton.next_power_of_2(half)
        )
    return cos, sin
