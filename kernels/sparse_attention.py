"""Attention over given rows: each query token attends only to the cache rows its index list names
(V3.2's top-k selection; V4's window plus selected compressed rows), -1 meaning none. One shared K/V
head: MLA's latent (the value) and rope, or V4's single 512-d row that is key and value, with V4's
attention sink. Returns the output and the log-sum-exp.

One program per (block of heads, token, split of its rows): a block of named rows is gathered once for
all its heads; few tokens (decode) split their rows over more programs, merged as in
mla_decode.combine_splits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args, key_rows
from ds4.kernels.mla_decode import GRID_YZ, combine_splits, softmax_result, split_launch, split_range


@triton.jit
def _sparse_attention_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    scale,
    heads,
    num_idx,
    stride_qt,
    stride_qh,
    stride_kv,
    stride_it,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_ls,
    V: tl.constexpr,
    REST: tl.constexpr,
    HAS_SINK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.program_id(1)
    split = tl.program_id(2)
    v = tl.arange(0, BLOCK_V)
    hmask, vmask = h < heads, v < V
    qv = tl.load(
        q_ptr + t * stride_qt + h[:, None] * stride_qh + v[None, :],
        mask=hmask[:, None] & vmask[None, :],
        other=0.0,
    ).to(tl.float32)
    if REST > 0:
        r = tl.arange(0, BLOCK_R)
        rmask = r < REST
        qr = tl.load(
            q_ptr + t * stride_qt + h[:, None] * stride_qh + V + r[None, :],
            mask=hmask[:, None] & rmask[None, :],
            other=0.0,
        ).to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    lo, hi = split_range(num_idx, split, tl.num_programs(2), BLOCK_N, MIN_SPLIT)
    for start in range(lo, hi, BLOCK_N):
        k = start + tl.arange(0, BLOCK_N)
        row = tl.load(idx_ptr + t * stride_it + k, mask=k < hi, other=-1)
        valid = row >= 0
        row = tl.where(valid, row, 0).to(tl.int64)
        value = tl.load(
            kv_ptr + row[:, None] * stride_kv + v[None, :], mask=valid[:, None] & vmask[None, :], other=0.0
        ).to(tl.float32)
        s = dot(qv, tl.trans(value), DOT, PRECISION)
        if REST > 0:
            rest = tl.load(
                kv_ptr + row[:, None] * stride_kv + V + r[None, :],
                mask=valid[:, None] & rmask[None, :],
                other=0.0,
            ).to(tl.float32)
            s += dot(qr, tl.trans(rest), DOT, PRECISION)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        base = tl.where(m_new > float("-inf"), m_new, 0.0)  # no row yet: subtract 0, never inf - inf
        alpha = tl.exp(m - base)
        p = tl.exp(s - base[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p, value, DOT, PRECISION)
        m = m_new
    if HAS_SINK:  # one split only: otherwise combine_splits adds it
        sink = tl.load(sink_ptr + h, mask=hmask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, sink)
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.exp(sink - m_new)
        acc = acc * alpha[:, None]
        m = m_new
    out, lse = softmax_result(acc, total, m)
    tl.store(
        out_ptr + t * stride_ot + h[:, None] * stride_oh + split * stride_os + v[None, :],
        out,
        mask=hmask[:, None] & vmask[None, :],
    )
    tl.store(lse_ptr + t * stride_lt + h * stride_lh + split * stride_ls, lse, mask=hmask)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    value_dim: int,
    sink: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_h: int = 16,
    block_n: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ds4.kernels.reference.sparse_attention; `out` [T, H, value_dim] and `lse` [T, H] float32.
    `splits` of each token's rows: by default `kv_splits` over the k indices. `block_n` rows a step: by
    default dot.key_rows'."""
    tokens, heads, dim = q.shape
    block_n = block_n or key_rows(triton.next_power_of_2(value_dim), q.dtype)
    assert kv.shape[-1] == dim and kv.stride(-1) == 1 and q.stride(-1) == 1
    rest = dim - value_dim
    out = (
        out
        if out is not None
        else torch.empty(tokens, heads, value_dim, dtype=torch.float32, device=q.device)
    )
    lse = lse if lse is not None else torch.empty(tokens, heads, dtype=torch.float32, device=q.device)
    if tokens > GRID_YZ:  # a long prefill chunk: tokens sit on the grid's second axis, in slices it takes
        for t in range(0, tokens, GRID_YZ):
            part = slice(t, t + GRID_YZ)
            sparse_attention(
                q[part], kv, indices[part], scale, value_dim, sink, out[part], lse[part],
                block_h, block_n, splits,
            )  # fmt: skip
        return out, lse
    idx = indices.to(torch.int32).contiguous()
    if tokens == 0:
        return out, lse
    head_blocks, splits, min_split, part, part_lse, stride_split, stride_lse_split = split_launch(
        tokens, heads, value_dim, block_h, block_n, idx.shape[1], splits, out, lse, q.device
    )
    _sparse_attention_kernel[(head_blocks, tokens, splits)](
        q,
        kv,
        idx,
        sink if sink is not None else q,
        part,
        part_lse,
        scale,
        heads,
        idx.shape[1],
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        idx.stride(0),
        part.stride(0),
        part.stride(1),
        stride_split,
        part_lse.stride(0),
        part_lse.stride(1),
        stride_lse_split,
        V=value_dim,
        REST=rest,
        HAS_SINK=sink is not None and splits == 1,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_V=max(16, triton.next_power_of_2(value_dim)),
        BLOCK_R=max(16, triton.next_power_of_2(max(rest, 1))),
        MIN_SPLIT=min_split,
        **dot_args(q.dtype),
    )
    if splits > 1:
        combine_splits(part, part_lse, out, lse, sink)
    return out, lse
