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


@dataclass
class ForwardContext:
    seqs: list[SeqSlice]
    positions: torch.Tensor  # [T] int64
    cache: object  # a cache with write/read per layer (ds4.engine.cache)
    mla_mode: str  # "naive" (per-head K/V materialized) or "absorbed" (attention in the latent space)
    views: dict = field(default_factory=dict, repr=False, compare=False)  # device -> the step there

    def __post_init__(self):
        self.views.setdefault(self.positions.device, self)

    def on(self, device: torch.device) -> ForwardContext:
        """This step's context with its tensors (positions, each sequence's cache rows) on `device`, made
        once per step and device: on a pipeline, a stage's attention indexes its own device's cache."""
        view = self.views.get(device)
        if view is None:
            seqs = [replace(s, rows=None if s.rows is None else s.rows.to(device)) for s in self.seqs]
            view = self.views[device] = replace(self, seqs=seqs, positions=self.positions.to(device))
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
