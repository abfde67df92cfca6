"""DeepSeek's router after its gate product, in one kernel: scores (sigmoid, softmax or sqrt-softplus),
the correction bias for the choice, group-limited selection (each group scored by its top two biased
scores, or its best without a bias; the best `topk_groups` groups kept), the top-k experts, their
unbiased scores as weights, normalised and scaled. On torch that is about 14 kernels a layer
(ds4.engine.layers.moe.Gate); here one program per token. Experts come out best first (torch's unsorted
top-k may order them otherwise: the weighted sum over them is the same up to rounding)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCORES = {"sigmoid": 0, "softmax": 1, "sqrtsoftplus": 2}


@triton.jit
def _router_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    experts,
    per_group,
    groups,
    stride_l,
    stride_w,
    stride_i,
    route_scale,
    SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    expert = g * per_group + j  # [BLOCK_G, BLOCK_J]: group g's j-th expert
    valid = (g < groups) & (j < per_group)
    logit = tl.load(logits_ptr + t * stride_l + expert, mask=valid, other=float("-inf")).to(tl.float32)
    if SCORE == 1:
        e = tl.exp(logit - tl.max(tl.max(logit, axis=1), axis=0))
        scores = e / tl.sum(tl.sum(e, axis=1), axis=0)
    elif SCORE == 2:
        y = tl.exp(tl.minimum(logit, 20.0))  # softplus = log1p(y), torch's threshold 20; small y: its series
        softplus = tl.where(logit > 20.0, logit, tl.where(y < 1e-4, y * (1.0 - 0.5 * y), tl.log(1.0 + y)))
        scores = tl.sqrt(softplus)
    else:
        scores = tl.sigmoid(logit)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if TOPK_GROUPS < BLOCK_G:  # group-limited: keep the best groups, the rest out of the choice
        best = tl.max(choice, axis=1)
        if HAS_BIAS:  # a group's score: its two best biased scores
            first = tl.argmax(choice, axis=1)
            best += tl.max(tl.where(j == first[:, None], float("-inf"), choice), axis=1)
        best = tl.where(tl.arange(0, BLOCK_G) < groups, best, float("-inf"))
        keep = tl.zeros([BLOCK_G], tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            pick = tl.argmax(best, axis=0)
            keep |= tl.arange(0, BLOCK_G) == pick
            best = tl.where(tl.arange(0, BLOCK_G) == pick, float("-inf"), best)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    flat_choice = tl.reshape(choice, [BLOCK_G * BLOCK_J])
    flat_scores = tl.reshape(scores, [BLOCK_G * BLOCK_J])
    flat = tl.arange(0, BLOCK_G * BLOCK_J)
    k = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], tl.int32)
    weight = tl.zeros([BLOCK_K], tl.float32)
    for i in tl.static_range(TOPK):  # the best remaining expert, TOPK times
        at = tl.argmax(flat_choice, axis=0)
        picked = tl.where(k == i, (at // BLOCK_J) * per_group + at % BLOCK_J, picked)
        weight = tl.where(k == i, tl.sum(tl.where(flat == at, flat_scores, 0.0), axis=0), weight)
        flat_choice = tl.where(flat == at, float("-inf"), flat_choice)
    if NORM:
        weight = weight / (tl.sum(weight, axis=0) + 1e-20)
    tl.store(weights_ptr + t * stride_w + k, weight * route_scale, mask=k < TOPK)
    tl.store(ids_ptr + t * stride_i + k, picked.to(tl.int64), mask=k < TOPK)


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    score: str,
    topk: int,
    groups: int,
    topk_groups: int,
    norm: bool,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, topk] float32, expert ids [T, topk] int64) for the gate's logits [T, E] float32, as
    Gate.forward computes them (its score function, bias, group limit, normalisation and scale)."""
    tokens, experts = logits.shape
    assert experts % groups == 0 and logits.stride(-1) == 1, (experts, groups)
    weights = torch.empty(tokens, topk, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, topk, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    per_group = experts // groups
    _router_kernel[(tokens,)](
        logits,
        bias if bias is not None else logits,
        weights,
        ids,
        experts,
        per_group,
        groups,
        logits.stride(0),
        weights.stride(0),
        ids.stride(0),
        float(route_scale),
        SCORE=SCORES[score],
        HAS_BIAS=bias is not None,
        NORM=bool(norm),
        TOPK=topk,
        BLOCK_K=triton.next_power_of_2(topk),
        TOPK_GROUPS=topk_groups if groups > 1 else triton.next_power_of_2(groups),
        BLOCK_G=triton.next_power_of_2(groups),
        BLOCK_J=triton.next_power_of_2(per_group),
    )
    return weights, ids
