"""Fused MoE: token-to-expert alignment (pairs sorted by expert, each expert's run padded to the block
height), then two grouped GEMMs over those blocks: gate and up with SwiGLU fused, then down, scaled by
the routing weight. Expert weights may be float (fp32/fp16/bf16), FP8 e4m3 with one scale per 128 x 128
block (DeepSeek's checkpoints), FP4 e2m1 packed two per byte with an e8m0 scale per 32 inputs (V4's
experts), or symmetric int4 packed two per byte with a bf16 scale per 32 inputs (`model quantize
--experts int4`); quantized weights are dequantized inside the kernel, tile by tile, never in memory.

Weights are [E, out, in] (w13: gate rows then up rows; w2: down), as the engine stacks them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4.kernels.dot import dot, dot_args
from ds4.kernels.moe_align import align_pairs
from ds4.kernels.tuning import autotuning, expert_configs, row_class, tuned

QUANT = {"none": 0, "fp8": 1, "fp4": 2, "int4": 3}
PACKED = (2, 3)  # two 4-bit codes per byte: the stored inner dimension is half the logical one


def tile_width(code: int, block_k: int) -> int:
    """BLOCK_K for a format's `_weight_tile`: 4-bit tiles take whole groups of 32 inputs (at least one),
    FP8 tiles lie within one 128-wide column of scale blocks."""
    if code in PACKED:
        block_k = max(block_k, 32)
        assert block_k % 32 == 0, f"4-bit tiles take whole 32-input groups, not {block_k}"
    if code == 1:
        assert 128 % block_k == 0, f"an FP8 tile must lie in one 128-wide scale block, not {block_k}"
    return block_k


@triton.jit
def _fp4_value(code):
    """e2m1 codes (0..15, int32) as float32: sign, two exponent bits, one mantissa bit."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    magnitude = tl.where(
        exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * tl.exp2((exponent - 1).to(tl.float32))
    )
    return tl.where((code >> 3) == 1, -magnitude, magnitude)


@triton.jit
def _weight_tile(
    w_ptr,
    s_ptr,
    e,
    n,
    nmask,
    k0,
    k_in,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 tile W[e, n, k0 : k0 + BLOCK_K] ([BLOCK_N, BLOCK_K], zero past k_in and where nmask is
    off) from float, FP8-block, FP4-group or int4-group storage, any strides (the engine keeps its
    expert stacks transposed). Each stored byte is read once: a 4-bit tile loads its [len(n),
    BLOCK_K / 2] bytes and interleaves their low (even inputs) and high nibbles; group scales are read
    once per 32 inputs and broadcast, FP8's once per row for the tile (BLOCK_K divides 128, so the tile
    lies in one column of 128 x 128 blocks)."""
    base = w_ptr + e * stride_we + n[:, None] * stride_wn
    if QUANT == 0 or QUANT == 1:
        k = k0 + tl.arange(0, BLOCK_K)
        mask = nmask[:, None] & (k < k_in)[None, :]
        w = tl.load(base + k[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
        if QUANT == 1:
            scale = tl.load(s_ptr + e * stride_se + (n // 128) * stride_sn + k0 // 128, mask=nmask, other=0.0)
            w = w * scale.to(tl.float32)[:, None]
    else:
        GROUPS: tl.constexpr = BLOCK_K // 32
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds inputs 2j (low nibble) and 2j + 1
        byte = tl.load(
            base + kb[None, :] * stride_wk, mask=nmask[:, None] & (2 * kb < k_in)[None, :], other=0
        )
        byte = byte.to(tl.int32) & 0xFF
        low, high = byte & 0xF, byte >> 4
        g = k0 // 32 + tl.arange(0, GROUPS)
        smask = nmask[:, None] & (32 * g < k_in)[None, :]
        if QUANT == 3:
            low, high = (low - 8).to(tl.float32), (high - 8).to(tl.float32)
            scale = tl.load(
                s_ptr + e * stride_se + n[:, None] * stride_sn + g[None, :], mask=smask, other=0.0
            )
            scale = scale.to(tl.float32)
        else:
            low, high = _fp4_value(low), _fp4_value(high)
            e8m0 = tl.load(s_ptr + e * stride_se + n[:, None] * stride_sn + g[None, :], mask=smask, other=127)
            scale = tl.exp2((e8m0.to(tl.int32) & 0xFF).to(tl.float32) - 127.0)
        scale = scale[:, :, None]  # [BLOCK_N, GROUPS, 1]: one per 16 bytes
        low = tl.reshape(tl.reshape(low, [BLOCK_N, GROUPS, 16]) * scale, [BLOCK_N, BLOCK_K // 2])
        high = tl.reshape(tl.reshape(high, [BLOCK_N, GROUPS, 16]) * scale, [BLOCK_N, BLOCK_K // 2])
        w = tl.interleave(low, high)
    return w


@triton.jit
def _block_pairs(sorted_ptr, block_expert_ptr, num_pairs, pid_m, BLOCK_M: tl.constexpr):
    """Block `pid_m` of the aligned pairs: its expert, its slots, their pair ids, which of them are real.
    The expert as int64: its offset in a real model's stack passes 2^31 (V3's FP8 gate/up: 7.5 GB)."""
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + slots)
    return e, slots, pair, pair < num_pairs


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    sorted_ptr,
    block_expert_ptr,
    routing_ptr,
    out_ptr,
    num_pairs,
    n_out,
    k_in,
    rows_class,  # the autotuner's key (tuning.row_class of the pairs), unused here
    limit,
    stride_a,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_out,
    TOPK: tl.constexpr,
    QUANT: tl.constexpr,
    GATE_UP: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of a grouped GEMM: a block's rows times its expert's weight. GATE_UP:
    the rows are the pairs' tokens of x, multiplied by the gate and the up rows, SwiGLU'd into the slots'
    rows of h; else (down) the rows are h's slots, and the products, scaled by each pair's routing
    weight, go to the pairs' rows of out."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if tl.load(sorted_ptr + pid_m * BLOCK_M) >= num_pairs:
        return  # past the used blocks: sentinels only (a used block starts with a real pair)
    e, slots, pair, valid = _block_pairs(sorted_ptr, block_expert_ptr, num_pairs, pid_m, BLOCK_M)
    if GATE_UP:
        rows = tl.where(valid, pair // TOPK, 0).to(tl.int64)  # the pair's token
    else:
        rows = slots
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # gate, or down
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_in
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0
        )
        a = a.to(tl.float32)
        w = _weight_tile(
            w_ptr,
            s_ptr,
            e,
            n,
            nmask,
            k0,
            k_in,
            stride_we,
            stride_wn,
            stride_wk,
            stride_se,
            stride_sn,
            QUANT,
            BLOCK_N,
            BLOCK_K,
        )
        acc += dot(a, tl.trans(w), DOT, PRECISION)
        if GATE_UP:  # the up rows follow the gate rows
            wu = _weight_tile(
                w_ptr,
                s_ptr,
                e,
                n + n_out,
                nmask,
                k0,
                k_in,
                stride_we,
                stride_wn,
                stride_wk,
                stride_se,
                stride_sn,
                QUANT,
                BLOCK_N,
                BLOCK_K,
            )
            up += dot(a, tl.trans(wu), DOT, PRECISION)
    mask = valid[:, None] & nmask[None, :]
    if GATE_UP:
        if HAS_LIMIT:  # V4's clamped SwiGLU
            acc = tl.minimum(acc, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        tl.store(out_ptr + slots[:, None] * stride_out + n[None, :], acc * tl.sigmoid(acc) * up, mask=mask)
    else:
        routing = tl.load(routing_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        safe = tl.where(valid, pair, 0).to(tl.int64)
        tl.store(out_ptr + safe[:, None] * stride_out + n[None, :], acc * routing[:, None], mask=mask)


_expert_gemm_tuned = tuned(
    _expert_gemm_kernel, expert_configs(), ["n_out", "k_in", "rows_class", "QUANT", "GATE_UP", "BLOCK_M"]
)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    limit: float | None = None,
    quant: str = "none",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int | None = None,
    block_k: int | None = None,
    add: torch.Tensor | None = None,
    skips: bool = False,
) -> torch.Tensor:
    """y [T, D] = sum_k topk_weights[t, k] * W2[e](SwiGLU(W13[e] x[t])), e = topk_ids[t, k], in float32
    and returned in x's dtype. `skips`: topk_ids may hold -1, pairs left out of the sum (computed
    elsewhere: the cold pairs of tiered experts, whose hot ones this computes).
    FP8: w [E, out, in] float8_e4m3fn, scale [E, out/128, in/128] float32.
    FP4: w [E, out, in/2] int8 (two codes per byte), scale [E, out, in/32] float8_e8m0fnu.
    int4: w [E, out, in/2] uint8 (code + 8, two per byte), scale [E, out, in/32] bf16. Tiles of block_m
    pairs by block_n x block_k weights: as given, else timed on a GPU (ds4.kernels.tuning), else 32 x 32.
    `add` [T, D] (the shared experts' output): added to y in x's dtype, in the same kernel as the sum."""
    tokens, dim = x.shape
    topk = topk_ids.shape[1]
    experts = w13.shape[0]
    code = QUANT[quant]
    inter = w2.shape[-1] * 2 if code in PACKED else w2.shape[-1]
    if block_n is None and block_k is None and autotuning(x.device):
        blocks = (block_m, None, None)
    else:
        blocks = (block_m, block_n or 32, tile_width(code, block_k or 32))
    x = x.contiguous()
    sorted_ids, block_expert = align_pairs(topk_ids, experts, block_m)
    padded = sorted_ids.numel()
    h = torch.empty(padded, inter, dtype=torch.float32, device=x.device)
    make = torch.zeros if skips else torch.empty  # a skipped pair's row is never written: zero, summed
    out_pairs = make(tokens * topk, dim, dtype=torch.float32, device=x.device)  # the down kernel's rows
    if padded == 0:
        return torch.zeros_like(x) if add is None else add.clone()

    launch = dict(
        aligned=(sorted_ids, block_expert),
        num_pairs=tokens * topk,
        topk=topk,
        quant=code,
        blocks=blocks,
        dots=dot_args(x.dtype),  # both GEMMs multiply at the model's precision (h is float32)
    )
    _expert_gemm(x, w13, w13_scale, h, n_out=inter, k_in=dim, limit=limit, **launch)  # gate, up, SwiGLU
    weights = topk_weights.float().contiguous().flatten()
    _expert_gemm(h, w2, w2_scale, out_pairs, n_out=dim, k_in=inter, routing=weights, **launch)  # down
    out = torch.empty_like(x)
    sum_pairs(out_pairs, topk, out, add)
    return out


def _expert_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    out: torch.Tensor,
    n_out: int,
    k_in: int,
    aligned: tuple[torch.Tensor, torch.Tensor],
    num_pairs: int,
    topk: int,
    quant: int,
    blocks: tuple[int, int, int],
    dots: dict,
    limit: float | None = None,
    routing: torch.Tensor | None = None,
) -> None:
    """Launches `_expert_gemm_kernel` over every aligned block: the gate/up GEMM when `routing` is None
    (rows of `a` by token, into `out`'s slots), else the down GEMM (rows by slot, into `out`'s pairs)."""
    sorted_ids, block_expert = aligned
    block_m, block_n, block_k = blocks
    if quant == 0:
        s, stride_se, stride_sn = w, 0, 0
    else:
        s = scale.view(torch.uint8) if quant == 2 else scale if quant == 3 else scale.float().contiguous()
        stride_se, stride_sn = s.stride(0), s.stride(1)
    gate_up = routing is None
    args = (a, w.view(torch.uint8) if quant in PACKED else w, s, sorted_ids, block_expert)
    args += (
        a if gate_up else routing,
        out,
        num_pairs,
        n_out,
        k_in,
        row_class(num_pairs),
    )  # gate/up: no routing
    args += (float(limit) if limit is not None else 0.0, a.stride(0), w.stride(0), w.stride(1), w.stride(2))
    args += (stride_se, stride_sn, out.stride(0))
    meta = dict(TOPK=topk, QUANT=quant, GATE_UP=gate_up, HAS_LIMIT=limit is not None, BLOCK_M=block_m, **dots)
    if block_n is None:  # timed on the GPU
        grid = lambda tiles: (sorted_ids.numel() // block_m, triton.cdiv(n_out, tiles["BLOCK_N"]))  # noqa: E731
        _expert_gemm_tuned[grid](*args, **meta)
    else:
        grid = (sorted_ids.numel() // block_m, triton.cdiv(n_out, block_n))
        _expert_gemm_kernel[grid](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k)


@triton.jit
def _sum_pairs_kernel(
    pairs_ptr, add_ptr, out_ptr, dim, TOPK: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_D: tl.constexpr
):
    t = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < dim
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k in tl.static_range(TOPK):  # in k order, as torch's sum over the pairs of a token
        acc += tl.load(pairs_ptr + (t * TOPK + k).to(tl.int64) * dim + d, mask=mask, other=0.0)
    y = acc.to(out_ptr.dtype.element_ty)
    if HAS_ADD:  # as `y + add` in the model's dtype: rounded once each
        y = y.to(tl.float32) + tl.load(add_ptr + t.to(tl.int64) * dim + d, mask=mask, other=0.0).to(
            tl.float32
        )
        y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t.to(tl.int64) * dim + d, y, mask=mask)


def sum_pairs(pairs: torch.Tensor, topk: int, out: torch.Tensor, add: torch.Tensor | None = None) -> None:
    """out [T, D] = sum over k of pairs [T*K, D] (float32), in out's dtype, plus `add` [T, D] where given:
    the MoE's last three kernels (sum, cast, add of the shared experts) as one."""
    tokens, dim = out.shape
    assert out.is_contiguous() and pairs.is_contiguous() and (add is None or add.is_contiguous())
    if tokens:
        block = min(1024, triton.next_power_of_2(dim))
        _sum_pairs_kernel[(tokens, triton.cdiv(dim, block))](
            pairs,
            add if add is not None else out,
            out,
            dim,
            TOPK=topk,
            HAS_ADD=add is not None,
            BLOCK_D=block,
        )
