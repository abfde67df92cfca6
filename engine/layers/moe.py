"""Feed-forward layers: the SwiGLU MLP (dense layers, shared experts) and DeepSeek's routed MoE.

Legend: T tokens, D hidden, I expert intermediate, E routed experts, K experts per token, G groups.
Gate: sigmoid (V3) or softmax scores; the correction bias steers the choice only; group-limited top-k
masks the non-selected groups to -inf; weights optionally normalized, times routed_scaling_factor.
Dispatch is batched: (token, expert) pairs are sorted by expert and each active expert runs one GEMM.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ds4.engine.config import ModelConfig
from ds4.engine.context import current_split
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.quantized import quantized_linear, stored_shapes
from ds4.kernels import triton_enabled


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(gate) * up; V4 clamps both pre-activations to `limit` (the gate from above only). On the
    Triton path, rows of them, one kernel."""
    rows = gate.dim() == 2 and gate.dtype == up.dtype and gate.stride(-1) == up.stride(-1) == 1
    if rows and triton_enabled(gate.device):
        from ds4.kernels.small_ops import swiglu as swiglu_kernel

        return swiglu_kernel(gate, up, limit)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int, limit: float | None = None):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = Linear(inter_dim, dim, bias=False)  # down
        self.w3 = Linear(dim, inter_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class Gate(nn.Module):
    """Router; its weight and bias stay in float32 whatever the model dtype."""

    def __init__(self, config: ModelConfig, hash_routed: bool = False):
        super().__init__()
        self.topk = config.num_experts_per_tok
        self.n_groups = config.n_group
        self.topk_groups = config.topk_group
        self.score_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        has_bias = config.gate_bias and not hash_routed
        self.bias = nn.Parameter(torch.zeros(config.n_routed_experts)) if has_bias else None
        # V4's first layers route by token id through a fixed table; the gate still weighs the experts.
        self.tid2eid = nn.Parameter(torch.empty(config.vocab_size, self.topk)) if hash_routed else None

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        if self.tid2eid is None and triton_enabled(x.device):
            from ds4.kernels.router import route

            bias = None if self.bias is None else self.bias.float()
            args = (self.topk, self.n_groups, self.topk_groups, self.norm_topk_prob, self.route_scale)
            return route(logits, bias, self.score_func, *args)
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        elif self.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.sigmoid()
        if self.tid2eid is not None:
            return self._weigh(scores, self.tid2eid[input_ids].long())
        choice = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            grouped = choice.view(x.shape[0], self.n_groups, -1)  # [T, G, E/G]
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            keep = group_scores.topk(self.topk_groups, dim=-1, sorted=False)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        return self._weigh(scores, choice.topk(self.topk, dim=-1, sorted=False)[1])

    def _weigh(self, scores: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = scores.gather(1, expert_ids)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, expert_ids


def expert_forward(
    x: torch.Tensor, w13, w2, limit: float | None, quant: str = "none", s13=None, s2=None
) -> torch.Tensor:
    """One expert on rows x [n, D] -> [n, D]. Quantized weights are dequantized inside the matmul by the
    Triton kernel on a GPU, elsewhere for this call only."""
    gate, up = _linear(x, w13, s13, quant).chunk(2, dim=-1)  # [n, I] each
    return _linear(swiglu(gate, up, limit), w2, s2, quant)


def _linear(x: torch.Tensor, weight: torch.Tensor, scale, quant: str) -> torch.Tensor:
    return F.linear(x, weight) if quant == "none" else quantized_linear(x, weight, scale, quant)


class Experts(nn.Module):
    """Routed experts stored stacked: w13 = [gate; up] per expert, w2 = down. Stored quantized (`quant`
    fp8 / fp4 / int4) they hold the checkpoint's values and w13_scale / w2_scale their scales."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.w13_scale = self.w2_scale = None
        self.limit = config.swiglu_limit
        self.handle = register_stack(self)  # how a compiled step's `routed_experts` op finds this stack

    fused = True  # the Triton path computes every expert in one kernel; tiered experts compute per expert
    host_pass = False  # tiered experts: the host takes part in every pass (a decode graph splits there)
    quant = "none"
    kernel_op: tuple | None = None  # (format, int8, limit): a compiled step calls ds4_cpu::moe with them

    def prepare_compiled(self) -> None:
        """Settles, before a decode step is traced, whether it calls the CPU kernel's C++ operator for this
        stack (a plain stack in the kernel, with the operators built) instead of the `routed_experts` op."""
        from ds4.kernels import cpu_moe, cpu_ops

        self.kernel_op = None
        if self.fused and cpu_ops.READY and self.cpu_kernel():
            fmt = self.kernel_format
            int8 = cpu_moe.cpu_activations_int8() and cpu_moe.takes_int8(fmt)
            self.kernel_op = (cpu_moe.FORMATS[fmt], int8, self.limit)

    def kernel_rows(self, expert_ids: torch.Tensor) -> bool:
        """Whether a pass is decode-shaped for the CPU kernel: about a block of 4 rows per expert at most.
        Longer prefills dequantize each expert once for all its rows and multiply with torch's GEMM,
        which is faster there (the copy is paid once per expert, not once per row)."""
        return expert_ids.numel() <= 4 * self.w13.shape[0]

    @property
    def kernel_format(self) -> str | None:
        """The CPU kernel's name for how the experts are stored: the quantized format, or fp32 / bf16 for
        float weights (None for other dtypes)."""
        from ds4.kernels.cpu_moe import FLOAT_FORMATS

        return self.quant if self.quant != "none" else FLOAT_FORMATS.get(self.w13.dtype)

    def cpu_kernel(self) -> bool:
        """Whether the stack runs in ds4's CPU kernel: in host RAM, quantized or float (fp32, bf16), in a
        shape it takes, and built (a failed build is reported once, as a warning)."""
        if self.w13.device.type != "cpu" or self.kernel_format is None:
            return False
        from ds4.kernels import cpu_moe

        return cpu_moe.supports(self.kernel_format, self.w2.shape[1], self.moe_inter) and cpu_moe.usable()

    @property
    def moe_inter(self) -> int:
        """I, the expert intermediate size (w2 holds two 4-bit codes per byte)."""
        return self.w2.shape[-1] * (1 if self.quant in ("none", "fp8") else 2)

    def cpu_forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, seconds=None):
        """The weighted sum of the pairs' experts in the CPU kernel, from the stored codes (pairs whose id is
        -1 skipped); on x's device. `seconds`: a float64 [1] the kernel adds its own time to."""
        from ds4.kernels.cpu_moe import moe

        args = (self.w13, self.w13_scale, self.w2, self.w2_scale, self.kernel_format, self.limit)
        return moe(x, weights, expert_ids, *args, seconds=seconds).to(x.device)

    def keep_quantized(self, fmt: str, stored: torch.dtype, scale_dtype: torch.dtype) -> None:
        """Makes a meta-device stack hold its experts as the checkpoint stores them: `fmt` (fp8, fp4 or
        int4) values of dtype `stored`, scales of dtype `scale_dtype`."""
        (E, two_i, D), I = self.w13.shape, self.w2.shape[-1]
        (w13, s13), (w2, s2) = stored_shapes(fmt, two_i, D), stored_shapes(fmt, D, I)
        with torch.device("meta"):
            self.w13 = nn.Parameter(torch.empty((E, *w13), dtype=stored), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty((E, *w2), dtype=stored), requires_grad=False)
            self.w13_scale = nn.Parameter(torch.empty((E, *s13), dtype=scale_dtype), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty((E, *s2), dtype=scale_dtype), requires_grad=False)
        self.quant = fmt

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [n, D] -> [n, D]."""
        if self.quant == "none":
            return expert_forward(x, self.w13[e], self.w2[e], self.limit)
        return expert_forward(
            x, self.w13[e], self.w2[e], self.limit, self.quant, self.w13_scale[e], self.w2_scale[e]
        )

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        expert_ids: torch.Tensor,
        add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routed experts' weighted sum [T, D]; `add` (on the fused Triton path only): added to it in
        the kernel that sums the pairs."""
        T, K = expert_ids.shape
        on_cpu = x.device.type == "cpu" and not triton_enabled(x.device)
        if on_cpu and torch.compiler.is_compiling():
            if self.kernel_op is not None:  # the kernel as a C++ operator: no Python in the step
                w = (self.w13, self.w13_scale, self.w2, self.w2_scale)
                return torch.ops.ds4_cpu.moe(x, weights, expert_ids, *w, *self.kernel_op)
            return routed_experts(x, weights, expert_ids, self.handle)  # the eager path below, as one op
        if self.fused and on_cpu and self.kernel_rows(expert_ids) and self.cpu_kernel():
            return self.cpu_forward(x, weights, expert_ids)
        if self.fused and triton_enabled(x.device):
            from ds4.kernels.moe import fused_moe

            return fused_moe(
                x,
                self.w13,
                self.w2,
                weights,
                expert_ids,
                limit=self.limit,
                quant=self.quant,
                w13_scale=self.w13_scale,
                w2_scale=self.w2_scale,
                add=add,
            )
        assert add is None, "only the fused Triton path adds in its kernel"
        if T == 1:  # decode of one sequence: K matrix-vector products, no sorting
            return self._single_token(x, weights[0], expert_ids[0].tolist())
        flat_ids = expert_ids.flatten()  # [T*K]
        order = flat_ids.argsort(stable=True)
        token_ids = order // K  # token of each (token, expert) pair, grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.w13.shape[0]).tolist()
        xs = x[token_ids]  # [T*K, D]
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            ys[rows] = self.expert(e, xs[rows])  # [n, D]
            start += n
        ys = (ys.float() * weights.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_ids, ys)  # [T, D]

    def _single_token(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: list[int]) -> torch.Tensor:
        ys = []
        for e in sorted(expert_ids):  # ascending, the order the batched path sums in
            ys.append(self.expert(e, x))  # [1, D]
        order = sorted(range(len(expert_ids)), key=expert_ids.__getitem__)
        scaled = torch.cat(ys).float() * weights[order, None]  # [K, D]
        return scaled.sum(0, keepdim=True).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hash_routed: bool = False):
        super().__init__()
        self.gate = Gate(config, hash_routed)
        self.experts = Experts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared, config.swiglu_limit) if shared else None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        weights, expert_ids = self.gate(x, input_ids)
        if self.experts.host_pass and (split := current_split()) is not None:  # a decode graph in pieces
            shared = self.shared_experts
            return split.routed(self.experts, x, weights, expert_ids, shared and (lambda: shared(x)))
        if self.shared_experts is None:
            return self.experts(x, weights, expert_ids)
        if getattr(self.experts, "overlaps", False) and not torch.compiler.is_compiling():
            routed = self.experts.begin(x, weights, expert_ids)  # hybrid: the host takes the routed experts
            shared = self.shared_experts(x)  # queued on the device, which runs it while the host computes
            return routed() + shared
        if self.experts.fused and triton_enabled(x.device):  # the shared output added as the pairs are summed
            return self.experts(x, weights, expert_ids, add=self.shared_experts(x))
        return self.experts(x, weights, expert_ids) + self.shared_experts(x)


# The expert stacks by handle: a compiled step's `routed_experts` op calls back into the stack it names.
_STACKS: weakref.WeakValueDictionary[int, Experts] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def register_stack(stack: Experts, handle: int | None = None) -> int:
    """`stack`'s handle: a new one, or `handle` taken over from the stack it replaces."""
    handle = next(_HANDLES) if handle is None else handle
    _STACKS[handle] = stack
    return handle


@torch.library.custom_op("ds4::routed_experts", mutates_args=())
def routed_experts(
    x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, stack: int
) -> torch.Tensor:
    """The routed experts of stack `stack` on the host, run eagerly: to a compiled step, one opaque op (its
    dispatch reads expert ids on the host, which a traced graph cannot)."""
    return _STACKS[stack](x, weights, expert_ids)


@routed_experts.register_fake
def _(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, stack: int) -> torch.Tensor:
    return torch.empty_like(x)
