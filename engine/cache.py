"""Decode caches per sequence slot. Never per-head K/V.

V3/V3.2: the normalized KV latent and the roped key per token and layer (plus V3.2's indexer keys).
V4: a sliding window of K=V rows and the compressors' rows and running state.
Contiguous per slot for now; the runtime issue pages them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ds4.engine.config import ModelConfig
from ds4.engine.context import SeqSlice
from ds4.engine.layers.compressor import CompressorState
from ds4.engine.layers.engram import EngramState


class PagedLatentCache:
    """Pools of blocks of `block_size` token rows per layer: [kv_lora_rank + qk_rope_head_dim] each (and
    [index_head_dim] for V3.2). A sequence's rows live in its blocks, in order."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device,
        blocks_per_slot: int | None = None,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks_per_slot = blocks_per_slot  # callers without a block manager: slot s owns a fixed run
        rows = num_blocks * block_size
        width = config.kv_lora_rank + config.qk_rope_head_dim
        layers = range(config.num_hidden_layers)
        self.kv = [torch.zeros(rows, width, dtype=dtype, device=device) for _ in layers]
        self.index_k = (
            [torch.zeros(rows, config.index_head_dim, dtype=dtype, device=device) for _ in layers]
            if config.has_indexer
            else None
        )

    def prepare(self, seq: SeqSlice) -> SeqSlice:
        """The slice with the cache rows of its positions [0, end) resolved from its block table."""
        block_ids = seq.block_ids
        if block_ids is None:
            assert self.blocks_per_slot, "a sequence without blocks needs a cache with fixed slots"
            block_ids = range(seq.slot * self.blocks_per_slot, (seq.slot + 1) * self.blocks_per_slot)
        assert len(block_ids) * self.block_size >= seq.end, f"{len(block_ids)} blocks for {seq.end} tokens"
        blocks = torch.tensor(list(block_ids), device=self.kv[0].device)
        positions = torch.arange(seq.end, device=blocks.device)
        rows = blocks[positions // self.block_size] * self.block_size + positions % self.block_size
        return replace(seq, block_ids=tuple(block_ids), rows=rows)

    def write(self, layer: int, seq: SeqSlice, kv_rows: torch.Tensor, index_rows=None) -> None:
        new = seq.rows[seq.start : seq.end]
        self.kv[layer][new] = kv_rows
        if index_rows is not None:
            self.index_k[layer][new] = index_rows

    def read(self, layer: int, seq: SeqSlice) -> torch.Tensor:
        return self.kv[layer][seq.rows]  # [S, C + R]

    def read_index(self, layer: int, seq: SeqSlice) -> torch.Tensor:
        return self.index_k[layer][seq.rows]  # [S, Di]

    def free_slot(self, slot: int) -> None:
        """Nothing to drop: a sequence's rows are in its blocks, which the block manager owns."""

    def block_tensors(self, block_id: int) -> dict[str, torch.Tensor]:
        rows = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        out = {f"kv.{i}": t[rows] for i, t in enumerate(self.kv)}
        out.update({f"index_k.{i}": t[rows] for i, t in enumerate(self.index_k or [])})
        return out

    def load_block(self, block_id: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in self.block_tensors(block_id).items():
            t.copy_(tensors[name])

    def nbytes(self) -> int:
        tensors = self.kv + (self.index_k or [])
        return sum(t.numel() * t.element_size() for t in tensors)


class WindowCache:
    """DeepSeek-V4's decode state per sequence (keyed by slot) and layer: a ring of the last
    `sliding_window` K=V rows, and each compressor's state (its emitted rows and the unfinished window).
    Not paged yet: V4 sequences keep their own state, dropped when they finish or are preempted."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device):
        self.max_len, self.size = max_len, config.sliding_window
        self.row_shape, self.dtype, self.device = (config.sliding_window, config.head_dim), dtype, device
        self.windows: dict[tuple[int, int], torch.Tensor] = {}
        self.states: dict[tuple[int, int, str], CompressorState] = {}
        self.engram_states: dict[tuple[int, int], EngramState] = {}

    def prepare(self, seq: SeqSlice) -> SeqSlice:
        return seq

    def _window(self, layer: int, slot: int) -> torch.Tensor:
        key = (layer, slot)
        if key not in self.windows:
            self.windows[key] = torch.zeros(self.row_shape, dtype=self.dtype, device=self.device)
        return self.windows[key]

    def read_window(self, layer: int, slot: int, start: int) -> torch.Tensor:
        """Rows of the (up to size - 1) positions before `start`, oldest first: [P, head_dim]."""
        earlier = torch.arange(max(0, start - self.size + 1), start, device=self.device)
        return self._window(layer, slot)[earlier % self.size]

    def write_window(self, layer: int, slot: int, start: int, rows: torch.Tensor) -> None:
        assert start + rows.shape[0] <= self.max_len, (
            f"cache overflow: {start + rows.shape[0]} > {self.max_len}"
        )
        kept = min(rows.shape[0], self.size)
        end = start + rows.shape[0]
        positions = torch.arange(end - kept, end, device=rows.device)
        self._window(layer, slot)[positions % self.size] = rows[-kept:]

    def compressor_state(self, layer: int, slot: int, name: str) -> CompressorState:
        return self.states.setdefault((layer, slot, name), CompressorState())

    def engram_state(self, layer: int, slot: int) -> EngramState:
        return self.engram_states.setdefault((layer, slot), EngramState())

    def free_slot(self, slot: int) -> None:
        for states in (self.windows, self.states, self.engram_states):
            for key in [k for k in states if k[1] == slot]:
                del states[key]

    def nbytes(self) -> int:
        tensors = list(self.windows.values()) + [
            t
            for s in self.states.values()
            for t in (s.entries, s.buffer_kv, s.buffer_gate, s.overlap_kv, s.overlap_gate)
            if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in tensors)
