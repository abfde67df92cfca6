"""DeepSeek-V4's KV compressor: every `ratio` tokens become one compressed row, by gated pooling.

Legend: n new tokens, r ratio, d row width (head_dim, or index_head_dim for the indexer's compressor).
Each token projects a row C and a gate Z; window w's entry is sum_j softmax_j(Z_j + ape_j) * C_j over
its r tokens, RMS-normed, then roped at the window's first position (the "compress" rope).
With `overlap` (the ratio-4 kind) each token projects two halves: Ca feeds the *next* window's entry,
Cb the current one, so entry w pools 2r slots (window w-1's Ca, window w's Cb). Across calls the state
keeps the tokens of the unfinished window and the last finished window's Ca, so chunked prefill and
decode emit exactly the rows a whole-sequence pass does.

Between steps the state of every sequence lives in a `CompressorPool` (fixed-size tensors indexed by slot,
the emitted rows in the engine's cache blocks): prefill loads a sequence's state from it and stores it
back; a decode step (`Compressor.decode`) feeds one token per sequence for the whole batch at once, with
shapes that never depend on positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ds4.engine.config import RopeConfig
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.norm import RMSNorm
from ds4.engine.layers.quantized import compute_dtype
from ds4.engine.layers.rope import RotaryEmbedding, apply_rope_tail
from ds4.kernels import triton_enabled


@dataclass
class CompressorState:
    """Per sequence and compressor: what the next call continues from."""

    buffer_kv: torch.Tensor | None = None  # [< r, width] projected rows of the unfinished window
    buffer_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # [r, d] Ca half of the last finished window
    overlap_gate: torch.Tensor | None = None
    entries: torch.Tensor | None = None  # [num_entries, d] compressed, roped rows emitted so far
    keep_at: tuple[int, ...] = ()  # block ends inside the call's tokens: the overlap state there is kept
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # end -> (Ca kv, gate)

    @property
    def num_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[0]


class CompressorPool:
    """One compressor's state for every slot, in float32: the unfinished window's projected rows
    [slots, r, width] (how many are live follows from the position: position % r), the last finished
    window's Ca half [slots, r, d] (overlap kind), and the emitted rows, paged with the engine's cache
    blocks: block b holds the `per_block` = block_size / r entries of its positions at rows
    [b * per_block, (b + 1) * per_block) of `entries` [(blocks + 1) * per_block, d] (the last block is a
    padded decode graph's scratch). A sequence's entry i is in its block i // per_block, so a prefix hit
    shares the rows of its cached blocks as the latent cache shares its rows, and the pool is allocated
    once, for the cache's blocks, never for every slot at the longest context. Entry i is final once the
    position passes (i + 1) * r - 1; a decode step writes the unfinished window's entry too, which stays
    invisible until then. The entries are kept in `dtype`: the attention's in the model's (they are read
    as its keys, cast to it, so storing them cast changes no result), the indexer's in float32."""

    def __init__(
        self,
        num_slots: int,
        ratio: int,
        dim: int,
        overlap: bool,
        num_blocks: int,
        block_size: int,
        device,
        dtype: torch.dtype = torch.float32,
    ):
        width = 2 * dim if overlap else dim
        f32 = dict(dtype=torch.float32, device=device)
        self.ratio, self.overlap, self.dim = ratio, overlap, dim
        self.per_block = block_size // ratio
        self.buffer_kv = torch.zeros(num_slots, ratio, width, **f32)
        self.buffer_gate = torch.zeros(num_slots, ratio, width, **f32)
        self.overlap_kv = torch.zeros(num_slots, ratio, dim, **f32) if overlap else None
        self.overlap_gate = torch.zeros(num_slots, ratio, dim, **f32) if overlap else None
        self.entries = torch.zeros((num_blocks + 1) * self.per_block, dim, dtype=dtype, device=device)

    def pages(self) -> torch.Tensor:
        """The entries by block: [blocks + 1, per_block, d]."""
        return self.entries.view(-1, self.per_block, self.dim)

    def rows_of(self, block_ids, first: int, end: int) -> torch.Tensor:
        """Pool rows of a sequence's entries [first, end), through its block ids."""
        n = self.per_block
        blocks = torch.tensor(list(block_ids[first // n : -(-end // n)]), device=self.entries.device)
        rows = (blocks[:, None] * n + torch.arange(n, device=blocks.device)).flatten()
        return rows[first % n : first % n + end - first]

    def pool_rows(self, block_table: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Pool rows [B, n] of each sequence's `entries` [B, n] (int64) through its blocks `block_table`
        [B, blocks], on the device."""
        n = self.per_block
        return block_table.long().gather(1, entries // n) * n + entries % n

    def block_rows(self, block_id: int) -> torch.Tensor:
        """Block `block_id`'s entries [per_block, d] (a view)."""
        return self.pages()[block_id]

    def load(self, row: int, start: int, block_ids) -> CompressorState:
        """Slot `row`'s state as it stands before position `start`, for a prefill to continue from."""
        done, live = divmod(start, self.ratio)
        return CompressorState(
            buffer_kv=self.buffer_kv[row, :live],
            buffer_gate=self.buffer_gate[row, :live],
            overlap_kv=self.overlap_kv[row].clone() if self.overlap and done else None,
            overlap_gate=self.overlap_gate[row].clone() if self.overlap and done else None,
            entries=self.entries[self.rows_of(block_ids, 0, done)] if done else None,
        )

    def store(self, row: int, start: int, state: CompressorState, block_ids) -> None:
        """Writes back what a prefill from `start` added to `state`."""
        first, live = start // self.ratio, state.buffer_kv.shape[0]
        if state.num_entries > first:
            rows = self.rows_of(block_ids, first, state.num_entries)
            self.entries[rows] = state.entries[first:].to(self.entries.dtype)
        self.buffer_kv[row, :live], self.buffer_gate[row, :live] = state.buffer_kv, state.buffer_gate
        if state.overlap_kv is not None:
            self.overlap_kv[row], self.overlap_gate[row] = state.overlap_kv, state.overlap_gate

    def tensors(self) -> list[torch.Tensor]:
        return [
            t
            for t in (self.buffer_kv, self.buffer_gate, self.overlap_kv, self.overlap_gate, self.entries)
            if t is not None
        ]


class Compressor(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        dim: int,
        ratio: int,
        overlap: bool,
        eps: float,
        rope: RopeConfig,
        rope_dim: int,
    ):
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = 2 * dim if overlap else dim
        self.wkv = Linear(hidden_size, width, bias=False)
        self.wgate = Linear(hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, width))  # learned position term of the gate
        self.norm = RMSNorm(dim, eps, cast_after_weight=True)
        self.rotary = RotaryEmbedding(rope, rope_dim)  # the "compress" rope, at each window's first position

    def forward(self, x: torch.Tensor, state: CompressorState) -> torch.Tensor:
        """Feeds the new tokens x [n, D]; returns every compressed row so far [num_entries, d]."""
        r = self.ratio
        x = x.to(compute_dtype(self.wkv))  # the compressor runs in float32
        kv, gate = self.wkv(x), self.wgate(x)  # [n, width]
        first_position = state.num_entries * r
        if state.buffer_kv is not None:
            kv, gate = torch.cat([state.buffer_kv, kv]), torch.cat([state.buffer_gate, gate])
        usable = kv.shape[0] // r * r
        state.buffer_kv, state.buffer_gate = kv[usable:], gate[usable:]
        if usable == 0:
            return self._entries(state, x)
        n_windows = usable // r
        chunk_kv = kv[:usable].view(n_windows, r, -1)  # [W, r, width]
        chunk_gate = gate[:usable].view(n_windows, r, -1) + self.ape
        for end in state.keep_at:  # the overlap state at a block end: the Ca half of the window ending there
            w = (end - first_position) // r - 1
            state.kept[end] = chunk_kv[w, :, : self.dim].clone(), chunk_gate[w, :, : self.dim].clone()
        if self.overlap:
            chunk_kv, chunk_gate = self._overlap(chunk_kv, chunk_gate, state)  # [W, 2r, d]
        weights = chunk_gate.softmax(dim=1, dtype=torch.float32).to(chunk_kv.dtype)
        pooled = self.norm((chunk_kv * weights).sum(dim=1))  # [W, d]
        positions = torch.arange(n_windows, device=x.device) * r + first_position
        cos, sin = self.rotary(positions, pooled.dtype)
        rows = apply_rope_tail(pooled, cos, sin)
        state.entries = rows if state.entries is None else torch.cat([state.entries, rows])
        return state.entries

    def decode(
        self,
        x: torch.Tensor,
        pool: CompressorPool,
        rows: torch.Tensor,
        positions: torch.Tensor,
        block_table: torch.Tensor,
    ) -> None:
        """Feeds one new token per sequence, x [B, D] at `positions` [B], into the pooled state of slots
        `rows` [B]: the token joins its window's buffer, and the window's entry is pooled from the buffer
        as it stands and written as entry position // r, in that sequence's block of `block_table`
        [B, blocks] (complete, hence visible, once position % r is r - 1). Every shape is fixed by B: no
        host read of a position."""
        r, d = self.ratio, self.dim
        x = x.to(compute_dtype(self.wkv))
        if x.dtype == torch.float32 and triton_enabled(x.device):  # the rest in one kernel
            from ds4.kernels.compressor import compressor_decode

            cos, sin = self.rotary(positions // r * r, torch.float32)  # at the window's first position
            norm = self.norm
            compressor_decode(
                self.wkv(x),
                self.wgate(x),
                pool,
                self.ape,
                norm.weight,
                norm.eps,
                cos,
                sin,
                positions,
                rows,
                block_table,
            )
            return
        live = positions % r  # [B]: this token's place in its window
        pool.buffer_kv[rows, live], pool.buffer_gate[rows, live] = self.wkv(x), self.wgate(x)
        kv, gate = pool.buffer_kv[rows], pool.buffer_gate[rows] + self.ape  # [B, r, width]
        if self.overlap:  # entry w pools window w-1's Ca (slots :r) with window w's Cb (slots r:)
            earlier_kv, earlier_gate = pool.overlap_kv[rows], pool.overlap_gate[rows]  # [B, r, d]
            first = (positions < r)[:, None, None]  # the first window has no earlier one: its slots weigh 0
            chunk_kv = torch.cat([earlier_kv.masked_fill(first, 0.0), kv[..., d:]], dim=1)  # [B, 2r, d]
            chunk_gate = torch.cat([earlier_gate.masked_fill(first, float("-inf")), gate[..., d:]], dim=1)
            complete = (live == r - 1)[:, None, None]  # a finished window's Ca half feeds the next entry
            pool.overlap_kv[rows] = torch.where(complete, kv[..., :d], earlier_kv)
            pool.overlap_gate[rows] = torch.where(complete, gate[..., :d], earlier_gate)
        else:
            chunk_kv, chunk_gate = kv, gate
        weights = chunk_gate.softmax(dim=1, dtype=torch.float32).to(chunk_kv.dtype)
        pooled = self.norm((chunk_kv * weights).sum(dim=1))  # [B, d]
        cos, sin = self.rotary(positions // r * r, pooled.dtype)  # roped at the window's first position
        row = pool.pool_rows(block_table, (positions // r)[:, None])[:, 0]
        pool.entries[row] = apply_rope_tail(pooled, cos, sin).to(pool.entries.dtype)

    def _overlap(self, chunk_kv, chunk_gate, state: CompressorState):
        """Entry w pools window w-1's Ca (slots :r) with window w's Cb (slots r:)."""
        r, d = self.ratio, self.dim
        n_windows = chunk_kv.shape[0]
        kv = chunk_kv.new_zeros(n_windows, 2 * r, d)
        gate = chunk_gate.new_full((n_windows, 2 * r, d), float("-inf"))  # empty slots weigh 0
        kv[:, r:], gate[:, r:] = chunk_kv[..., d:], chunk_gate[..., d:]
        kv[1:, :r], gate[1:, :r] = chunk_kv[:-1, :, :d], chunk_gate[:-1, :, :d]
        if state.overlap_kv is not None:
            kv[0, :r], gate[0, :r] = state.overlap_kv, state.overlap_gate
        state.overlap_kv, state.overlap_gate = chunk_kv[-1, :, :d].clone(), chunk_gate[-1, :, :d].clone()
        return kv, gate

    def _entries(self, state: CompressorState, x: torch.Tensor) -> torch.Tensor:
        if state.entries is None:
            return x.new_zeros(0, self.dim)
        return state.entries
