"""The per-step ForwardContext: which sequences the flat token batch holds and where their cache lives.

The runner enters it around one forward pass; attention layers read it. Models never see scheduler state.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a step: tokens [offset, offset + num_tokens) of the flat batch."""

    slot: int  # the sequence's id in per-sequence state (V4) and its fixed blocks when `block_ids` is None
    start: int  # tokens already cached before this step = position of the first new token
    num_tokens: int
    offset: int
    block_ids: tuple[int, ...] | None = None  # the sequence's cache blocks, in order
    rows: torch.Tensor | None = field(default=None, compare=False)  # cache rows of positions [0, end)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class DecodeBatch:
    """A step in which every sequence adds one token, as device tensors: built on the host and copied in
    one go (ds4.engine.step_inputs), read by batched attention over the paged cache, and the static
    buffers a captured decode graph replays over. Rows past the real sequences (a graph's padding) have
    length 0 and write their row to the cache's scratch row (V4: their state to its scratch row)."""

    slot_rows: torch.Tensor  # [B] int64: the cache row each new token's latent row goes to (V4: the row of
    # each sequence's pooled state)
    block_table: torch.Tensor  # [B, max_blocks] int32: each sequence's cache blocks, in order (V4: where its
    # compressed rows are)
    seq_lens: torch.Tensor  # [B] int32: tokens each sequence attends to, the new one included
    span: torch.Tensor  # [max_len] int64 0, 1, ...: the positions up to the longest of seq_lens (its length
    # is the torch path's gather width, known on the host; a compiled step sees it as a dynamic size)

    @property
    def max_len(self) -> int:
        return self.span.shape[0]

    def pool_rows(self, block_size: int) -> torch.Tensor:
        """[B, max_len] the cache rows of each sequence's positions [0, max_len) through its block table
        (positions past a sequence's length point into its table's padding: mask them)."""
        pos = self.span
        return self.block_table.long()[:, pos // block_size] * block_size + pos % block_size

    def to(self, device: torch.device) -> DecodeBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return replace(
            self,
            slot_rows=move(self.slot_rows),
            block_table=move(self.block_table),
            seq_lens=move(self.seq_lens),
            span=move(self.span),
        )


@dataclass
class ForwardContext:
    seqs: list[SeqSlice]
    positions: torch.Tensor  # [T] int64
    cache: object  # a cache with write/read per layer (ds4.engine.cache)
    mla_mode: str  # "naive" (per-head K/V materialized) or "absorbed" (attention in the latent space)
    views: dict = field(default_factory=dict, repr=False, compare=False)  # device -> the step there
    decode: DecodeBatch | None = None  # every sequence adds one token: attention runs batched

    def __post_init__(self):
        self.views.setdefault(self.positions.device, self)

    def on(self, device: torch.device) -> ForwardContext:
        """This step's context with its tensors (positions, each sequence's cache rows) on `device`, made
        once per step and device: on a pipeline, a stage's attention indexes its own device's cache."""
        view = self.views.get(device)
        if view is None:
            seqs = [replace(s, rows=None if s.rows is None else s.rows.to(device)) for s in self.seqs]
            decode = None if self.decode is None else self.decode.to(device)
            view = self.views[device] = replace(
                self, seqs=seqs, positions=self.positions.to(device), decode=decode
            )
        return view


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    assert _CONTEXT is not None, "attention ran outside a forward_context(...) block"
    return _CONTEXT


def switch_forward_context(device: torch.device) -> None:
    """Makes the current context's view on `device` current: a pipeline's activations just moved there."""
    global _CONTEXT
    _CONTEXT = get_forward_context().on(device)


@contextmanager
def forward_context(ctx: ForwardContext):
    global _CONTEXT
    _CONTEXT = ctx
    try:
        yield ctx
    finally:
        _CONTEXT = None


_SPLIT = None  # the SplitGraph (ds4.engine.split_graphs) capturing now, where one is


def current_split():
    """The split decode graph being captured, or None: an MoE layer with tiered experts ends a piece
    there (its routed experts run on the host, between two replays)."""
    return _SPLIT


@contextmanager
def split_capture(split):
    """Makes `split` (or None) the split graph being captured while the block runs."""
    global _SPLIT
    _SPLIT = split
    try:
        yield split
    finally:
        _SPLIT = None
