"""Decode graphs in pieces around host passes, for tiered experts (ds4.engine.hybrid).

With routed experts in host RAM, each MoE layer's cold experts are computed by the host between the
device's kernels, so a decode step cannot be one graph. It is captured as a chain instead. A piece holds
the device's work up to an MoE layer's routing. The device's part of the layer (its hot experts and shared
expert) is a graph of its own. The next piece starts by adding the cold experts' sum, read from a static
buffer, to the device's part.

A replay runs the chain: each piece's graph, and between two pieces the layer's host pass, as an eager
decode step runs it (`TieredExperts.begin`). The routing and activations are copied to pinned host
memory; the graph of the device's part is queued behind that copy (the hot experts, all in one fused
kernel over a stack of fixed slots, and the shared expert); the host waits for the copy alone; the cold
experts run in ds4's CPU kernel while the device runs its part. Their sum goes into the static buffer
the next piece reads.

One host wait per MoE layer is inherent to experts in host RAM (KTransformers waits once per layer as
well). What the pieces remove is the host's launch of every other kernel: a `small` V3 layer's ~24
kernels become one or two replays. Anchor: vLLM's piecewise CUDA graphs, which split at attention where
ds4 splits at the routed experts. A host pass computes the batch's real rows only (`DecodeGraphs.rows`),
so padding rows neither cost host time nor count in the experts' popularity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SplitGraph:
    """One stage's decode step for one bucket as a chain of captured pieces and host passes. It is
    captured and replayed like one CUDA graph (`capture_begin`, `capture_end`, `pool`, `replay`); while
    the capture runs, MoE layers with tiered experts call `routed` (ds4.engine.context's
    `current_split`)."""

    def __init__(self, graphs, new_graph: Callable[[], object]):
        self.graphs = graphs  # the DecodeGraphs it belongs to: `rows` is the replayed batch's real rows
        self._new_graph, self._pool = new_graph, None  # every piece allocates from one memory pool
        self.steps: list[Callable[[], None]] = []  # piece replays and host passes, in order
        self.pieces = 0  # graphs captured: the pieces and the MoE layers' device parts
        self._capturing = None

    def capture_begin(self, pool=None) -> None:
        """Starts the capture: its first piece, allocating from `pool` (None: a new one)."""
        self._pool = pool
        self.begin()

    def begin(self) -> None:
        """Starts capturing the next piece."""
        self._capturing = self._start()
        self.steps.append(self._capturing.replay)

    def _start(self):
        graph = self._new_graph()
        graph.capture_begin(pool=self._pool)
        self.pieces += 1
        return graph

    def _end(self, graph) -> None:
        graph.capture_end()
        if self._pool is None:  # the first piece made the pool; the others share it
            self._pool = graph.pool()

    def capture_end(self) -> None:
        """Ends the piece being captured (the last one, when the stage's forward returns)."""
        graph, self._capturing = self._capturing, None
        self._end(graph)

    def pool(self):
        return self._pool

    def routed(
        self, experts, x: torch.Tensor, weights, expert_ids, shared: Callable[[], torch.Tensor] | None
    ):
        """In place of an MoE layer's `routed + shared`: ends the piece after the routing, captures the
        device's part of the layer alone (the hot experts' fused sum, where the stack computes it that way,
        and the shared expert), and starts the next piece, whose first ops add the static buffer the host
        pass writes (the cold experts, or every routed expert) to the device's part."""
        self.capture_end()
        device_graph = self._start()
        hot = experts.device_part(x, weights, expert_ids)
        shared_out = None if shared is None else shared()
        self._end(device_graph)
        routed = torch.zeros_like(x)  # outside every capture: the host pass writes it between two replays
        graphs, cold_only = self.graphs, hot is not None

        def host_pass() -> None:
            n = graphs.rows
            finish = experts.begin(x[:n], weights[:n], expert_ids[:n], cold_only)  # copies queued, no wait
            device_graph.replay()  # the device computes its part while the host computes the cold experts
            routed[:n].copy_(finish())

        self.steps.append(host_pass)
        self.begin()
        out = routed if hot is None else routed + hot  # the eager pass's order: (cold + hot) + shared
        return out if shared_out is None else out + shared_out

    def replay(self) -> None:
        for step in self.steps:
            step()
