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
from ds4.engine.errors import ConfigError
from ds4.engine.layers.compressor import CompressorState
from ds4.engine.layers.engram import EngramState


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
        """The slice with its block ids: a fixed-slot cache's own run of blocks when it has none (slot -1,
        a one-off scoring pass, wraps to the last run)."""
        if seq.block_ids is not None:
            return seq
        assert self.blocks_per_slot, "a sequence without blocks needs a cache with fixed slots"
        first = seq.slot * self.blocks_per_slot
        block_ids = tuple(b % self.num_blocks for b in range(first, first + self.blocks_per_slot))
        return replace(seq, block_ids=block_ids)

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


class WindowCache:
    """DeepSeek-V4's decode state per sequence (keyed by slot) and layer: a ring of the last
    `sliding_window` K=V rows, each compressor's state (its emitted rows, the unfinished window, the
    overlap), and Engram's recent ids and values.

    Prefix blocks: at a block boundary (a multiple of every compression ratio, so no window is half
    done) the state a block contributes is snapshotted: its compressed rows, and the window tail,
    overlaps and Engram context as they stand at its end. A sequence that hits cached blocks is
    restored from their snapshots and resumes exactly where a full computation would be.

    Each layer's state and snapshots live on that layer's device (`layer_devices`, default `device`).
    """

    def __init__(
        self,
        config: ModelConfig,
        max_len: int,
        dtype: torch.dtype,
        device,
        block_size: int = 256,
        layer_devices: list | None = None,
    ):
        ratios = [r for r in config.compress_ratios if r]
        if any(block_size % r for r in ratios) or block_size < config.sliding_window:
            raise ConfigError(
                f"block_size {block_size} must be a multiple of the compression ratios {sorted(set(ratios))} "
                f"and cover the {config.sliding_window}-token window"
            )
        self.config, self.max_len, self.size, self.block_size = (
            config,
            max_len,
            config.sliding_window,
            block_size,
        )
        self.row_shape, self.dtype, self.device = (config.sliding_window, config.head_dim), dtype, device
        self.layer_devices = list(layer_devices or [device] * config.num_hidden_layers)
        self.windows: dict[tuple[int, int], torch.Tensor] = {}
        self.states: dict[tuple[int, int, str], CompressorState] = {}
        self.engram_states: dict[tuple[int, int], EngramState] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # block id -> its contribution

    def prepare(self, seq: SeqSlice) -> SeqSlice:
        return seq

    def _window(self, layer: int, slot: int) -> torch.Tensor:
        key = (layer, slot)
        if key not in self.windows:
            self.windows[key] = torch.zeros(
                self.row_shape, dtype=self.dtype, device=self.layer_devices[layer]
            )
        return self.windows[key]

    def read_window(self, layer: int, slot: int, start: int) -> torch.Tensor:
        """Rows of the (up to size - 1) positions before `start`, oldest first: [P, head_dim]."""
        earlier = torch.arange(max(0, start - self.size + 1), start, device=self.layer_devices[layer])
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

    def has_state(self, slot: int) -> bool:
        return (0, slot) in self.windows

    def free_slot(self, slot: int) -> None:
        for states in (self.windows, self.states, self.engram_states):
            for key in [k for k in states if k[1] == slot]:
                del states[key]

    # -- prefix blocks ------------------------------------------------------------------------

    def store_block(self, block_id: int, slot: int, end: int) -> None:
        """Snapshots what the block ending at position `end` contributes to sequence `slot`'s state."""
        assert end % self.block_size == 0, f"snapshots are taken at block boundaries, not at {end}"
        snap = {}
        for layer in range(self.config.num_hidden_layers):
            snap[f"window.{layer}"] = self.read_window(layer, slot, end).clone()
            ratio = self.config.compress_ratios[layer]
            for name in ("attn", "index") if ratio else ():
                state = self.states.get((layer, slot, name))
                if state is None:
                    continue
                assert not state.buffer_kv.shape[0], "a block boundary leaves no window unfinished"
                per_block = self.block_size // ratio
                snap[f"{name}_rows.{layer}"] = state.entries[end // ratio - per_block : end // ratio].clone()
                if state.overlap_kv is not None:
                    snap[f"{name}_overlap_kv.{layer}"] = state.overlap_kv.clone()
                    snap[f"{name}_overlap_gate.{layer}"] = state.overlap_gate.clone()
            engram = self.engram_states.get((layer, slot))
            if engram is not None:
                snap[f"engram_ids.{layer}"], snap[f"engram_values.{layer}"] = (
                    engram.ids.clone(),
                    engram.values.clone(),
                )
        self.snapshots[block_id] = snap

    def restore(self, slot: int, block_ids: list[int]) -> None:
        """Rebuilds sequence `slot`'s state as it stands after the given cached blocks."""
        self.free_slot(slot)
        snaps = [self.snapshots[b] for b in block_ids]
        end = len(block_ids) * self.block_size
        last = snaps[-1]
        for layer in range(self.config.num_hidden_layers):
            self.write_window(layer, slot, end - last[f"window.{layer}"].shape[0], last[f"window.{layer}"])
            for name in ("attn", "index"):
                if f"{name}_rows.{layer}" not in last:
                    continue
                state = self.compressor_state(layer, slot, name)
                state.entries = torch.cat([s[f"{name}_rows.{layer}"] for s in snaps])
                state.buffer_kv = state.buffer_gate = None
                if f"{name}_overlap_kv.{layer}" in last:
                    state.overlap_kv = last[f"{name}_overlap_kv.{layer}"].clone()
                    state.overlap_gate = last[f"{name}_overlap_gate.{layer}"].clone()
            if f"engram_ids.{layer}" in last:
                engram = self.engram_state(layer, slot)
                engram.ids, engram.values = (
                    last[f"engram_ids.{layer}"].clone(),
                    last[f"engram_values.{layer}"].clone(),
                )

    def drop_block(self, block_id: int) -> None:
        self.snapshots.pop(block_id, None)

    def block_tensors(self, block_id: int) -> dict[str, torch.Tensor]:
        return self.snapshots[block_id]

    def load_block(self, block_id: int, tensors: dict[str, torch.Tensor]) -> None:
        """A snapshot from the disk tier; each tensor goes to its layer's device (names end in the layer)."""
        self.snapshots[block_id] = {
            k: v.to(self.layer_devices[int(k.rsplit(".", 1)[1])]) for k, v in tensors.items()
        }

    def block_template(self) -> dict[str, torch.Tensor]:
        """Empty tensors with the names, shapes and dtypes of every snapshot, to check disk files against.
        Compressors run in float32; windows and Engram values in the model's dtype."""
        cfg, bs, f32 = self.config, self.block_size, torch.float32
        out = {}
        for layer, (kind, ratio) in enumerate(zip(cfg.layer_types, cfg.compress_ratios, strict=True)):
            out[f"window.{layer}"] = torch.empty(self.size - 1, cfg.head_dim, dtype=self.dtype)
            compressors = {"attn": cfg.head_dim, "index": cfg.index_head_dim} if ratio else {}
            if kind != "compressed_sparse_attention":
                compressors.pop("index", None)
            for name, dim in compressors.items():
                out[f"{name}_rows.{layer}"] = torch.empty(bs // ratio, dim, dtype=f32)
                if kind == "compressed_sparse_attention":  # overlapping windows carry the last Ca half
                    out[f"{name}_overlap_kv.{layer}"] = torch.empty(ratio, dim, dtype=f32)
                    out[f"{name}_overlap_gate.{layer}"] = torch.empty(ratio, dim, dtype=f32)
            engram = cfg.engram
            if engram is not None and layer in engram.layer_ids:
                context = (engram.kernel_size - 1) * engram.max_ngram
                out[f"engram_ids.{layer}"] = torch.empty(engram.max_ngram - 1, dtype=torch.int64)
                out[f"engram_values.{layer}"] = torch.empty(
                    context, cfg.hc_mult, cfg.hidden_size, dtype=self.dtype
                )
        return out

    def nbytes(self) -> int:
        tensors = (
            list(self.windows.values())
            + [
                t
                for s in self.states.values()
                for t in (s.entries, s.buffer_kv, s.buffer_gate, s.overlap_kv, s.overlap_gate)
                if t is not None
            ]
            + [t for snap in self.snapshots.values() for t in snap.values()]
        )
        return sum(t.numel() * t.element_size() for t in tensors)
