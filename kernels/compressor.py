"""DeepSeek-V4's compressor, one decode step in one kernel: each sequence's new projected row joins its
window's buffer, the window's entry is pooled from the buffer as it stands (gated softmax over the
window's slots, with the earlier window's Ca half for the overlapping kind), RMS-normed, its trailing
dims roped as interleaved pairs, and written to the sequence's block in the paged pool; a finished
window's Ca half becomes the overlap state. About 30 torch ops per compressor and layer on the Triton
path before (ds4.engine.layers.compressor.Compressor.decode, which stays the reference).

One program per sequence. Rows are read as their even and odd columns apart, so the rope's pairs
(x_2i, x_2i+1) are two vectors and nothing is shuffled in registers. The window's slots are pooled in
blocks of at most 16 with a column-wise online softmax, so the ratio-128 kind holds no [128 x d] tile.
Everything in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slots(
    buf_ptr,
    new_ptr,
    ape_ptr,
    slot,
    live,
    r,
    col,
    R: tl.constexpr,
    WIDTH: tl.constexpr,
    APE: tl.constexpr,
):
    """Columns `col` (-1: none) of window slots `r` [BLOCK_R, len(col)], slot `live` the new row's, plus
    the gate's learned position term where APE."""
    mask = (r < R)[:, None] & (col >= 0)[None, :]
    old = tl.load(buf_ptr + slot * R * WIDTH + r[:, None] * WIDTH + col[None, :], mask=mask, other=0.0)
    new = tl.load(new_ptr + col, mask=col >= 0, other=0.0)
    rows = tl.where((r == live)[:, None], new[None, :], old)
    if APE:
        rows += tl.load(ape_ptr + r[:, None] * WIDTH + col[None, :], mask=mask, other=0.0)
    return rows


@triton.jit
def _pool(kv, gate, m, total, acc):
    """One block of slots into a column-wise online softmax: (max, sum of weights, weighted sum of kv)."""
    m_new = tl.maximum(m, tl.max(gate, axis=0))
    base = tl.where(m_new > float("-inf"), m_new, 0.0)  # nothing yet: subtract 0, never inf - inf
    alpha = tl.exp(m - base)
    p = tl.exp(gate - base[None, :])
    return m_new, total * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(kv * p, axis=0)


@triton.jit
def _compressor_decode_kernel(
    kv_ptr,
    gate_ptr,
    buf_kv_ptr,
    buf_gate_ptr,
    ovl_kv_ptr,
    ovl_gate_ptr,
    ape_ptr,
    norm_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    rows_ptr,
    table_ptr,
    entries_ptr,
    eps,
    stride_new,
    stride_table,
    per_block,
    R: tl.constexpr,
    D: tl.constexpr,
    WIDTH: tl.constexpr,
    HALF_ROPE: tl.constexpr,
    OVERLAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0)
    pos = tl.load(pos_ptr + b)
    slot = tl.load(rows_ptr + b).to(tl.int64)
    live = pos % R
    kv_new, gate_new = kv_ptr + b * stride_new, gate_ptr + b * stride_new
    j = tl.arange(0, BLOCK_H)  # pair j: columns 2j (even) and 2j + 1 (odd) of a d-wide half
    jm = j < D // 2
    # the new row into the window's buffer (the slot is read from the new row below, not from memory)
    for start in range(0, WIDTH, BLOCK_H):
        c = start + j
        dst = slot * R * WIDTH + live * WIDTH + c
        tl.store(buf_kv_ptr + dst, tl.load(kv_new + c, mask=c < WIDTH), mask=c < WIDTH)
        tl.store(buf_gate_ptr + dst, tl.load(gate_new + c, mask=c < WIDTH), mask=c < WIDTH)
    m_e = tl.full([BLOCK_H], float("-inf"), tl.float32)
    m_o = tl.full([BLOCK_H], float("-inf"), tl.float32)
    t_e, t_o = tl.zeros([BLOCK_H], tl.float32), tl.zeros([BLOCK_H], tl.float32)
    a_e, a_o = tl.zeros([BLOCK_H], tl.float32), tl.zeros([BLOCK_H], tl.float32)
    if OVERLAP:  # the earlier window's Ca half first: none before the second window
        if pos >= R:
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                mask = (r < R)[:, None] & jm[None, :]
                at = slot * R * D + r[:, None] * D + 2 * j[None, :]
                g_e = tl.load(ovl_gate_ptr + at, mask=mask, other=float("-inf"))
                g_o = tl.load(ovl_gate_ptr + at + 1, mask=mask, other=float("-inf"))
                m_e, t_e, a_e = _pool(tl.load(ovl_kv_ptr + at, mask=mask, other=0.0), g_e, m_e, t_e, a_e)
                m_o, t_o, a_o = _pool(tl.load(ovl_kv_ptr + at + 1, mask=mask, other=0.0), g_o, m_o, t_o, a_o)
    first = D if OVERLAP else 0  # the current window's half: Cb for the overlapping kind
    even, odd = tl.where(jm, first + 2 * j, -1), tl.where(jm, first + 2 * j + 1, -1)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        g_e = _slots(buf_gate_ptr, gate_new, ape_ptr, slot, live, r, even, R, WIDTH, True)
        g_o = _slots(buf_gate_ptr, gate_new, ape_ptr, slot, live, r, odd, R, WIDTH, True)
        g_e = tl.where((r < R)[:, None], g_e, float("-inf"))
        g_o = tl.where((r < R)[:, None], g_o, float("-inf"))
        kv_e = _slots(buf_kv_ptr, kv_new, ape_ptr, slot, live, r, even, R, WIDTH, False)
        kv_o = _slots(buf_kv_ptr, kv_new, ape_ptr, slot, live, r, odd, R, WIDTH, False)
        m_e, t_e, a_e = _pool(kv_e, g_e, m_e, t_e, a_e)
        m_o, t_o, a_o = _pool(kv_o, g_o, m_o, t_o, a_o)
    if OVERLAP:
        if live == R - 1:  # a finished window: its Ca half (gate with ape) is the next entry's earlier half
            tl.debug_barrier()  # every thread has read the earlier half before it is overwritten
            ca_e, ca_o = tl.where(jm, 2 * j, -1), tl.where(jm, 2 * j + 1, -1)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                mask = (r < R)[:, None] & jm[None, :]
                at = slot * R * D + r[:, None] * D + 2 * j[None, :]
                for_e = _slots(buf_kv_ptr, kv_new, ape_ptr, slot, live, r, ca_e, R, WIDTH, False)
                for_o = _slots(buf_kv_ptr, kv_new, ape_ptr, slot, live, r, ca_o, R, WIDTH, False)
                tl.store(ovl_kv_ptr + at, for_e, mask=mask)
                tl.store(ovl_kv_ptr + at + 1, for_o, mask=mask)
                for_e = _slots(buf_gate_ptr, gate_new, ape_ptr, slot, live, r, ca_e, R, WIDTH, True)
                for_o = _slots(buf_gate_ptr, gate_new, ape_ptr, slot, live, r, ca_o, R, WIDTH, True)
                tl.store(ovl_gate_ptr + at, for_e, mask=mask)
                tl.store(ovl_gate_ptr + at + 1, for_o, mask=mask)
    pooled_e = tl.where(jm, a_e / tl.where(jm, t_e, 1.0), 0.0)
    pooled_o = tl.where(jm, a_o / tl.where(jm, t_o, 1.0), 0.0)
    inv = tl.rsqrt((tl.sum(pooled_e * pooled_e) + tl.sum(pooled_o * pooled_o)) / D + eps)
    x1 = tl.load(norm_ptr + 2 * j, mask=jm, other=0.0) * (pooled_e * inv)
    x2 = tl.load(norm_ptr + 2 * j + 1, mask=jm, other=0.0) * (pooled_o * inv)
    i = j - (D // 2 - HALF_ROPE)  # the pair's index in the rope part, negative before it
    roped = jm & (i >= 0)
    cos = tl.load(cos_ptr + b * HALF_ROPE + i, mask=roped, other=1.0)
    sin = tl.load(sin_ptr + b * HALF_ROPE + i, mask=roped, other=0.0)
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    entry = pos // R
    block = tl.load(table_ptr + b * stride_table + entry // per_block).to(tl.int64)
    dst = entries_ptr + (block * per_block + entry % per_block) * D
    dtype = entries_ptr.dtype.element_ty  # the attention's rows: the model's dtype
    tl.store(dst + 2 * j, out1.to(dtype), mask=jm)
    tl.store(dst + 2 * j + 1, out2.to(dtype), mask=jm)


def compressor_decode(
    kv: torch.Tensor,
    gate: torch.Tensor,
    pool,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    block_table: torch.Tensor,
) -> None:
    """As ds4.engine.layers.compressor.Compressor.decode after its two projections: kv and gate [B, width]
    (float32) into the pooled state of slots `rows` [B] at `positions` [B], the window's entry into the
    sequence's block of `block_table` [B, blocks]. cos/sin [B, R/2] at each window's first position."""
    batch, width = kv.shape
    d, ratio = pool.dim, pool.ratio
    assert kv.dtype == gate.dtype == torch.float32 and width == (2 * d if pool.overlap else d) and d % 2 == 0
    if batch == 0:
        return
    kv, gate = kv.contiguous(), gate.contiguous()
    table = block_table.contiguous()
    ovl_kv = pool.overlap_kv if pool.overlap else pool.buffer_kv  # unread where there is no overlap
    ovl_gate = pool.overlap_gate if pool.overlap else pool.buffer_gate
    _compressor_decode_kernel[(batch,)](
        kv,
        gate,
        pool.buffer_kv,
        pool.buffer_gate,
        ovl_kv,
        ovl_gate,
        ape.float().contiguous(),
        norm_weight.float().contiguous(),
        cos.float().contiguous(),
        sin.float().contiguous(),
        positions.contiguous(),
        rows.contiguous(),
        table,
        pool.entries,
        eps,
        kv.stride(0),
        table.stride(0),
        pool.per_block,
        R=ratio,
        D=d,
        WIDTH=width,
        HALF_ROPE=cos.shape[-1],
        OVERLAP=pool.overlap,
        BLOCK_R=min(16, max(2, triton.next_power_of_2(ratio))),
        BLOCK_H=max(16, triton.next_power_of_2(d // 2)),
        num_warps=8 if d >= 256 else 4,
    )
