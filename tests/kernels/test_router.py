"""The router kernel against the Gate's torch path, through the same module: V3's sigmoid with bias
and group limit, softmax without either, V4's sqrt-softplus, group and expert counts that are no
powers of two. The same experts for every token (in any order) with the same weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ds4.engine.layers.moe import Gate
from ds4.kernels import forced
from tests.kernels.conftest import DEVICE, randn


def gate(gen, experts, topk, groups, topk_groups, score, bias, norm, scale, dim=32):
    config = SimpleNamespace(
        num_experts_per_tok=topk,
        n_group=groups,
        topk_group=topk_groups,
        scoring_func=score,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        n_routed_experts=experts,
        hidden_size=dim,
        gate_bias=bias,
        vocab_size=16,
    )
    module = Gate(config).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(randn(gen, experts, dim))
        if module.bias is not None:
            module.bias.copy_(randn(gen, experts, scale=0.5))
    return module


@pytest.mark.parametrize(
    "experts, topk, groups, topk_groups, score, bias, norm, scale",
    [
        (256, 8, 8, 4, "sigmoid", True, True, 2.5),  # V3 / V3.2
        (64, 6, 1, 1, "softmax", False, False, 1.0),  # V2-Lite style
        (48, 6, 1, 1, "sqrtsoftplus", True, True, 1.5),  # V4
        (24, 3, 3, 2, "sigmoid", True, True, 1.0),  # 3 groups of 8, top-3
        (32, 4, 4, 2, "softmax", False, True, 2.0),  # groups scored by their best
    ],
)
def test_the_router_kernel_picks_the_gates_experts_and_weights(
    gen, experts, topk, groups, topk_groups, score, bias, norm, scale
):
    module = gate(gen, experts, topk, groups, topk_groups, score, bias, norm, scale)
    x = randn(gen, 7, 32, scale=3.0)  # wide logits: sqrt-softplus meets both sides of its threshold
    with forced(False):
        want_w, want_ids = module(x)
    with forced(True):
        got_w, got_ids = module(x)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32 and got_ids.shape == (7, topk)
    want_ids, order = want_ids.sort(dim=1)
    got_ids, got_order = got_ids.sort(dim=1)
    seed = gen.initial_seed()
    assert torch.equal(got_ids, want_ids), f"seed {seed}"
    torch.testing.assert_close(
        got_w.gather(1, got_order),
        want_w.gather(1, order),
        rtol=1e-5,
        atol=1e-6,
        msg=lambda m: f"seed {seed}: {m}",
    )


def test_the_router_kernel_handles_no_tokens(gen):
    module = gate(gen, 16, 2, 1, 1, "sigmoid", True, True, 1.0)
    with forced(True):
        weights, ids = module(torch.empty(0, 32, device=DEVICE))
    assert weights.shape == ids.shape == (0, 2)
