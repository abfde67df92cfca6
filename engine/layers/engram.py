"""Engram: hashed n-gram conditional memory (deepseek-ai/Engram), an optional module of V4 blocks.

Legend: T tokens, N mHC streams, D hidden size, G n-gram orders (2..max_ngram), Hn heads per order,
E = n_embed_per_ngram (each head looks up E / Hn dims).
For each token, the normalized ids of its last n tokens (n = 2..max_ngram) are mixed with per-layer odd
multipliers (XOR of products) and reduced modulo a distinct prime per head; the looked-up rows form a
memory vector m [G*E]. Per stream h, a gate sigmoid(signed_sqrt(<norm(W_k,h m), norm(x_h)> / sqrt(D)))
scales the value W_v m; a causal depthwise convolution (dilation max_ngram) over time refines it, and
the sum is added to the residual streams before attention. A decode step touches a fixed number of rows:
the last max_ngram - 1 token ids and (kernel - 1) * dilation earlier values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ds4.engine.config import EngramConfig
from ds4.engine.layers.linear import Linear

SEED_PRIME = 10007  # per-layer multiplier seeds: seed + 10007 * layer_id, as published


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def table_primes(cfg: EngramConfig) -> dict[int, list[list[int]]]:
    """Per layer, per n-gram order, per head: the next prime above the order's table size, never reused."""
    seen: set[int] = set()
    out = {}
    for layer in cfg.layer_ids:
        per_order = []
        for order in range(2, cfg.max_ngram + 1):
            start, heads = cfg.vocab_sizes[order - 2] - 1, []
            for _ in range(cfg.n_head_per_ngram):
                candidate = start + 1
                while not _is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                heads.append(candidate)
                start = candidate
            per_order.append(heads)
        out[layer] = per_order
    return out


def layer_multipliers(cfg: EngramConfig, layer_id: int, normalized_vocab: int) -> list[int]:
    """Odd multipliers, one per n-gram position, drawn as the published design draws them."""
    half_bound = max(1, int(np.iinfo(np.int64).max // normalized_vocab) // 2)
    rng = np.random.default_rng(int(cfg.seed + SEED_PRIME * layer_id))
    return [int(r) * 2 + 1 for r in rng.integers(0, half_bound, size=(cfg.max_ngram,), dtype=np.int64)]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Embedding(nn.Module):
    """All heads' tables in one, each head's rows after the previous heads' (`offsets`)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)


class _ShortConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int, hc_mult: int, hidden_size: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)
        self.norms = nn.ModuleList(_Norm(hidden_size) for _ in range(hc_mult))


@dataclass
class EngramState:
    """Per sequence and layer: the earlier normalized ids and gated values the next step reads."""

    ids: torch.Tensor | None = None  # [<= max_ngram - 1], -1 before the sequence's first token
    values: torch.Tensor | None = None  # [<= context, N, D]
    kept: dict[int, EngramState] = field(default_factory=dict)  # tokens into a chunk -> the state there


class EngramPool:
    """One Engram layer's state for every slot, fixed-size: the last max_ngram - 1 normalized ids
    [slots, max_ngram - 1] (-1 before the sequence: hashed as the pad id) and the last `context` gated
    values [slots, context, N, D] (zeros before the sequence: what the causal convolution pads with)."""

    def __init__(self, num_slots: int, cfg: EngramConfig, hc_mult: int, hidden_size: int, dtype, device):
        context = (cfg.kernel_size - 1) * cfg.max_ngram
        self.ids = torch.full((num_slots, cfg.max_ngram - 1), -1, dtype=torch.int64, device=device)
        self.values = torch.zeros(num_slots, context, hc_mult, hidden_size, dtype=dtype, device=device)

    def reset(self, row: int) -> None:
        self.ids[row], self.values[row] = -1, 0.0

    def load(self, row: int) -> EngramState:
        return EngramState(self.ids[row].clone(), self.values[row].clone())

    def store(self, row: int, state: EngramState) -> None:
        self.ids[row], self.values[row] = state.ids, state.values


class Engram(nn.Module):
    def __init__(
        self,
        cfg: EngramConfig,
        layer_id: int,
        hidden_size: int,
        hc_mult: int,
        normalized_vocab: int,
        pad_id: int,
    ):
        super().__init__()
        self.cfg, self.layer_id, self.hc, self.pad_id = cfg, layer_id, hc_mult, pad_id
        primes = [p for order in table_primes(cfg)[layer_id] for p in order]
        # plain tensors, not buffers: models are built on the meta device and these are derived
        self.offsets = torch.tensor([0] + primes[:-1], device="cpu").cumsum(0)
        self.primes = torch.tensor(primes, device="cpu")
        self.multipliers = layer_multipliers(cfg, layer_id, normalized_vocab)
        head_dim = cfg.n_embed_per_ngram // cfg.n_head_per_ngram
        memory_dim = (cfg.max_ngram - 1) * cfg.n_embed_per_ngram
        # Module names follow the published design, so its checkpoints load as they are.
        self.multi_head_embedding = _Embedding(sum(primes), head_dim)
        self.value_proj = Linear(memory_dim, hidden_size)
        self.key_projs = nn.ModuleList(Linear(memory_dim, hidden_size) for _ in range(hc_mult))
        self.norm1 = nn.ModuleList(_Norm(hidden_size) for _ in range(hc_mult))  # keys
        self.norm2 = nn.ModuleList(_Norm(hidden_size) for _ in range(hc_mult))  # queries
        self.short_conv = _ShortConv(hc_mult * hidden_size, cfg.kernel_size, hc_mult, hidden_size)

    @property
    def context(self) -> int:
        """Earlier value rows one step's convolution reads."""
        return (self.cfg.kernel_size - 1) * self.cfg.max_ngram

    def _tables_on(self, device: torch.device) -> None:
        if self.primes.device != device:
            self.primes, self.offsets = self.primes.to(device), self.offsets.to(device)

    def hash_ids(self, ids: torch.Tensor, earlier_ids: torch.Tensor) -> torch.Tensor:
        """Table rows [T, G * Hn] of normalized ids [T], preceded by up to max_ngram - 1 earlier ones."""
        n_prev = self.cfg.max_ngram - 1
        self._tables_on(ids.device)
        pad = torch.full((n_prev - earlier_ids.shape[0],), -1, dtype=torch.long, device=ids.device)
        history = torch.cat([pad, earlier_ids.long(), ids.long()])  # [n_prev + T], -1 before the sequence
        T = ids.shape[0]
        return self._hash([history[n_prev - k : n_prev - k + T] for k in range(self.cfg.max_ngram)])

    def _hash(self, shifted: list[torch.Tensor]) -> torch.Tensor:
        """Table rows [T, G * Hn] from the ids of tokens t, t - 1, ... (shifted[k] [T], -1: none)."""
        shifted = [torch.where(s < 0, self.pad_id, s) for s in shifted]
        rows, mix = [], shifted[0] * self.multipliers[0]
        for order in range(2, self.cfg.max_ngram + 1):
            mix = torch.bitwise_xor(mix, shifted[order - 1] * self.multipliers[order - 1])
            heads = self.primes[
                (order - 2) * self.cfg.n_head_per_ngram : (order - 1) * self.cfg.n_head_per_ngram
            ]
            rows.append(torch.remainder(mix[:, None], heads))  # [T, Hn]
        return torch.cat(rows, dim=1) + self.offsets  # [T, G * Hn]

    def step(
        self, streams: torch.Tensor, ids: torch.Tensor, state: EngramState, keep_at: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """What to add to one sequence's streams [T, N, D] for its normalized ids [T]; advances `state`,
        and keeps in `state.kept` the state as it stands after each count of tokens in `keep_at` (the
        block ends inside the chunk)."""
        earlier_ids = ids[:0] if state.ids is None else state.ids
        earlier = streams[:0] if state.values is None else state.values
        out, values = self(streams, ids, earlier_ids, earlier)
        all_ids, all_values = torch.cat([earlier_ids, ids]), torch.cat([earlier, values])
        n_ids, n_values = self.cfg.max_ngram - 1, self.context

        def after(n: int) -> EngramState:  # a copy: the chunk's tensors are not kept alive by it
            kept_ids = all_ids[: earlier_ids.shape[0] + n][-n_ids:]
            return EngramState(kept_ids.clone(), all_values[: earlier.shape[0] + n][-n_values:].clone())

        state.kept = {n: after(n) for n in keep_at}
        state.ids, state.values = all_ids[-n_ids:], all_values[-n_values:]
        return out

    def decode(self, streams: torch.Tensor, ids: torch.Tensor, pool: EngramPool, rows: torch.Tensor):
        """What to add to the streams [B, N, D] of B sequences adding one token each (normalized ids [B]),
        their state at `rows` [B] of the pool, which advances by one token: fixed shapes throughout."""
        self._tables_on(ids.device)
        history = torch.cat([pool.ids[rows], ids[:, None]], dim=1)  # [B, max_ngram]: oldest first
        n_prev = self.cfg.max_ngram - 1
        table_rows = self._hash([history[:, n_prev - k] for k in range(self.cfg.max_ngram)])  # [B, G * Hn]
        values = self._gated_values(streams, table_rows)  # [B, N, D]
        earlier = pool.values[rows]  # [B, context, N, D]
        B, N, D = values.shape
        window = torch.cat([earlier, values[:, None]], dim=1)  # [B, context + 1, N, D]
        norms, eps = self.short_conv.norms, self.cfg.conv_norm_eps
        normed = torch.cat([_rms_norm(window[:, :, h], norms[h].weight, eps) for h in range(N)], dim=-1)
        y = F.conv1d(
            normed.transpose(1, 2), self.short_conv.conv.weight, groups=N * D, dilation=self.cfg.max_ngram
        )
        pool.ids[rows], pool.values[rows] = history[:, 1:], window[:, 1:]
        return values + F.silu(y[..., 0]).view(B, N, D)

    def forward(self, streams, ids, earlier_ids, earlier_values) -> tuple[torch.Tensor, torch.Tensor]:
        """streams [T, N, D]; returns (what to add to them [T, N, D], the gated values [T, N, D])."""
        values = self._gated_values(streams, self.hash_ids(ids, earlier_ids))
        return values + self._short_conv(values, earlier_values), values

    def _gated_values(self, streams: torch.Tensor, table_rows: torch.Tensor) -> torch.Tensor:
        """Per stream, sigmoid-gated value projections of the looked-up memory: [T, N, D]."""
        D = streams.shape[-1]
        memory = self.multi_head_embedding.embedding(table_rows).flatten(1)  # [T, G * E]
        gates = []
        for h in range(self.hc):
            key = _rms_norm(self.key_projs[h](memory), self.norm1[h].weight, self.cfg.norm_eps)
            query = _rms_norm(streams[:, h], self.norm2[h].weight, self.cfg.norm_eps)
            gate = (key * query).sum(-1) / math.sqrt(D)
            gates.append(torch.sigmoid(gate.abs().clamp_min(1e-6).sqrt() * gate.sign()))
        return torch.stack(gates, dim=1).unsqueeze(-1) * self.value_proj(memory).unsqueeze(1)  # [T, N, D]

    def _short_conv(self, values: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        """SiLU(causal depthwise conv over time of the per-stream-normed values), dilation = max_ngram."""
        T, N, D = values.shape
        norms, eps = self.short_conv.norms, self.cfg.conv_norm_eps
        rows = torch.cat([earlier, values])  # [P + T, N, D]
        normed = torch.cat([_rms_norm(rows[:, h], norms[h].weight, eps) for h in range(N)], dim=-1)
        seq = F.pad(normed.T.unsqueeze(0), (self.context - earlier.shape[0], 0))  # [1, N * D, context + T]
        y = F.conv1d(seq, self.short_conv.conv.weight, groups=N * D, dilation=self.cfg.max_ngram)
        return F.silu(y[0].T).view(T, N, D)


def normalized_token_map(tokenizer_file, vocab_size: int, pad_id: int) -> tuple[torch.Tensor, int, int]:
    """(token id -> normalized id [vocab], number of normalized ids, normalized pad id).

    Tokens that differ only in case, accents, Unicode form or runs of whitespace share a normalized id,
    as in the published design; without a tokenizer every token is its own.
    """
    if tokenizer_file is None:
        return torch.arange(vocab_size, device="cpu"), vocab_size, pad_id
    from tokenizers import Regex, Tokenizer, normalizers

    tok = Tokenizer.from_file(str(tokenizer_file))
    sentinel = "\ue000"
    normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), sentinel),
            normalizers.Strip(),
            normalizers.Replace(sentinel, " "),
        ]
    )
    key_to_id: dict[str, int] = {}
    table = []
    for tid in range(vocab_size):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid) or text
        else:
            key = normalizer.normalize_str(text) or text
        table.append(key_to_id.setdefault(key, len(key_to_id)))
    token_map = torch.tensor(table, device="cpu")
    return token_map, len(key_to_id), int(token_map[pad_id]) if 0 <= pad_id < vocab_size else pad_id
