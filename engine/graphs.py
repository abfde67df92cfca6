"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket (1, 2, 4, 8, then steps of 8 up to
max_num_seqs), captured once over static input buffers and the engine's cache, the batch padded up to
its bucket. Prefill and mixed steps run eagerly; so do batches past the largest bucket.

A captured step must be a device program (ds4.engine.syncs): every value it reads lives in the static
buffers below, which each replay refills with device-to-device copies, and in the cache, whose tensors
never move. Padding rows attend to nothing (length 0) and write their latent row to the cache's scratch
row (V4: their state to its scratch row, their compressed entries to its scratch block). Anchors: nano-vllm's
ModelRunner.capture_cudagraph, vLLM's full decode graphs, SGLang's cuda_graph_runner.

A layer pipeline (the layers split over devices, ds4.engine.pipeline) captures one graph per stage and
bucket, on its stage's device and stream (vLLM captures per pipeline rank the same way): the first stage
runs the embeddings and its layers, the last its layers, the final norm and the head. Between two
replays the activations and the per-step inputs every layer reads (rope tables, token ids) are copied
from one stage's static outputs into the next stage's static inputs, outside any graph. Torch orders a
copy between devices on both devices' current streams, so a step still waits for nothing on the host.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.utils._pytree import tree_map

from ds4.engine.context import DecodeBatch, ForwardContext, forward_context, split_capture
from ds4.engine.hybrid import uncounted
from ds4.engine.pipeline import current_device
from ds4.engine.split_graphs import SplitGraph

log = logging.getLogger("ds4.engine")


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every multiple of 8, up to max_batch (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted({*sizes, max_batch})


class _Stage:
    """One stage's static buffers on its device: the step's inputs (as the largest bucket), and for a
    later stage the activations and layer inputs the stage before hands it."""

    def __init__(self, stage: int, device: torch.device, B: int, max_blocks: int, cache):
        self.index, self.device = stage, device  # its number in the pipeline
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=device)
        self.positions = torch.zeros(B, dtype=torch.int64, device=device)
        self.slot_rows = torch.full((B,), cache.scratch_row, dtype=torch.int64, device=device)
        self.scratch_block = getattr(cache, "scratch_block", 0)  # V4: where padding rows emit their entries
        self.block_table = torch.full((B, max_blocks), self.scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=device)
        self.span = torch.arange(max_blocks * cache.block_size, device=device)  # the whole block table
        self.handed = None  # a later stage's (activations, layer inputs), made at the first capture
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # its captures'

    def batch(self, b: int) -> DecodeBatch:
        return DecodeBatch(self.slot_rows[:b], self.block_table[:b], self.seq_lens[:b], self.span)


def _on(stage: _Stage):
    """The stage's device and capture stream made current (nothing to make current on the CPU)."""
    if stage.device.type != "cuda":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(stage.device))
    stack.enter_context(torch.cuda.stream(stage.stream))
    return stack


def _rows(value, b: int):
    """The first `b` rows of every tensor in `value` (tensors in dicts and tuples, or None)."""
    return tree_map(lambda t: t[:b] if isinstance(t, torch.Tensor) else t, value)


def _copy_into(dst, src) -> None:
    """Copies every tensor of `src` into its place in `dst` (the same structure)."""
    tree_map(lambda d, s: d.copy_(s) if isinstance(d, torch.Tensor) else None, dst, src)


class DecodeGraphs:
    """The captured decode graphs of one runner over one cache, per bucket (and per stage, for a layer
    pipeline). `run` returns None for a batch it has no graph for (the caller runs it eagerly)."""

    def __init__(self, runner, cache, max_batch: int, max_blocks: int):
        self.runner, self.cache, self.max_blocks = runner, cache, max_blocks
        self.buckets = buckets(max_batch)
        pipeline = runner.model.pipeline
        self.stages = [
            _Stage(stage, device or runner.device, self.buckets[-1], max_blocks, cache)
            for stage, device in pipeline.stages()
        ]
        self.piped = len(self.stages) > 1
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (bucket, stage) -> its graph
        self.outputs: dict[tuple[int, int], object] = {}  # its static outputs
        self.rows = 0  # the real rows of the batch being replayed
        self.capture_seconds, self.memory_bytes = self._capture()

    def _forward(self, b: int, k: int):
        """Stage k's part of a decode step of bucket b over its buffers: the logits [b, V] at the last
        stage, else (activations, layer inputs) for the next."""
        stage, model = self.stages[k], self.runner.model
        positions = stage.positions[:b]
        ctx = ForwardContext(
            seqs=[], positions=positions, cache=self.cache, mla_mode="absorbed", decode=stage.batch(b)
        )
        with forward_context(ctx), current_device(stage.device):
            if k == 0:
                x, inputs = model.begin(stage.input_ids[:b], positions)
            else:
                x, inputs = _rows(stage.handed, b)
            x = model.pipeline.run(model.layers, x, inputs, stage.index if self.piped else None)
            if k < len(self.stages) - 1:
                return x, inputs
            return model.logits(model.end(x))

    def _hand(self, b: int, k: int, warm) -> None:
        """Stage k-1's eager outputs `warm` into stage k's inputs (made from them the first time)."""
        stage = self.stages[k]
        if stage.handed is None:  # at the largest bucket, which is captured first
            stage.handed = tree_map(
                lambda t: torch.zeros_like(t, device=stage.device) if isinstance(t, torch.Tensor) else t, warm
            )
        _copy_into(_rows(stage.handed, b), warm)

    @torch.inference_mode()
    def _capture(self) -> tuple[float, int]:
        with uncounted(self.runner.tiered):  # the warm-up passes' padding rows are no experts' traffic
            return self._capture_all()

    def _capture_all(self) -> tuple[float, int]:
        devices = list(dict.fromkeys(stage.device for stage in self.stages))
        start = time.perf_counter()
        before = {d: torch.cuda.memory_reserved(d) for d in devices}
        pools: dict[torch.device, object] = {}  # per device: the smaller buckets reuse the largest's memory
        for b in reversed(self.buckets):
            warm = None
            for k, stage in enumerate(self.stages):
                if k > 0:  # real values: a captured graph's outputs hold none until it replays
                    self._hand(b, k, warm)
                warm = self._forward(b, k)  # warm-up: compiles the kernels and settles the allocator
                torch.cuda.synchronize(stage.device)
                self.graphs[b, k], self.outputs[b, k], pool = self._record(b, k, pools.get(stage.device))
                pools.setdefault(stage.device, pool)
        for d in devices:
            torch.cuda.synchronize(d)
        seconds = time.perf_counter() - start
        used = sum(torch.cuda.memory_reserved(d) - before[d] for d in devices)  # the pools and buffers
        pieces = sum(getattr(graph, "pieces", 1) for graph in self.graphs.values())
        log.info(
            "captured %d decode graphs (batch %s%s%s) in %.1f s, %.0f MB",
            len(self.graphs),
            self.buckets,
            f", {len(self.stages)} pipeline stages" if self.piped else "",
            f", {pieces} pieces around the tiered experts' host passes" if pieces > len(self.graphs) else "",
            seconds,
            used / 2**20,
        )
        return seconds, used

    def _record(self, b: int, k: int, pool):
        """(graph, its static outputs, its memory pool): stage k of bucket b captured on its device and
        stream, allocating from `pool` (None: a new one). With tiered experts the stage is captured in
        pieces (`SplitGraph`), one between two host passes."""
        stage = self.stages[k]
        split = SplitGraph(self, self._new_graph) if self.runner.tiered else None
        with _on(stage):
            graph = split or self._new_graph()
            graph.capture_begin(pool=pool)
            try:
                with split_capture(split):
                    outputs = self._forward(b, k)
            finally:
                graph.capture_end()
        return graph, outputs, graph.pool()

    def _new_graph(self):
        """A CUDA graph to capture into (the seam where a CPU test puts its stand-in)."""
        return torch.cuda.CUDAGraph()

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: DecodeBatch
    ) -> torch.Tensor | None:
        """The step's logits [n, V] (a view of the graph's output: read it before the next replay)."""
        n, width = input_ids.shape[0], batch.block_table.shape[1]
        b = next((b for b in self.buckets if b >= n), None)
        if b is None or width > self.max_blocks:
            return None
        self.stages[0].input_ids[:n].copy_(input_ids)  # later stages get the embeddings' output instead
        for stage in self.stages:  # every stage indexes its own device's cache rows
            stage.positions[:n].copy_(positions)
            stage.slot_rows[:n].copy_(batch.slot_rows)
            stage.slot_rows[n:b].fill_(self.cache.scratch_row)
            stage.seq_lens[:n].copy_(batch.seq_lens)
            stage.seq_lens[n:b].zero_()
            stage.block_table[:n, :width].copy_(batch.block_table)
            stage.block_table[n:b].fill_(stage.scratch_block)
        self.rows = n  # the real rows, which a split graph's host passes compute (not the padding)
        stats = self.runner.model.pipeline.stats
        stats.last_num_handoffs = stats.last_num_bytes = 0
        for k, stage in enumerate(self.stages):
            with current_device(stage.device):  # a graph replays on its device's current stream
                if k > 0:
                    x = self.outputs[b, k - 1][0]
                    stats.count(x[:n].numel() * x.element_size())  # as the eager hand-off counts it
                    _copy_into(_rows(stage.handed, b), self.outputs[b, k - 1])
                self.graphs[b, k].replay()
        return self.outputs[b, len(self.stages) - 1][:n]
