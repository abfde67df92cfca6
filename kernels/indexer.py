"""The lightning indexer: score[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]), causal, and the top-k
keys per query over contexts of any length, in blocks of keys (a running top-k merged block by
block, so memory stays [T, k + block] at 128K keys and beyond).

Selection follows ds4's rule everywhere: the k highest scores, ties to the lower key index, -0.0 equal
to +0.0; -1 where fewer than k keys are visible."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args


@triton.jit
def _indexer_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    pos_ptr,
    out_ptr,
    heads,
    num_keys,
    key_offset,
    stride_qt,
    stride_qh,
    stride_wt,
    stride_k,
    stride_ot,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask, smask, dmask = h < heads, s < num_keys, d < D
    q = tl.load(
        q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
        mask=hmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    k = tl.load(
        k_ptr + s[:, None].to(tl.int64) * stride_k + d[None, :],
        mask=smask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    w = tl.load(w_ptr + t * stride_wt + h, mask=hmask, other=0.0).to(tl.float32)
    scores = tl.maximum(dot(q, tl.trans(k), DOT, PRECISION), 0.0)  # [H, S]
    total = tl.sum(scores * w[:, None], axis=0)
    position = tl.load(pos_ptr + t)
    total = tl.where(key_offset + s <= position, total, float("-inf"))
    tl.store(out_ptr + t * stride_ot + s, total, mask=smask)


def indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    key_offset: int = 0,
    out: torch.Tensor | None = None,
    block_s: int = 64,
) -> torch.Tensor:
    """As ds4.kernels.reference.indexer_scores for keys k [S, D] that sit at positions key_offset + s."""
    tokens, heads, dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    out = out if out is not None else torch.empty(tokens, k.shape[0], dtype=torch.float32, device=q.device)
    if tokens == 0 or k.shape[0] == 0:
        return out
    w = weights.contiguous()
    pos = positions.to(torch.int64).contiguous()
    grid = (tokens, triton.cdiv(k.shape[0], block_s))
    _indexer_kernel[grid](
        q,
        w,
        k,
        pos,
        out,
        heads,
        k.shape[0],
        key_offset,
        q.stride(0),
        q.stride(1),
        w.stride(0),
        k.stride(0),
        out.stride(0),
        D=dim,
        BLOCK_H=max(16, triton.next_power_of_2(heads)),
        BLOCK_S=block_s,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        **dot_args(q.dtype),
    )
    return out


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    topk: int,
    keys_per_block: int = 16384,
    scores_fn=indexer_scores,
) -> torch.Tensor:
    """[T, topk] key indices (-1 where fewer are visible), streaming over blocks of keys. `scores_fn`:
    the block scorer (the kernel; tests also pass the torch reference)."""
    tokens = q.shape[0]
    best_scores = torch.empty(tokens, 0, dtype=torch.float32, device=q.device)
    best_index = torch.empty(tokens, 0, dtype=torch.int64, device=q.device)
    for first in range(0, k.shape[0], keys_per_block):
        block = k[first : first + keys_per_block]
        if scores_fn is indexer_scores:
            scores = indexer_scores(q, weights, block, positions, key_offset=first)
        else:
            scores = scores_fn(q, weights, block, positions - first)
        index = torch.arange(first, first + block.shape[0], device=q.device).expand(tokens, -1)
        # earlier candidates hold lower indices: a stable sort keeps ties in index order
        merged_scores = torch.cat([best_scores, scores + 0.0], dim=1)
        merged_index = torch.cat([best_index, index], dim=1)
        order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :topk]
        best_scores = torch.gather(merged_scores, 1, order)
        best_index = torch.gather(merged_index, 1, order)
    picked = torch.where(torch.isfinite(best_scores), best_index, torch.full_like(best_index, -1))
    if picked.shape[1] < topk:
        picked = torch.cat([picked, picked.new_full((tokens, topk - picked.shape[1]), -1)], dim=1)
    return picked


@triton.jit
def _paged_indexer_kernel(
    q_ptr,
    w_ptr,
    pool_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    heads,
    width,
    stride_qb,
    stride_qh,
    stride_wb,
    stride_pool,
    stride_tb,
    stride_ob,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    n = tl.load(lens_ptr + b)
    if tl.program_id(1) * BLOCK_S >= n:  # past the sequence: nothing to read
        tl.store(out_ptr + b * stride_ob + s, float("-inf"), mask=s < width)
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask, dmask, valid = h < heads, d < D, s < n
    q = tl.load(
        q_ptr + b * stride_qb + h[:, None] * stride_qh + d[None, :],
        mask=hmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    page = tl.load(table_ptr + b * stride_tb + s // PAGE, mask=valid, other=0)
    row = page.to(tl.int64) * PAGE + s % PAGE
    k = tl.load(
        pool_ptr + row[:, None] * stride_pool + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0
    ).to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + h, mask=hmask, other=0.0).to(tl.float32)
    scores = tl.maximum(dot(q, tl.trans(k), DOT, PRECISION), 0.0)  # [H, S]
    total = tl.sum(scores * w[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + s, tl.where(valid, total, float("-inf")), mask=s < width)


def paged_indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    width: int,
    out: torch.Tensor | None = None,
    block_s: int = 64,
) -> torch.Tensor:
    """As ds4.kernels.reference.paged_indexer_scores: decode queries q [B, H, D] (the last token of each
    sequence) against their cached keys, read from `pool` [rows, D] through `block_table` [B, blocks];
    [B, width] float32, -inf from each sequence's length on. Blocks of keys past a sequence's length are
    not read, so the work follows the lengths while the shapes stay fixed."""
    batch, heads, dim = q.shape
    assert q.stride(-1) == 1 and pool.stride(-1) == 1 and pool.shape[-1] == dim
    out = out if out is not None else torch.empty(batch, width, dtype=torch.float32, device=q.device)
    if batch == 0 or width == 0:
        return out
    w = weights.contiguous()
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    grid = (batch, triton.cdiv(width, block_s))
    _paged_indexer_kernel[grid](
        q,
        w,
        pool,
        table,
        lens,
        out,
        heads,
        width,
        q.stride(0),
        q.stride(1),
        w.stride(0),
        pool.stride(0),
        table.stride(0),
        out.stride(0),
        D=dim,
        PAGE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(heads)),
        BLOCK_S=block_s,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        **dot_args(q.dtype),
    )
    return out


def topk_ties_low(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k highest scores per row, ties to the lower index (-0.0 equal to +0.0), -1
    where fewer than k are finite; the same picks as a stable descending sort, in O(n) with fixed shapes.
    Each float32 score becomes a sortable integer, shifted above its reversed index, so every key is
    unique and torch.topk's choice is the rule's."""
    n = scores.shape[-1]
    bits = (scores + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)  # ascending with the float
    index = torch.arange(n, device=scores.device, dtype=torch.int64)
    keys = (ordered << 32) | (0xFFFFFFFF - index)  # a higher score first, then a lower index
    picked = keys.topk(min(k, n), dim=-1).indices
    finite = torch.isfinite(scores.gather(-1, picked))
    return torch.where(finite, picked, torch.full_like(picked, -1))


@triton.jit
def _sortable_keys_kernel(scores_ptr, keys_ptr, n, BLOCK: tl.constexpr):
    """topk_ties_low's keys: each float32 score as an order-keeping integer above its reversed index."""
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    score = tl.load(scores_ptr + b.to(tl.int64) * n + i, mask=mask, other=0.0) + 0.0  # -0.0 as +0.0
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    low = tl.full([BLOCK], 4294967295, tl.int64) - i.to(tl.int64)  # 2^32 - 1 - index, as an int64
    tl.store(keys_ptr + b.to(tl.int64) * n + i, (ordered << 32) | low, mask=mask)


@triton.jit
def _picked_rows_kernel(
    picked_ptr, scores_ptr, table_ptr, rows_ptr, n, k, stride_t, PAGE: tl.constexpr, BLOCK: tl.constexpr
):
    """Each picked position's pool row through the block table, -1 where its score is not finite."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < k
    pos = tl.load(picked_ptr + b.to(tl.int64) * k + j, mask=mask, other=0)
    finite = tl.abs(tl.load(scores_ptr + b.to(tl.int64) * n + pos, mask=mask, other=0.0)) < float("inf")
    page = tl.load(table_ptr + b * stride_t + pos // PAGE, mask=mask, other=0).to(tl.int64)
    tl.store(rows_ptr + b.to(tl.int64) * k + j, tl.where(finite, page * PAGE + pos % PAGE, -1), mask=mask)


def paged_topk_rows(scores: torch.Tensor, k: int, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """The pool rows [B, min(k, S)] of topk_ties_low(scores [B, S], k)'s positions through each sequence's
    block table (-1 where fewer are finite): two kernels around torch.topk instead of about twenty."""
    batch, n = scores.shape
    scores = scores.float().contiguous()
    keys = torch.empty(batch, n, dtype=torch.int64, device=scores.device)
    rows = torch.empty(batch, min(k, n), dtype=torch.int64, device=scores.device)
    if batch == 0 or n == 0:
        return rows
    block = min(1024, triton.next_power_of_2(n))
    _sortable_keys_kernel[(batch, triton.cdiv(n, block))](scores, keys, n, BLOCK=block)
    picked = keys.topk(min(k, n), dim=-1).indices.contiguous()
    table = block_table.contiguous()
    block = min(1024, triton.next_power_of_2(picked.shape[1]))
    _picked_rows_kernel[(batch, triton.cdiv(picked.shape[1], block))](
        picked, scores, table, rows, n, picked.shape[1], table.stride(0), PAGE=block_size, BLOCK=block
    )
    return rows
