"""This machine's decode components, each measured on its own, for the planner's prediction: streaming-read
bandwidth, the fp32 matmul rate, the bandwidth matrix-vector products reach at a model's own widths, and
the bandwidth ds4's CPU expert kernel reaches at the model's expert shapes and format. None of them runs
the model's decode step: that is what the prediction is checked against (`bench hybrid`)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from ds4.engine.bench.engine import median_time, read_bandwidth

KERNEL_SET_BYTES = 256 << 20  # at most this much of random experts: past the caches, within any RAM


def measure_machine() -> dict:
    """This CPU's streaming-read bandwidth (the best a weight read can do), the bandwidth of one large
    matrix-vector product, and its fp32 matmul rate."""
    a = torch.randn(1024, 1024)
    best_mm = min(median_time(lambda: a @ a, 1) for _ in range(5))
    w, x = torch.randn(8192, 8192), torch.randn(1, 8192)  # 256 MB, far past the caches
    gemv = median_time(lambda: F.linear(x, w), 5)
    return {
        "read_gb_per_s": read_bandwidth() / 1e9,
        "gemv_gb_per_s": w.numel() * 4 / gemv / 1e9,
        "matmul_tflop_per_s": 2 * 1024**3 / best_mm / 1e12,
    }


def model_gemv_bandwidth(model: torch.nn.Module, runs: int = 5) -> tuple[float, int]:
    """(bytes/s, bytes) of one row through each of the model's matrices (every 2-D weight but the
    embedding and the routed experts) in turn, as a decode step reads them, without the rest of the step
    between them: through its layer where it has one, so a weight the loader laid out for ds4's CPU
    kernel runs there, as in decode. A decode step's matrices are mostly small: each pays a call and a
    cold start, which one 256 MB product does not show."""
    layers = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}
    mats = [
        p for n, p in model.named_parameters() if p.dim() == 2 and ".experts." not in n and "embed" not in n
    ]
    rows = {(p.shape[1], p.dtype): torch.randn(1, p.shape[1], dtype=p.dtype, device=p.device) for p in mats}
    nbytes = sum(p.numel() * p.element_size() for p in mats)

    def step():
        for p in mats:
            x = rows[p.shape[1], p.dtype]
            layer = layers.get(id(p))
            layer(x) if layer is not None else F.linear(x, p)

    with torch.no_grad():
        return nbytes / median_time(step, runs), nbytes


def expert_kernel_bandwidth(config, fmt: str, runs: int = 9) -> float | None:
    """Bytes/s of expert codes (or float weights) the CPU kernel reads (its own clock) for single-token calls
    at the model's expert shapes in `fmt`: one stack of random experts per MoE layer, called in turn with
    top-k experts each, as a decode step does, so the experts come from memory and not the caches."""
    from ds4.kernels import cpu_moe

    D, inter, k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    if not (cpu_moe.supports(fmt, D, inter) and cpu_moe.available()):
        return None  # such experts run in torch: the matrix-vector bandwidth is theirs
    (w13, s13), (w2, s2) = _random_expert(fmt, 2 * inter, D), _random_expert(fmt, D, inter)
    expert_bytes = sum(t.numel() * t.element_size() for t in (w13, s13, w2, s2) if t is not None)
    moe_layers = sum(1 for kind in config.mlp_layer_types if kind != "dense")
    experts = min(config.n_routed_experts, max(k, KERNEL_SET_BYTES // expert_bytes))
    layers = max(1, min(moe_layers, KERNEL_SET_BYTES // (experts * expert_bytes)))
    stacks = [
        tuple(t if t is None else t.expand(experts, *t.shape).contiguous() for t in (w13, s13, w2, s2))
        for _ in range(layers)
    ]
    gen = torch.Generator().manual_seed(0)
    x, weights = torch.randn(1, D, generator=gen), torch.rand(1, k, generator=gen)
    rounds = []  # the kernel's own clock, per round over every layer: the median is the figure, so that
    for _ in range(runs + 1):  # a round another process slowed does not move it (the first warms up)
        seconds = torch.zeros(1, dtype=torch.float64)
        for stack in stacks:
            ids = torch.randperm(experts, generator=gen)[:k][None]
            cpu_moe.moe(x, weights, ids, *stack, fmt, config.swiglu_limit, seconds=seconds)
        rounds.append(float(seconds))
    return layers * k * expert_bytes / statistics.median(rounds[1:])


def _random_expert(fmt: str, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random [out_dim, in_dim] matrix as `fmt` stores it: (codes, scales), or (weights, None) for float."""
    from ds4.engine.quant import quantize_fp4, quantize_fp8_blocks, quantize_int4

    w = torch.randn(out_dim, in_dim) * 0.05
    if fmt in ("fp32", "bf16"):
        return w.to(torch.float32 if fmt == "fp32" else torch.bfloat16), None
    return {"int4": quantize_int4, "fp4": quantize_fp4, "fp8": quantize_fp8_blocks}[fmt](w)
