"""Hybrid execution: routed experts in host RAM, computed on the CPU, with the popular ones cached on
the compute device (the GPU). The rest of the model runs where the engine runs; a layer's compute
device is its own (a pipeline's stage).

Each MoE layer's experts become `TieredExperts`: the full stack stays on `expert_device`; up to
`hot` experts per layer also live on the compute device. Routing counts, decayed over time, decide
which: every `period` forward passes the most popular experts are promoted and the least popular
evicted, during generation. A step computes each expert where its weights are (the activations move,
not the weights), except in long prefills (`stream_tokens` tokens or more in one pass), where the
cold experts a pass uses are copied to the compute device once for that pass.

Experts in host RAM run in ds4's CPU kernel (ds4.kernels.cpu_moe), quantized or float: every cold (token,
expert) pair of a decode-shaped pass in one call, straight from the stored codes; hot pairs run on the
compute device and are added (with Triton there, all of a pass's hot pairs in one fused kernel over a
stack of fixed slots, which a decode graph can capture: ds4.engine.split_graphs). Prefills with many rows
per expert, and experts in a format or shape the kernel does not take, run one call per expert. With the
model on a GPU, a decode-shaped pass overlaps: its inputs and routing go to pinned host memory behind the
work that computes them, the device computes the shared expert (and the hot experts) while the host
computes the cold ones, and the host waits for that hand-off alone (`TieredExperts.begin`).

Float results do not depend on placement: every expert computes the same operations on the same values,
summed in the same order (the kernel's sums differ from torch's by rounding only, and by about 1% where
int4 experts take int8 activations, its default with AVX2 or AVX-512 VNNI). On a CPU-only machine
every tier is the CPU, so the logic is tested everywhere; on a GPU it moves real bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from ds4.engine.layers.moe import Experts, expert_forward, register_stack, routed_experts
from ds4.kernels import triton_enabled


class TieredExperts(Experts):
    fused = False  # placement is per expert
    host_pass = True  # the host reads every pass's routing: a decode graph is captured in pieces around it

    def __init__(
        self, base: Experts, hot: int, compute_device, expert_device, period: int, stream_tokens: int
    ):
        nn.Module.__init__(self)
        self.handle = register_stack(self, base.handle)  # a compiled step now calls this stack
        self.limit, self.quant = base.limit, base.quant  # quantized experts move and stay quantized
        self.w13 = nn.Parameter(base.w13.data.to(expert_device), requires_grad=False)
        self.w2 = nn.Parameter(base.w2.data.to(expert_device), requires_grad=False)
        self.w13_scale = self.w2_scale = None
        if base.quant != "none":
            self.w13_scale = nn.Parameter(base.w13_scale.data.to(expert_device), requires_grad=False)
            self.w2_scale = nn.Parameter(base.w2_scale.data.to(expert_device), requires_grad=False)
        self.capacity, self.period, self.stream_tokens = hot, period, stream_tokens
        self.compute_device, self.expert_device = torch.device(compute_device), torch.device(expert_device)
        self.counts = torch.zeros(self.w13.shape[0], dtype=torch.float64)
        self._routed: list[int] = []  # expert ids routed since the last rebalance, counted then
        self.hot: dict[int, tuple] = {}  # expert -> (w13, w13 scale, w2, w2 scale) on the compute device
        # On a compute device of its own (or where tests force the Triton path on the CPU), the hot experts
        # live in fixed slots of one stack there, and `hot_slot` maps each expert to its slot (-1: cold):
        # with Triton, the device computes every hot pair of a pass in one fused kernel, from device values
        # alone, which a decode graph can replay.
        self.hot_stack: tuple | None = None
        self.hot_slot = torch.full((self.w13.shape[0],), -1, dtype=torch.int32, device=self.compute_device)
        self._slots: dict[int, int] = {}  # expert -> its slot
        if hot > 0 and (self.compute_device != self.expert_device or triton_enabled(self.compute_device)):
            size = min(hot, self.w13.shape[0])
            self.hot_stack = tuple(
                None if t is None else torch.zeros(size, *t.shape, dtype=t.dtype, device=self.compute_device)
                for t in self._weights(0)
            )
        self.paused = False  # no rebalancing (a graph capture's warm-up passes)
        self.calls = 0
        self.use_cpu_kernel = self.expert_device.type == "cpu" and self.cpu_kernel()
        self.stats = {"promoted": 0, "evicted": 0, "hot_rows": 0, "cold_rows": 0, "streamed": 0}
        # single-token passes: bytes of the cold experts they read, their time (`bench hybrid`'s GB/s) and
        # in kernel_seconds, of that time, the CPU kernel's (the expert products, no Python around them)
        self.stats |= {"decode_expert_bytes": 0, "decode_expert_s": 0.0}
        self.kernel_seconds = torch.zeros(1, dtype=torch.float64)  # the CPU kernel adds its own time
        self.expert_bytes = sum(t.numel() * t.element_size() for t in self._weights(0) if t is not None)
        self._streamed: dict[int, tuple] = {}
        self.overlap: bool | None = None  # see `overlaps`

    def _weights(self, e: int, device=None) -> tuple:
        """Expert e's (w13, w13 scale, w2, w2 scale), scales None for float experts; copied to `device`."""
        quantized = self.quant != "none"
        found = (self.w13[e], self.w13_scale[e] if quantized else None)
        found += (self.w2[e], self.w2_scale[e] if quantized else None)
        return found if device is None else tuple(t if t is None else t.to(device) for t in found)

    @property
    def device_hot(self) -> bool:
        """Whether a pass computes its hot pairs on the compute device in one fused kernel (`device_part`)
        and its cold ones in the CPU kernel."""
        return self.hot_stack is not None and self.use_cpu_kernel and triton_enabled(self.compute_device)

    def device_part(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor):
        """The hot pairs' weighted sum [T, D] in x's dtype, on the compute device, the cold pairs left out;
        None where the pass does not compute that way: see `device_hot`, and passes too long for the CPU
        kernel (their hot experts go expert by expert). Shapes alone decide, so a graph's host pass and its
        capture agree."""
        if not (self.device_hot and self.kernel_rows(expert_ids) and x.shape[0] < self.stream_tokens):
            return None
        from ds4.kernels.moe import fused_moe

        w13, s13, w2, s2 = self.hot_stack
        slots = self.hot_slot[expert_ids]  # [T, K]: each pair's slot, -1 for a cold expert
        return fused_moe(x, w13, w2, weights, slots, self.limit, self.quant, s13, s2, skips=True)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        weights = self.hot.get(e) or self._streamed.get(e)
        if weights is not None:
            self.stats["hot_rows"] += x.shape[0]
            device = self.compute_device
        else:
            self.stats["cold_rows"] += x.shape[0]
            weights, device = self._weights(e), self.expert_device
        w13, s13, w2, s2 = weights
        return expert_forward(x.to(device), w13, w2, self.limit, self.quant, s13, s2).to(x.device)

    @property
    def overlaps(self) -> bool:
        """Whether a decode-shaped pass hands its cold experts to the host while the compute device goes on
        with what the caller queues meanwhile (MoE queues the shared expert): experts in host RAM computed
        by the CPU kernel, the rest of the model on a GPU. `overlap` True or False decides instead (the
        tests run the overlapped order on the CPU)."""
        if self.overlap is not None:
            return self.overlap and self.use_cpu_kernel
        return self.use_cpu_kernel and self.compute_device.type == "cuda"

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled step calls this forward, run eagerly, as one op
            return routed_experts(x, weights, expert_ids, self.handle)
        return self.begin(x, weights, expert_ids)()

    def begin(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, cold_only: bool = False
    ) -> Callable[[], torch.Tensor]:
        """Starts a pass; the call it returns finishes it. Overlapped (a decode-shaped pass on a GPU with its
        experts in host RAM), the pass's inputs and routing are copied to pinned host memory behind the work
        that computes them, without waiting; what the caller queues on the device before calling the result
        runs while the host computes, since the call waits for that copy alone. Otherwise the whole pass
        runs in the call. Where the stack computes its hot pairs on the device (`device_part`), they are
        queued here, behind the copies, and the call adds them to the rest. `cold_only`: the caller
        computed `device_part` (a decode graph did); the call returns the rest."""
        host = copied = None
        if self.overlaps and self.kernel_rows(expert_ids) and x.shape[0] < self.stream_tokens:
            host = [_to_host(t) for t in (x, weights, expert_ids)]
            if x.device.type == "cuda":  # on the stream the copies were queued on: x's device's current one
                copied = torch.cuda.Event()
                copied.record(torch.cuda.current_stream(x.device))
        hot = None if cold_only else self.device_part(x, weights, expert_ids)

        def finish() -> torch.Tensor:
            rest = self._pass(x, weights, expert_ids, host, copied, cold_only or hot is not None)
            return rest if hot is None else rest + hot

        return finish

    def _pass(self, x, weights, expert_ids, host=None, copied=None, cold_only=False) -> torch.Tensor:
        if copied is not None:
            copied.synchronize()  # the hand-off alone: the device may still be computing what came after
        start = time.perf_counter()
        ids = host[2] if host else expert_ids.cpu()
        id_list = ids.flatten().tolist()
        self._routed += id_list
        try:
            if host:
                return self._kernel_forward(x, weights, ids, id_list, expert_ids, host[:2], cold_only)
            return self._forward(x, weights, ids, id_list, expert_ids, cold_only)
        finally:
            if x.shape[0] == 1:
                cold = set(id_list) - self.hot.keys()
                self.stats["decode_expert_bytes"] += len(cold) * self.expert_bytes
                self.stats["decode_expert_s"] += time.perf_counter() - start
            self.calls += 1
            if self.calls % self.period == 0 and not self.paused:
                self.rebalance()

    def _forward(self, x, weights, ids: torch.Tensor, id_list: list[int], expert_ids, cold_only=False):
        if self.use_cpu_kernel and self.kernel_rows(ids) and x.shape[0] < self.stream_tokens:
            return self._kernel_forward(x, weights, ids, id_list, expert_ids, cold_only=cold_only)
        assert not cold_only, "a pass outside the CPU kernel computes every pair (device_part gave None)"
        expert_ids = ids.to(x.device)
        if x.shape[0] >= self.stream_tokens:  # a long prefill: the cold experts it uses come over once
            used = [int(e) for e in expert_ids.flatten().unique().tolist() if int(e) not in self.hot]
            device = self.compute_device
            self._streamed = {e: self._weights(e, device) for e in used}
            self.stats["streamed"] += len(used)
        try:
            return super().forward(x, weights, expert_ids)
        finally:
            self._streamed = {}

    def _kernel_forward(
        self, x, weights, ids: torch.Tensor, id_list: list[int], expert_ids, host=None, cold_only=False
    ) -> torch.Tensor:
        """Cold pairs in one CPU kernel call; hot ones where their weights are, on the compute device, queued
        first so that they run while the host computes, expert by expert (where the stack computes them in
        one kernel, `begin` did, and `cold_only` is set). On a CPU-only machine that is the same memory, so
        every pair goes to the kernel, unless the Triton path is forced (tests run hot experts through it).
        `host`: x and weights already copied to host memory; `ids` on the host, `expert_ids` where x is."""
        hot_pairs = sum(1 for e in id_list if e in self.hot)
        self.stats["hot_rows"] += hot_pairs
        self.stats["cold_rows"] += len(id_list) - hot_pairs
        device_path = self.compute_device != self.expert_device or triton_enabled(self.compute_device)
        seconds = self.kernel_seconds if x.shape[0] == 1 else None
        host_x, host_weights = host or (x, weights)
        if not device_path:  # decode on a CPU-only machine: one call, nothing else
            return self.cpu_forward(host_x, host_weights, ids, seconds).to(x.device)
        is_hot = torch.isin(ids, torch.tensor(sorted(self.hot), dtype=ids.dtype)) if hot_pairs else None
        hot = None if cold_only or not hot_pairs else self._hot_forward(x, weights, ids, is_hot)
        cold = ids if is_hot is None else ids.masked_fill(is_hot, -1)
        y = self.cpu_forward(host_x, host_weights, cold, seconds).to(x.device)
        return y if hot is None else y + hot

    def _hot_forward(self, x, weights, ids, is_hot) -> torch.Tensor:
        """The hot pairs' weighted sum on the compute device, expert by expert in ascending id."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in sorted({int(e) for e in ids[is_hot].tolist()}):
            tokens, ks = (ids == e).nonzero(as_tuple=True)
            tokens, ks = tokens.to(x.device), ks.to(x.device)
            w13, s13, w2, s2 = self.hot[e]
            y = expert_forward(x[tokens], w13, w2, self.limit, self.quant, s13, s2)
            out.index_add_(0, tokens, y.float() * weights[tokens, ks, None].float())
        return out.to(x.dtype)

    def rebalance(self) -> None:
        """The `capacity` most popular experts are the hot ones; counts decay so popularity can move."""
        routed, self._routed = self._routed, []
        self.counts += torch.bincount(torch.tensor(routed, dtype=torch.long), minlength=self.counts.numel())
        if self.capacity <= 0:
            return
        ranked = torch.sort(self.counts, descending=True, stable=True).indices[: self.capacity].tolist()
        wanted = set(ranked)
        evicted = [e for e in self.hot if e not in wanted]
        for e in evicted:
            del self.hot[e]
            self._slots.pop(e, None)
        promoted = [e for e in ranked if e not in self.hot]
        for e in promoted:
            self.hot[e] = self._promote(e)
        self.stats["evicted"] += len(evicted)
        self.stats["promoted"] += len(promoted)
        if self.hot_stack is not None and (evicted or promoted):
            table = torch.full(self.hot_slot.shape, -1, dtype=torch.int32)
            for e, slot in self._slots.items():
                table[e] = slot
            self.hot_slot.copy_(table)  # in place: a captured graph reads it where it is
        self.counts *= 0.5

    def _promote(self, e: int) -> tuple:
        """Expert e's weights on the compute device: copied into a free slot of the hot stack where there is
        one (views of it), else copies of their own."""
        if self.hot_stack is None:
            return self._weights(e, self.compute_device)
        slot = min(set(range(self.hot_stack[0].shape[0])) - set(self._slots.values()))
        self._slots[e] = slot
        placed = tuple(None if stacked is None else stacked[slot] for stacked in self.hot_stack)
        for view, weight in zip(placed, self._weights(e), strict=True):
            if view is not None:
                view.copy_(weight)
        return placed


@contextmanager
def uncounted(tiered: list[TieredExperts]):
    """Passes run inside leave the stacks as they were: their statistics, popularity and hot sets. A decode
    graph's capture runs warm-up passes over its padding rows, which are not traffic."""
    saved = [
        (t.counts.clone(), list(t._routed), t.calls, dict(t.stats), t.kernel_seconds.clone()) for t in tiered
    ]
    for t in tiered:
        t.paused = True  # the hot sets stay as they are
    try:
        yield
    finally:
        for t, (counts, routed, calls, stats, spent) in zip(tiered, saved, strict=True):
            t.counts, t._routed, t.calls, t.stats, t.paused = counts, routed, calls, stats, False
            t.kernel_seconds.copy_(spent)


def make_hybrid(
    model: nn.Module, hot: int, expert_device="cpu", period: int = 8, stream_tokens: int = 4096
) -> list[TieredExperts]:
    """Replaces every MoE layer's experts with tiered ones computing on the device the layer's experts
    were materialized on (the layer's own); returns them (their stats tell the moves)."""
    tiered = []
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, Experts) and not isinstance(experts, TieredExperts):
            compute_device = experts.w13.device
            module.experts = TieredExperts(experts, hot, compute_device, expert_device, period, stream_tokens)
            tiered.append(module.experts)
    return tiered


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """t in pinned host memory, copied without waiting (t itself where it is on the CPU already)."""
    if t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
