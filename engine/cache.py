"""The paged latent cache of V3/V3.2: the normalized KV latent and the roped key per token and layer (plus
V3.2's indexer keys), in blocks. Never per-head K/V. V4's state is in ds4.engine.window_cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ds4.engine.config import ModelConfig
from ds4.engine.context import SeqSlice


def with_fixed_blocks(seq: SeqSlice, blocks_per_slot: int | None, num_blocks: int) -> SeqSlice:
    """The slice with its block ids: for a cache with fixed slots (callers without a block manager), slot
    s owns the run of `blocks_per_slot` blocks from s * blocks_per_slot (slot -1, a one-off scoring pass,
    wraps to the last run)."""
    if seq.block_ids is not None:
        return seq
    assert blocks_per_slot, "a sequence without blocks needs a cache with fixed slots"
    first = seq.slot * blocks_per_slot
    return replace(seq, block_ids=tuple(b % num_blocks for b in range(first, first + blocks_per_slot)))


class PagedLatentCache:
    """Pools of blocks of `block_size` token rows per layer: [kv_lora_rank + qk_rope_head_dim] each (and
    [index_head_dim] for V3.2). A sequence's rows live in its blocks, in order. Each layer's pool lives
    on that layer's device (`layer_devices`, default all on `device`); row indices are computed on the
    first layer's, and a pipeline's forward context carries them to the others."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device,
        blocks_per_slot: int | None = None,
        layer_devices: list | None = None,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks_per_slot = blocks_per_slot  # callers without a block manager: slot s owns a fixed run
        rows = num_blocks * block_size
        self.scratch_row = rows  # one row past the blocks: where a padded decode graph's dummy rows write
        width = config.kv_lora_rank + config.qk_rope_head_dim
        devices = layer_devices or [device] * config.num_hidden_layers
        self.kv = [torch.zeros(rows + 1, width, dtype=dtype, device=d) for d in devices]
        self.index_k = (
            [torch.zeros(rows + 1, config.index_head_dim, dtype=dtype, device=d) for d in devices]
            if config.has_indexer
            else None
        )

    def with_blocks(self, seq: SeqSlice) -> SeqSlice:
        return with_fixed_blocks(seq, self.blocks_per_slot, self.num_blocks)

    def prepare(self, seq: SeqSlice) -> SeqSlice:
        """The slice with the cache rows of its positions [0, end) resolved from its block table."""
        block_ids = self.with_blocks(seq).block_ids
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

    def read_rows(self, layer: int, seq: SeqSlice, first: int, end: int) -> torch.Tensor:
        """Rows of positions [first, end) of the sequence: [end - first, C + R]."""
        return self.kv[layer][seq.rows[first:end]]

    def read_index(self, layer: int, seq: SeqSlice) -> torch.Tensor:
        return self.index_k[layer][seq.rows]  # [S, Di]

    def free_slot(self, slot: int) -> None:
        """Nothing to drop: a sequence's rows are in its blocks, which the block manager owns."""

    def has_state(self, slot: int) -> bool:
        return True  # rows live in blocks: a prefix hit needs no restoring

    def store_block(self, block_id: int, slot: int, end: int) -> None:
        """Nothing to snapshot: the block's rows are already in place."""

    def drop_block(self, block_id: int) -> None:
        """Nothing to drop: an evicted block's rows are simply overwritten later."""

    def block_template(self) -> dict[str, torch.Tensor]:
        return self.block_tensors(0)

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
