"""DeepSeek-V4's decode state, pooled: per layer, one tensor per kind of state with a row per sequence slot
(the sliding window's ring, each compressor's state, Engram's recent ids and values), and the prefix
blocks' snapshots of it. Sequences map to rows here; the model's layers read and write the rows.
"""

from __future__ import annotations

import torch

from ds4.engine.cache import with_fixed_blocks
from ds4.engine.config import ModelConfig
from ds4.engine.context import SeqSlice
from ds4.engine.errors import ConfigError
from ds4.engine.layers.compressor import CompressorPool
from ds4.engine.layers.engram import EngramPool

CSA = "compressed_sparse_attention"


class WindowCache:
    """DeepSeek-V4's decode state of up to `num_slots` sequences, each at a row of fixed-size pools (plus a
    scratch row, where a padded decode graph's dummy sequences write): per layer a ring of the last
    `sliding_window` K=V rows [rows, window, head_dim] (position p at p % window), each compressor's
    `CompressorPool`, and Engram's `EngramPool`. What part of a row is live follows from the sequence's
    position alone, so a decode step reads and writes every sequence's state at once with fixed shapes.
    The compressors' emitted rows are paged in the engine's `num_blocks` cache blocks (plus a scratch
    block), through each sequence's block ids, as the latent cache of V3 is: every tensor here is
    allocated once, at start-up, and never moves, so a decode step can be captured as a CUDA graph.
    Callers without a block manager give `blocks_per_slot` instead: slot s owns a fixed run of blocks.

    Prefix blocks: at a block boundary (a multiple of every compression ratio, so no window is half
    done) the state a block contributes is snapshotted: the window tail, overlaps and Engram context as
    they stand at its end. Its compressed rows need no copy: they are in the block's pages, which a
    prefix hit shares. A prefill chunk may span many blocks: as the
    layers pass a block end inside the chunk (`boundaries`) they `keep` what the state is there, and
    `store_block` snapshots from that; at the chunk's own end the state is the live one. A sequence that
    hits cached blocks is restored from their snapshots and resumes exactly where a full computation
    would be.

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
        num_slots: int = 1,
        num_blocks: int | None = None,
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
        self.dtype, self.device, self.num_slots = dtype, device, num_slots
        self.blocks_per_slot = None if num_blocks else -(-max_len // block_size)
        self.num_blocks = num_blocks or num_slots * self.blocks_per_slot
        self.scratch_block = self.num_blocks  # where a padded decode graph's dummy rows emit their entries
        self.layer_devices = list(layer_devices or [device] * config.num_hidden_layers)
        self.scratch_row = num_slots
        self.rows: dict[int, int] = {}  # sequence slot -> its row in the pools
        self.free_rows = list(range(num_slots - 1, -1, -1))
        rows = num_slots + 1
        self.windows = [
            torch.zeros(rows, self.size, config.head_dim, dtype=dtype, device=d) for d in self.layer_devices
        ]
        self.compressors: dict[tuple[int, str], CompressorPool] = {}
        self.engram: dict[int, EngramPool] = {}
        for layer, (kind, ratio) in enumerate(zip(config.layer_types, config.compress_ratios, strict=True)):
            d = self.layer_devices[layer]
            if ratio:
                overlap = kind == CSA
                self.compressors[layer, "attn"] = CompressorPool(
                    rows, ratio, config.head_dim, overlap, self.num_blocks, block_size, d, dtype
                )
            if ratio and kind == CSA:
                self.compressors[layer, "index"] = CompressorPool(
                    rows, ratio, config.index_head_dim, True, self.num_blocks, block_size, d
                )
            if config.engram is not None and layer in config.engram.layer_ids:
                self.engram[layer] = EngramPool(
                    rows, config.engram, config.hc_mult, config.hidden_size, dtype, d
                )
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # block id -> its contribution
        self.kept: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (slot, block end) -> state there

    def with_blocks(self, seq: SeqSlice) -> SeqSlice:
        return with_fixed_blocks(seq, self.blocks_per_slot, self.num_blocks)

    def prepare(self, seq: SeqSlice) -> SeqSlice:
        seq = self.with_blocks(seq)
        assert len(seq.block_ids) * self.block_size >= seq.end, (
            f"{len(seq.block_ids)} blocks for {seq.end} tokens"
        )
        self._forget_kept(seq.slot)  # a step's boundaries are its own
        return seq

    def _forget_kept(self, slot: int) -> None:
        for key in [k for k in self.kept if k[0] == slot]:
            del self.kept[key]

    def boundaries(self, seq) -> range:
        """The block ends strictly inside prefill slice `seq` (its own end is the live state's)."""
        bs = self.block_size
        return range((seq.start // bs + 1) * bs, seq.end, bs)

    def keep(self, slot: int, end: int, name: str, tensor: torch.Tensor) -> None:
        """Part `name` of sequence `slot`'s state as it stands at block end `end`, for `store_block`."""
        self.kept.setdefault((slot, end), {})[name] = tensor

    def row(self, slot: int) -> int:
        """Sequence `slot`'s row in the pools, taken from the free rows on first use (Engram's history
        reset to "before the sequence"; the rest is masked by position until written)."""
        row = self.rows.get(slot)
        if row is None:
            assert self.free_rows, f"every one of the {self.num_slots} state rows is in use"
            row = self.rows[slot] = self.free_rows.pop()
            for pool in self.engram.values():
                pool.reset(row)
        return row

    def compressor(self, layer: int, name: str) -> CompressorPool:
        return self.compressors[layer, name]

    def read_window(self, layer: int, slot: int, start: int) -> torch.Tensor:
        """Rows of the (up to size - 1) positions before `start`, oldest first: [P, head_dim]."""
        earlier = torch.arange(max(0, start - self.size + 1), start, device=self.layer_devices[layer])
        return self.windows[layer][self.row(slot)][earlier % self.size]

    def write_window(self, layer: int, slot: int, start: int, rows: torch.Tensor) -> None:
        assert start + rows.shape[0] <= self.max_len, (
            f"cache overflow: {start + rows.shape[0]} > {self.max_len}"
        )
        kept = min(rows.shape[0], self.size)
        end = start + rows.shape[0]
        positions = torch.arange(end - kept, end, device=rows.device)
        self.windows[layer][self.row(slot), positions % self.size] = rows[-kept:]

    def has_state(self, slot: int) -> bool:
        return slot in self.rows

    def free_slot(self, slot: int) -> None:
        self._forget_kept(slot)
        row = self.rows.pop(slot, None)
        if row is not None:
            self.free_rows.append(row)

    # -- prefix blocks ------------------------------------------------------------------------

    def store_block(self, block_id: int, slot: int, end: int) -> None:
        """Snapshots what the block ending at position `end` contributes to sequence `slot`'s state."""
        assert end % self.block_size == 0, f"snapshots are taken at block boundaries, not at {end}"
        row, snap = self.rows[slot], {}
        kept = self.kept.pop((slot, end), None)  # a block that ended inside the last chunk: its kept state
        for layer in range(self.config.num_hidden_layers):
            if kept is not None:
                snap |= {k: v for k, v in kept.items() if k.endswith(f".{layer}")}
                continue
            snap[f"window.{layer}"] = self.read_window(layer, slot, end).clone()
            for name in ("attn", "index"):
                pool = self.compressors.get((layer, name))
                if pool is not None and pool.overlap:
                    snap[f"{name}_overlap_kv.{layer}"] = pool.overlap_kv[row].clone()
                    snap[f"{name}_overlap_gate.{layer}"] = pool.overlap_gate[row].clone()
            if layer in self.engram:
                ids, values = self.engram[layer].ids[row], self.engram[layer].values[row]
                snap[f"engram_ids.{layer}"], snap[f"engram_values.{layer}"] = ids.clone(), values.clone()
        self.snapshots[block_id] = snap

    def restore(self, slot: int, block_ids: list[int]) -> None:
        """Rebuilds sequence `slot`'s state as it stands after the given cached blocks (whose compressed
        rows are in their pages already: the sequence reads them through its block ids)."""
        self.free_slot(slot)
        row = self.row(slot)
        end = len(block_ids) * self.block_size
        last = self.snapshots[block_ids[-1]]
        for layer in range(self.config.num_hidden_layers):
            self.write_window(layer, slot, end - last[f"window.{layer}"].shape[0], last[f"window.{layer}"])
            for name in ("attn", "index"):
                pool = self.compressors.get((layer, name))
                if pool is None:
                    continue
                if pool.overlap:
                    pool.overlap_kv[row] = last[f"{name}_overlap_kv.{layer}"]
                    pool.overlap_gate[row] = last[f"{name}_overlap_gate.{layer}"]
            if layer in self.engram:
                self.engram[layer].ids[row] = last[f"engram_ids.{layer}"]
                self.engram[layer].values[row] = last[f"engram_values.{layer}"]

    def drop_block(self, block_id: int) -> None:
        self.snapshots.pop(block_id, None)

    def block_tensors(self, block_id: int) -> dict[str, torch.Tensor]:
        """What the block contributes: its snapshot and its compressed rows (views of its pages)."""
        pools = self.compressors.items()
        rows = {f"{name}_rows.{layer}": pool.block_rows(block_id) for (layer, name), pool in pools}
        return self.snapshots[block_id] | rows

    def load_block(self, block_id: int, tensors: dict[str, torch.Tensor]) -> None:
        """A block from the disk tier: its compressed rows into its pages, the rest as its snapshot; each
        tensor goes to its layer's device (names end in the layer)."""
        snap = {}
        for key, value in tensors.items():
            name, layer = key.rsplit(".", 1)
            pool = self.compressors.get((int(layer), name.removesuffix("_rows")))
            if name.endswith("_rows") and pool is not None:
                pool.block_rows(block_id).copy_(value)
            else:
                snap[key] = value.to(self.layer_devices[int(layer)])
        self.snapshots[block_id] = snap

    def block_template(self) -> dict[str, torch.Tensor]:
        """Empty tensors with the names, shapes and dtypes of every block's tensors, to check disk files
        against. Compressors run in float32 and the indexer's rows stay so; windows, Engram values and
        the attention's compressed rows are in the model's dtype."""
        cfg, bs, f32 = self.config, self.block_size, torch.float32
        out = {}
        for layer, (kind, ratio) in enumerate(zip(cfg.layer_types, cfg.compress_ratios, strict=True)):
            out[f"window.{layer}"] = torch.empty(self.size - 1, cfg.head_dim, dtype=self.dtype)
            compressors = {"attn": cfg.head_dim, "index": cfg.index_head_dim} if ratio else {}
            if kind != CSA:
                compressors.pop("index", None)
            for name, dim in compressors.items():
                rows = self.compressors[layer, name].entries  # in the pool's dtype
                out[f"{name}_rows.{layer}"] = torch.empty(bs // ratio, dim, dtype=rows.dtype)
                if kind == CSA:  # overlapping windows carry the last Ca half
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
            self.windows
            + [t for pool in self.compressors.values() for t in pool.tensors()]
            + [t for pool in self.engram.values() for t in (pool.ids, pool.values)]
            + [t for snap in self.snapshots.values() for t in snap.values()]
        )
        return sum(t.numel() * t.element_size() for t in tensors)
