"""The latent cache: per layer and sequence slot, the normalized KV latent and the roped key, plus
V3.2's indexer keys. Never per-head K/V. Contiguous rows for now; the runtime issue pages it.
"""

from __future__ import annotations

import torch

from ds4.engine.config import ModelConfig


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
