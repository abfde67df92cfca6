"""Paged MLA decode, absorbed: one query token per sequence against its cached latent rows, read
through the block table, with an online softmax. Queries come folded with W_UK (q_latent) plus their
roped part; the output is the probability-weighted latent, before W_UV, and the log-sum-exp.

One program per (block of heads, sequence, split of the sequence's positions): the latent rows of a
block of positions are loaded once and serve every head in the block, which is what makes MLA decode
cheap in bandwidth. A sequence's head blocks are neighbours in the grid, so they run together and
share its rows through L2. Splitting the positions (flash-decoding) keeps every SM busy when there
are few sequences: each split writes its normalised partial output and log-sum-exp, and
`combine_splits` merges them. The number of splits depends only on shapes (the batch, the heads, the
block table's width), never on the lengths on the device, so a captured graph replays it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args, key_rows


@triton.jit
def load_rows(
    pool_ptr,
    row,
    pmask,
    c,
    r,
    cmask,
    rmask,
    stride_pool,
    C: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Pool rows `row` [BLOCK_N] as float32: their latent [BLOCK_N, BLOCK_C] and roped key [BLOCK_N,
    BLOCK_R] (masked by pmask, cmask, rmask). FP8: e4m3 latent, a float32 scale per 128 (C // 32 bytes),
    then bf16 rope (656-byte rows at 512 + 64); a row's scales are read once and broadcast over their
    128 inputs."""
    lmask = pmask[:, None] & cmask[None, :]
    rmask2 = pmask[:, None] & rmask[None, :]
    base = pool_ptr + row[:, None] * stride_pool
    if FP8:
        SCALES: tl.constexpr = BLOCK_C // 128
        codes = tl.load(base + c[None, :], mask=lmask, other=0)
        latent = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        g = tl.arange(0, SCALES)
        scales = tl.load(
            (base + C).to(tl.pointer_type(tl.float32)) + g[None, :],
            mask=pmask[:, None] & (g < C // 128)[None, :],
            other=0.0,
        )
        latent = tl.reshape(
            tl.reshape(latent, [BLOCK_N, SCALES, 128]) * scales[:, :, None], [BLOCK_N, BLOCK_C]
        )
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
def split_range(n, split, splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """Positions [lo, hi) of `split` of `splits` over n: whole BLOCK_N blocks, at least MIN_SPLIT
    positions each, so the last splits are empty where n is short. The bounds depend on n, `splits` and
    the constants alone: the same sums whatever the batch or the table's width."""
    per = tl.maximum(tl.cdiv(tl.cdiv(n, splits), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    lo = split * per
    return lo, tl.minimum(n, lo + per)


@triton.jit
def _combine_kernel(
    part_ptr,
    part_lse_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    heads,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_rt,
    stride_rh,
    SPLITS: tl.constexpr,
    V: tl.constexpr,
    HAS_SINK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    t, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    v = tl.arange(0, BLOCK_V)
    part_lse = tl.load(part_lse_ptr + t * stride_lt + h * stride_lh + s, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(part_lse, axis=0)
    if HAS_SINK:  # the sink is one more split: logit `sink`, output zero
        sink = tl.load(sink_ptr + h).to(tl.float32)
        m = tl.maximum(m, sink)
    base = tl.where(m > float("-inf"), m, 0.0)  # every split empty: subtract 0, never inf - inf
    weight = tl.exp(part_lse - base)
    total = tl.sum(weight, axis=0)
    if HAS_SINK:
        total += tl.exp(sink - base)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for i in range(SPLITS):  # in split order: the same sum whatever the grid's timing
        w = tl.exp(tl.load(part_lse_ptr + t * stride_lt + h * stride_lh + i) - base)
        part = tl.load(part_ptr + t * stride_pt + h * stride_ph + i * stride_ps + v, mask=v < V, other=0.0)
        acc += w * part
    has = total > 0
    out = tl.where(has, acc / tl.where(has, total, 1.0), 0.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + v, out, mask=v < V)
    result_lse = tl.where(has, base + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + t * stride_rt + h * stride_rh, result_lse)


GRID_YZ = 65_535  # programs a CUDA grid takes on its second and third axes
GPU_MIN_SPLIT = 256  # the least positions a split takes on a card


def kv_splits(batch: int, head_blocks: int, capacity: int, device) -> tuple[int, int]:
    """(splits, the least positions a split takes) for a decode launch of `batch` sequences (or tokens)
    of `head_blocks` programs each over at most `capacity` positions (a constant of the cache, not the
    table's width). On a GPU: no split where the programs already fill it (one per SM), else enough for
    two programs per SM, at least 256 positions each, at most 32 splits. The batch counts as the next
    power of two: the same splits as the decode graph's padded batch (1, 2, 4, 8, multiples of 8), so
    graphs on and off sum alike. Under the interpreter (the CPU) the rule is scaled down (4 'SMs',
    32-position splits) so small tests reach it."""
    sms, min_split = split_rule(device)
    return split_count(batch, head_blocks, capacity, sms, min_split), min_split


def split_rule(device) -> tuple[int, int]:
    """(SMs, the least positions a split takes) of kv_splits' rule on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index), GPU_MIN_SPLIT
    return 4, 32


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(batch: int, head_blocks: int, capacity: int, sms: int, min_split: int) -> int:
    """kv_splits' rule on a GPU of `sms` SMs."""
    work = triton.next_power_of_2(max(batch, 1)) * head_blocks
    if work >= sms or capacity < 2 * min_split:
        return 1
    return max(1, min(32, -(-2 * sms // work), capacity // min_split))


def split_launch(tokens, heads, width, block_h, block_n, capacity, splits, out, lse, device):
    """(head blocks, splits, MIN_SPLIT, partial outputs, partial log-sum-exps, their split strides) for a
    split launch: `splits` as asked (in whole blocks of block_n) or kv_splits' choice over `capacity`.
    One split writes straight into `out` and `lse`; more write float32 partials [tokens, heads, splits,
    width] and [tokens, heads, splits] for combine_splits."""
    head_blocks = triton.cdiv(heads, block_h)
    if splits is None:
        splits, min_split = kv_splits(tokens, head_blocks, capacity, device)
    else:
        min_split = block_n
    if splits == 1:
        return head_blocks, 1, min_split, out, lse, 0, 0
    part = torch.empty(tokens, heads, splits, width, dtype=torch.float32, device=out.device)
    part_lse = torch.empty(tokens, heads, splits, dtype=torch.float32, device=out.device)
    return head_blocks, splits, min_split, part, part_lse, part.stride(2), part_lse.stride(2)


def combine_splits(part, part_lse, out, lse, sink: torch.Tensor | None = None) -> None:
    """Merges the splits' partial outputs [T, H, S, V] by their log-sum-exps [T, H, S] into `out`
    [T, H, V] and `lse` [T, H], with V4's attention sink (one logit per head) where given."""
    tokens, heads, splits, width = part.shape
    if tokens == 0:
        return
    _combine_kernel[(tokens, heads)](
        part,
        part_lse,
        sink if sink is not None else part_lse,
        out,
        lse,
        heads,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        SPLITS=splits,
        V=width,
        HAS_SINK=sink is not None,
        BLOCK_S=max(16, triton.next_power_of_2(splits)),
        BLOCK_V=max(16, triton.next_power_of_2(width)),
    )


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
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    C: tl.constexpr,
    R: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    FP8: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.program_id(1)
    split = tl.program_id(2)
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
    lo, hi = split_range(tl.load(lens_ptr + b), split, tl.num_programs(2), BLOCK_N, MIN_SPLIT)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        page = tl.load(table_ptr + b * stride_tb + pos // PAGE, mask=pmask, other=0)
        row = page.to(tl.int64) * PAGE + pos % PAGE
        latent, roped = load_rows(
            pool_ptr, row, pmask, c, r, cmask, rmask, stride_pool, C, FP8, BLOCK_N, BLOCK_C
        )
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
        out_ptr + b * stride_ob + h[:, None] * stride_oh + split * stride_os + c[None, :],
        out,
        mask=hmask[:, None] & cmask[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + split * stride_ls, lse, mask=hmask)


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
    block_n: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ds4.kernels.reference.paged_mla_decode; `out` [B, H, C] and `lse` [B, H] float32 buffers. A
    uint8 pool holds FP8 rows (reference.quantize_latent_rows: 656 bytes for latent 512 + rope 64),
    dequantized in the kernel. `splits` of each sequence's positions: by default `kv_splits` over the
    pool's rows. `block_n` positions a step: by default dot.key_rows'."""
    batch, heads, latent = q_latent.shape
    rope_dim = q_rope.shape[-1]
    block_n = block_n or key_rows(triton.next_power_of_2(latent), q_latent.dtype)
    fp8 = check_pool(pool, q_latent, q_rope)
    out = (
        out if out is not None else torch.empty(batch, heads, latent, dtype=torch.float32, device=pool.device)
    )
    lse = lse if lse is not None else torch.empty(batch, heads, dtype=torch.float32, device=pool.device)
    if batch > GRID_YZ:  # sequences (or a chunk's tokens) sit on the grid's second axis: slices it takes
        for b in range(0, batch, GRID_YZ):
            part = slice(b, b + GRID_YZ)
            paged_mla_decode(
                q_latent[part], q_rope[part], pool, block_table[part], seq_lens[part], block_size, scale,
                out[part], lse[part], block_h, block_n, splits,
            )  # fmt: skip
        return out, lse
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    head_blocks, splits, min_split, part, part_lse, stride_split, stride_lse_split = split_launch(
        batch, heads, latent, block_h, block_n, pool.shape[0], splits, out, lse, pool.device
    )
    _mla_decode_kernel[(head_blocks, batch, splits)](
        q_latent,
        q_rope,
        pool,
        table,
        lens,
        part,
        part_lse,
        scale,
        heads,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        pool.stride(0),
        table.stride(0),
        part.stride(0),
        part.stride(1),
        stride_split,
        part_lse.stride(0),
        part_lse.stride(1),
        stride_lse_split,
        C=latent,
        R=rope_dim,
        PAGE=block_size,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_C=max(16, triton.next_power_of_2(latent)),
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        MIN_SPLIT=min_split,
        FP8=fp8,
        **dot_args(q_latent.dtype),
    )
    if splits > 1:
        combine_splits(part, part_lse, out, lse)
    return out, lse
