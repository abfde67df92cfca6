"""DeepSeek-V4's KV compressor: every `ratio` tokens become one compressed row, by gated pooling.

Legend: n new tokens, r ratio, d row width (head_dim, or index_head_dim for the indexer's compressor).
Each token projects a row C and a gate Z; window w's entry is sum_j softmax_j(Z_j + ape_j) * C_j over
its r tokens, RMS-normed, then roped at the window's first position (the "compress" rope).
With `overlap` (the ratio-4 kind) each token projects two halves: Ca feeds the *next* window's entry,
Cb the current one, so entry w pools 2r slots (window w-1's Ca, window w's Cb). Across calls the state
keeps the tokens of the unfinished window and the last finished window's Ca, so chunked prefill and
decode emit exactly the rows a whole-sequence pass does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ds4.engine.config import RopeConfig
from ds4.engine.layers.norm import RMSNorm
from ds4.engine.layers.quantized import compute_dtype
from ds4.engine.layers.rope import RotaryEmbedding, apply_rope_tail


@dataclass
class CompressorState:
    """Per sequence and compressor: what the next call continues from."""

    buffer_kv: torch.Tensor | None = None  # [< r, width] projected rows of the unfinished window
    buffer_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # [r, d] Ca half of the last finished window
    overlap_gate: torch.Tensor | None = None
    entries: torch.Tensor | None = None  # [num_entries, d] compressed, roped rows emitted so far

    @property
    def num_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[0]


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
        self.wkv = nn.Linear(hidden_size, width, bias=False)
        self.wgate = nn.Linear(hidden_size, width, bias=False)
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
        if self.overlap:
            chunk_kv, chunk_gate = self._overlap(chunk_kv, chunk_gate, state)  # [W, 2r, d]
        weights = chunk_gate.softmax(dim=1, dtype=torch.float32).to(chunk_kv.dtype)
        pooled = self.norm((chunk_kv * weights).sum(dim=1))  # [W, d]
        positions = torch.arange(n_windows, device=x.device) * r + first_position
        cos, sin = self.rotary(positions, pooled.dtype)
        rows = apply_rope_tail(pooled, cos, sin)
        state.entries = rows if state.entries is None else torch.cat([state.entries, rows])
        return state.entries

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
