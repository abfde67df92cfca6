"""Decode caches per sequence slot. Never per-head K/V.

V3/V3.2: the normalized KV latent and the roped key per token and layer (plus V3.2's indexer keys).
V4: a sliding window of K=V rows and the compressors' rows and running state.
Contiguous per slot for now; the runtime issue pages them.
"""

from __future__ import annotations

import torch

from ds4.engine.config import ModelConfig
from ds4.engine.layers.compressor import CompressorState
from ds4.engine.layers.engram import EngramState


class LatentCache:
    """Rows of [kv_lora_rank + qk_rope_head_dim] (and [index_head_dim]) per token, per layer."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device):
        self.max_len = max_len
        width = config.kv_lora_rank + config.qk_rope_head_dim
        shape = (num_slots, max_len)
        self.kv = [
            torch.zeros(*shape, width, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.index_k = (
            [
                torch.zeros(*shape, config.index_head_dim, dtype=dtype, device=device)
                for _ in range(config.num_hidden_layers)
            ]
            if config.has_indexer
            else None
        )

    def write(self, layer: int, slot: int, start: int, kv_rows: torch.Tensor, index_rows=None) -> None:
        end = start + kv_rows.shape[0]
        assert end <= self.max_len, f"cache overflow: {end} > {self.max_len} tokens"
        self.kv[layer][slot, start:end] = kv_rows
        if index_rows is not None:
            self.index_k[layer][slot, start:end] = index_rows

    def read(self, layer: int, slot: int, end: int) -> torch.Tensor:
        return self.kv[layer][slot, :end]  # [S, C + R]

    def read_index(self, layer: int, slot: int, end: int) -> torch.Tensor:
        return self.index_k[layer][slot, :end]  # [S, Di]

    def nbytes(self) -> int:
        tensors = self.kv + (self.index_k or [])
        return sum(t.numel() * t.element_size() for t in tensors)


class WindowCache:
    """DeepSeek-V4's decode state per layer and sequence slot: a ring of the last `sliding_window`
    K=V rows, and each compressor's state (its emitted rows and the unfinished window)."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device):
        self.max_len = max_len
        self.size = config.sliding_window
        shape = (num_slots, self.size, config.head_dim)
        self.window = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.states: dict[tuple[int, int, str], CompressorState] = {}
        self.engram_states: dict[tuple[int, int], EngramState] = {}

    def read_window(self, layer: int, slot: int, start: int) -> torch.Tensor:
        """Rows of the (up to size - 1) positions before `start`, oldest first: [P, head_dim]."""
        earlier = torch.arange(max(0, start - self.size + 1), start, device=self.window[layer].device)
        return self.window[layer][slot, earlier % self.size]

    def write_window(self, layer: int, slot: int, start: int, rows: torch.Tensor) -> None:
        assert start + rows.shape[0] <= self.max_len, (
            f"cache overflow: {start + rows.shape[0]} > {self.max_len}"
        )
        kept = min(rows.shape[0], self.size)
        end = start + rows.shape[0]
        positions = torch.arange(end - kept, end, device=rows.device)
        self.window[layer][slot, positions % self.size] = rows[-kept:]

    def compressor_state(self, layer: int, slot: int, name: str) -> CompressorState:
        return self.states.setdefault((layer, slot, name), CompressorState())

    def engram_state(self, layer: int, slot: int) -> EngramState:
        return self.engram_states.setdefault((layer, slot), EngramState())

    def nbytes(self) -> int:
        tensors = list(self.window) + [
            t
            for s in self.states.values()
            for t in (s.entries, s.buffer_kv, s.buffer_gate, s.overlap_kv, s.overlap_gate)
            if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in tensors)
