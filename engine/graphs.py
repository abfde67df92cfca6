"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket (1, 2, 4, 8, then steps of 8 up to
max_num_seqs), captured once over static input buffers and the engine's cache, the batch padded up to
its bucket. Prefill and mixed steps run eagerly; so do batches past the largest bucket.

A captured step must be a device program (ds4.engine.syncs): every value it reads lives in the static
buffers below, which each replay refills with device-to-device copies, and in the cache, whose tensors
never move. Padding rows attend to nothing (length 0) and write their latent row to the cache's scratch
row (V4: their state to its scratch row, their compressed entries to its scratch block). Anchors: nano-vllm's
ModelRunner.capture_cudagraph, vLLM's full decode graphs, SGLang's cuda_graph_runner.
"""

from __future__ import annotations

import logging
import time

import torch

from ds4.engine.context import DecodeBatch, ForwardContext, forward_context
from ds4.engine.pipeline import current_device

log = logging.getLogger("ds4.engine")


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every multiple of 8, up to max_batch (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    """The captured decode graphs of one runner over one cache. `run` returns None for a batch it has no
    graph for (the caller runs it eagerly)."""

    def __init__(self, runner, cache, max_batch: int, max_blocks: int):
        self.runner, self.cache, self.max_blocks = runner, cache, max_blocks
        device = runner.device
        self.buckets = buckets(max_batch)
        B = self.buckets[-1]
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=device)
        self.positions = torch.zeros(B, dtype=torch.int64, device=device)
        self.slot_rows = torch.full((B,), cache.scratch_row, dtype=torch.int64, device=device)
        self.scratch_block = getattr(cache, "scratch_block", 0)  # V4: where padding rows emit their entries
        self.block_table = torch.full((B, max_blocks), self.scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=device)
        self.span = torch.arange(max_blocks * cache.block_size, device=device)  # the whole block table
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_seconds, self.memory_bytes = self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        batch = DecodeBatch(
            self.slot_rows[:b],
            self.block_table[:b],
            self.seq_lens[:b],
            self.span,
        )
        ctx = ForwardContext(
            seqs=[], positions=self.positions[:b], cache=self.cache, mla_mode="absorbed", decode=batch
        )
        model = self.runner.model
        with forward_context(ctx), current_device(self.runner.device):
            return model.logits(model(self.input_ids[:b], self.positions[:b]))

    @torch.inference_mode()
    def _capture(self) -> tuple[float, int]:
        start, before = time.perf_counter(), torch.cuda.memory_reserved(self.runner.device)
        pool = None
        for b in reversed(self.buckets):  # the largest first: the smaller ones reuse its memory pool
            self._forward(b)  # warm-up: compiles the kernels and settles the allocator
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)
        seconds = time.perf_counter() - start
        used = torch.cuda.memory_reserved(self.runner.device) - before  # the graphs' pool and buffers
        log.info(
            "captured %d decode graphs (batch %s) in %.1f s, %.0f MB",
            len(self.graphs),
            self.buckets,
            seconds,
            used / 2**20,
        )
        return seconds, used

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: DecodeBatch
    ) -> torch.Tensor | None:
        """The step's logits [n, V] (a view of the graph's output: read it before the next replay)."""
        n, width = input_ids.shape[0], batch.block_table.shape[1]
        b = next((b for b in self.buckets if b >= n), None)
        if b is None or width > self.max_blocks:
            return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_rows[:n].copy_(batch.slot_rows)
        self.slot_rows[n:b].fill_(self.cache.scratch_row)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.seq_lens[n:b].zero_()
        self.block_table[:n, :width].copy_(batch.block_table)
        self.block_table[n:b].fill_(self.scratch_block)
        self.graphs[b].replay()
        return self.logits[b][:n]
