"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds, and a grammar's
token mask on the rows that have one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from ds4.engine.errors import ParamError
from ds4.engine.step_inputs import on_device

if TYPE_CHECKING:
    from ds4.engine.grammar import Grammar

SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    grammar: Grammar | None = None  # only tokens this grammar allows; "stop" when it is complete

    def __post_init__(self):
        if self.temperature < 0:
            raise ParamError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise ParamError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise ParamError(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if not 0 <= self.min_p < 1:
            raise ParamError(f"min_p must be in [0, 1), got {self.min_p}", "min_p")
        if self.max_tokens < 1:
            raise ParamError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ParamError("stop strings must be non-empty", "stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ParamError(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """Temperatures under 1e-5 are greedy: dividing by them overflows to inf (NaN probabilities)."""
        return self.temperature < SAMPLING_EPS


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token id from one row of float32 logits [V]."""
    return int(sample_batch(logits[None], [params], [generator])[0])


class TokenMask(NamedTuple):
    """The tokens some rows of a batch may take: `rows` [C] int64 and their packed bitmask `bits`
    [C, ceil(V / 32)] int32 (bit j of word w allows token 32w + j), both on the logits' device."""

    rows: torch.Tensor
    bits: torch.Tensor


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """The logits [B, V] with every token a masked row may not take at -inf; other rows untouched."""
    V = logits.shape[-1]
    assert mask.bits.shape[-1] * 32 >= V, f"bitmask of {mask.bits.shape[-1]} words for {V} tokens"
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask.bits[:, :, None] >> shifts) & 1).flatten(1)[:, :V].bool()  # [C, V]
    rows = logits.index_select(0, mask.rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, mask.rows, rows)


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    mask: TokenMask | None = None,
) -> torch.Tensor:
    """Next token ids [B] (int64, on the logits' device) for float32 logits [B, V], all rows at once and
    nothing read back: masked rows lose the tokens their grammar forbids; greedy rows take the argmax;
    the others are scaled by their temperature, cut by their top-k, min-p and top-p, and drawn as
    torch.multinomial draws one sample (the exponential race: argmax of probs / Exp(1) noise, the noise
    from the row's own generator), so a seed gives the tokens it gave when each row was sampled alone."""
    if mask is not None:
        logits = apply_token_mask(logits, mask)
    greedy = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy
    column = lambda values, dtype=torch.float32: on_device(values, dtype, logits.device)[:, None]  # noqa: E731
    logits = logits / column([1.0 if p.greedy else p.temperature for p in params])
    if any(p.top_k for p in params):  # rows without one keep every token (k = V)
        sorted_logits = logits.sort(-1, descending=True).values
        top_k = column([p.top_k or logits.shape[-1] for p in params], torch.int64).clamp(max=logits.shape[-1])
        logits = logits.masked_fill(logits < sorted_logits.gather(-1, top_k - 1), float("-inf"))
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(-1)
        min_p = column([p.min_p for p in params])
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        logits = _top_p(logits, column([p.top_p for p in params]))
    probs = logits.softmax(-1)
    noise = torch.ones_like(probs)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            noise[row].exponential_(1, generator=gen)
    drawn = (probs / noise).argmax(-1)
    return torch.where(column([p.greedy for p in params], torch.bool)[:, 0], greedy, drawn)


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps each row's most likely tokens up to and including the first past top_p (rows at 1.0 keep
    everything: their cumulative sums may round past 1 before the tail)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)
    drop[:, 0] = False  # always the most likely one (a top_p under float32's least value compares as 0)
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def logprobs_batch(logits: torch.Tensor, token_ids: torch.Tensor, top: int):
    """(each row's chosen-token log-probability [B], its `top` most likely [B, top] values and ids), on
    the device."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0]
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], token_ids[:, None][:, :0])
    return chosen, values, ids
