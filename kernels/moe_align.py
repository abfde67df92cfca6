"""The fused MoE's alignment: (token, expert) pairs sorted by expert, each expert's run padded to the
block height, and the expert of every block. `align` is the torch form (about 17 kernels on a GPU:
sort, count, sums, gathers, scatter, search); decode-sized batches (up to MAX_PAIRS pairs) take
`_align_kernel` instead, one program that does all of it, with the same result bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PAIRS = 4096  # one program sorts up to this many pairs (a decode batch of 512 tokens at top-8)


def align(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted pair ids padded per expert with the sentinel T*K [P], the expert of each block of
    `block_m` [P / block_m]): pair p = token * K + k. Experts with no pairs get no block; pairs whose id
    is -1 are in no block (their experts are computed elsewhere: tiered experts' cold pairs).

    Shapes depend only on T, K, E and block_m, never on the routing: P is the most any routing can
    need (every pair, plus a partial block for each expert that could be used), and the blocks past
    the used ones hold only sentinels, which the kernels skip. So no value goes back to the host and a
    decode step can be captured as a graph."""
    flat = expert_ids.flatten().long()
    pairs = flat.numel()
    capacity = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    flat = torch.where(flat < 0, num_experts, flat)  # skipped pairs: an extra expert past the real ones
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))  # bincount, at a fixed size
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    start_padded, start = ends - padded, torch.cumsum(counts, 0) - counts
    experts_sorted = flat[order]
    real = experts_sorted < num_experts
    first = experts_sorted.clamp(max=num_experts - 1)
    slot = start_padded[first] + torch.arange(pairs, device=flat.device) - start[first]
    slot = torch.where(real, slot, capacity)  # skipped pairs land in a slot past the end, dropped
    sorted_ids = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[slot] = order.to(torch.int32)
    sorted_ids = sorted_ids[:capacity]
    # block b holds expert e's pairs when ends[e - 1] <= b * block_m < ends[e]; blocks past the last
    # expert's end hold sentinels only (their expert index is clamped, never read)
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32)


def align_pairs(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """`align`'s result (pairs of id -1 skipped), in one kernel for up to MAX_PAIRS pairs (else `align`)."""
    pairs = expert_ids.numel()
    if pairs == 0 or pairs > MAX_PAIRS:
        return align(expert_ids, num_experts, block_m)
    flat = expert_ids.reshape(-1)
    capacity = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=flat.device)
    block_e = triton.next_power_of_2(num_experts + 1)  # its last bin: padding and skipped pairs
    scratch = torch.empty(block_e, dtype=torch.int32, device=flat.device)
    _align_kernel[(1,)](
        flat,
        sorted_ids,
        block_expert,
        scratch,
        pairs,
        num_experts,
        capacity,
        BLOCK_P=triton.next_power_of_2(pairs),
        BLOCK_E=block_e,
        BLOCK_M=block_m,
        CHUNK=1024,
    )
    return sorted_ids, block_expert


@triton.jit
def _align_kernel(
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    scratch_ptr,
    pairs,
    experts,
    capacity,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """`align` in one program: the pairs sorted by (expert, pair) as one key, counts by histogram, each
    expert's padded start by cumulative sums; then the sentinel fill and the scatter of pair ids to
    their slots, and each expert's blocks marked with it over a fill of the last expert (as `align`'s
    clamped search gives past the used blocks)."""
    p = tl.arange(0, BLOCK_P)
    e = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + p, mask=p < pairs, other=BLOCK_E - 1).to(tl.int32)  # padding sorts last
    ids = tl.where(ids < 0, BLOCK_E - 1, ids)  # skipped pairs too: the last bin is no expert
    counts = tl.histogram(ids, BLOCK_E)
    counts -= tl.where(e == BLOCK_E - 1, BLOCK_P - pairs, 0)  # the padding's own count
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start_padded = tl.cumsum(padded, 0) - padded
    start = tl.cumsum(counts, 0) - counts
    tl.store(scratch_ptr + e, start_padded - start)  # the padding before each expert's run
    for first in range(0, capacity, CHUNK):  # sentinels everywhere; the blocks past the used ones: E - 1
        slots = first + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + slots, pairs, mask=slots < capacity)
        tl.store(block_expert_ptr + slots, experts - 1, mask=slots < capacity // BLOCK_M)
    tl.debug_barrier()
    blocks = padded // BLOCK_M
    for j in range(0, tl.cdiv(pairs, BLOCK_M)):  # expert e's blocks: its padded start on, `blocks` of them
        tl.store(block_expert_ptr + start_padded // BLOCK_M + j, e, mask=(j < blocks) & (e < experts))
    key = tl.sort(ids * BLOCK_P + p)  # by expert, then by pair: align's stable order
    expert, pair = key // BLOCK_P, key % BLOCK_P
    valid = (p < pairs) & (expert < experts)  # the first keys are the pairs to compute, by expert
    slot = p + tl.load(scratch_ptr + expert, mask=valid, other=0)
    tl.store(sorted_ptr + slot, pair, mask=valid)
