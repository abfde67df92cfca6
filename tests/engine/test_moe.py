"""The MoE gate and the batched expert dispatch against plain per-token references."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ds4.engine.config import ModelConfig
from ds4.engine.layers.moe import Experts, Gate
from tests.conftest import BASE_GEOMETRY


def make_config(**overrides) -> ModelConfig:
    cfg = dict(BASE_GEOMETRY, model_type="deepseek_v3", n_routed_experts=12, num_experts_per_tok=3)
    cfg.update(overrides)
    return ModelConfig.from_hf(cfg)


def random_(module: torch.nn.Module, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def reference_gate(x, weight, bias, config: ModelConfig):
    """One token at a time, as DeepSeek's reference Gate reads."""
    out_w, out_ids = [], []
    for row in x:
        scores = (weight @ row).softmax(-1) if config.scoring_func == "softmax" else (weight @ row).sigmoid()
        choice = scores + bias if bias is not None else scores.clone()
        groups = choice.view(config.n_group, -1)
        group_scores = groups.topk(2).values.sum(-1) if bias is not None else groups.amax(-1)
        kept = set(group_scores.topk(config.topk_group).indices.tolist())
        for g in range(config.n_group):
            if g not in kept:
                groups[g] = float("-inf")
        ids = groups.flatten().topk(config.num_experts_per_tok).indices
        w = scores[ids]
        if config.norm_topk_prob:
            w = w / w.sum()
        out_w.append(w * config.routed_scaling_factor)
        out_ids.append(ids)
    return torch.stack(out_w), torch.stack(out_ids)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_group=4, topk_group=2),
        dict(n_group=3, topk_group=1, norm_topk_prob=False),
        dict(n_group=4, topk_group=2, scoring_func="softmax", topk_method="group_limited_greedy"),
    ],
)
def test_gate_matches_per_token_reference(overrides):
    config = make_config(**overrides)
    gate = Gate(config)
    random_(gate, seed=1)
    x = torch.randn(17, config.hidden_size, generator=torch.Generator().manual_seed(2))
    weights, ids = gate(x)
    ref_w, ref_ids = reference_gate(x, gate.weight, gate.bias, config)
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_w.gather(1, ref_order.indices))


def test_bias_steers_choice_but_not_weights():
    config = make_config(n_group=1, topk_group=1)
    gate = Gate(config)
    random_(gate, seed=3)
    with torch.no_grad():
        gate.bias.zero_()
        gate.bias[5] = 100.0  # expert 5 always chosen
    x = torch.randn(9, config.hidden_size, generator=torch.Generator().manual_seed(4))
    weights, ids = gate(x)
    assert bool((ids == 5).any(-1).all())
    scores = F.linear(x, gate.weight).sigmoid()
    chosen = scores.gather(1, ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * config.routed_scaling_factor)


@pytest.mark.parametrize("num_tokens", [29, 1])  # the batched path and the single-token decode path
def test_dispatch_equals_per_token_loop(num_tokens):
    config = dataclasses.replace(make_config(), moe_intermediate_size=20)
    experts = Experts(config)
    random_(experts, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(num_tokens, config.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(config.n_routed_experts, generator=gen)[:3] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, 3, generator=gen)
    ref = torch.zeros_like(x)
    for t in range(num_tokens):
        for k in range(3):
            e = int(ids[t, k])
            gate_up = experts.w13[e] @ x[t]
            gate, up = gate_up.chunk(2)
            ref[t] += weights[t, k] * (experts.w2[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(experts(x, weights, ids), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_float_experts_run_in_the_cpu_kernel(monkeypatch, dtype, num_tokens):
    """Float stacks in host RAM take the C++ expert kernel at decode shapes (one call for every pair). It
    sums in float32 whatever the weights' dtype, so it matches the torch path on the same weights widened
    to float32 (bf16: to the output's rounding)."""
    import copy

    from ds4.kernels import cpu_kernels, cpu_moe

    config = make_config(hidden_size=64, moe_intermediate_size=32)  # the kernel's widths: groups of 32
    experts = Experts(config)
    random_(experts, seed=7)
    experts.to(dtype)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(num_tokens, config.hidden_size, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(config.n_routed_experts, generator=gen)[:3] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, 3, generator=gen)
    with cpu_kernels(False):
        want = copy.deepcopy(experts).float()(x.float(), weights, ids)
    calls, real = [], cpu_moe.moe
    monkeypatch.setattr(cpu_moe, "moe", lambda *a, **k: calls.append(a[7]) or real(*a, **k))
    assert experts.kernel_format == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    assert experts.cpu_kernel() and experts.kernel_rows(ids)
    got = experts(x, weights, ids)
    assert calls == [experts.kernel_format] and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2 * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
