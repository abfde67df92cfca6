"""DeepSeek-V3.2's lightning indexer: picks the top-k cached tokens each query attends to.

Legend: T queries, S keys, Hi index heads, Di index head dim, R rope dim.
score[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] / sqrt(Di)); causal; top-`index_topk` per query.
Its rope is half-split (not interleaved like MLA's). Selection is deterministic: the k highest scores,
ties to the lower token index, -0.0 equal to +0.0, in every path (prefill, chunked, decode).
"""

from __future__ import annotations

import torch
from torch import nn

from ds4.engine.config import ModelConfig
from ds4.engine.layers.compressor import Compressor
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.quantized import compute_dtype
from ds4.engine.layers.rope import apply_rope, apply_rope_tail
from ds4.kernels import triton_enabled


def stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last dim; ties go to the lower index."""
    order = torch.sort(
        scores + 0.0, dim=-1, descending=True, stable=True
    ).indices  # + 0.0 turns -0.0 into +0.0
    return order[..., :k]


# Indexer scores of a chunk past this many elements ([queries x keys x heads]) are streamed in key blocks.
STREAMING = 1 << 22


def _block_scores(q, weights, keys, positions):
    """score[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]) for keys at or before each query's position
    (positions relative to the block's first key), -inf after: one block of the streaming top-k."""
    scores = torch.einsum("bh,bhs->bs", weights, torch.einsum("bhd,sd->bhs", q, keys).relu_())
    future = torch.arange(keys.shape[0], device=keys.device)[None, :] > positions[:, None]
    return scores.masked_fill(future, float("-inf"))


def positions_mask(chosen: torch.Tensor, keys: int, first: int = 0) -> torch.Tensor:
    """Boolean [T, keys]: which of the keys at positions first .. first + keys - 1 each query picked, from
    the positions [T, k] it picked (-1: none), with no sync: a pick outside them marks a spare column
    past the keys, which is cut off."""
    mask = torch.zeros(chosen.shape[0], keys + 1, dtype=torch.bool, device=chosen.device)
    inside = (chosen >= first) & (chosen < first + keys)
    return mask.scatter_(1, torch.where(inside, chosen - first, keys), True)[:, :keys]


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)  # kept in float32

    def _rope(self, x: torch.Tensor, rope) -> torch.Tensor:
        x_pe, x_rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(x_pe, *rope, interleaved=False), x_rest], dim=-1)

    def keys(self, x: torch.Tensor, rope) -> torch.Tensor:
        """The indexer key of each new token, to be cached: [T, Di]."""
        return self._rope(self.k_norm(self.wk(x)), rope)

    @torch.no_grad()
    def select(self, x, q_latent, rope, keys: torch.Tensor, allowed: torch.Tensor, positions) -> torch.Tensor:
        """Boolean [T, S]: the keys each query (at `positions`) picks, for the caller to keep those in
        `allowed` (the top-k of the allowed keys, or all of them where they are no more than k). Past
        STREAMING score elements, and on the Triton path, the scores stream in key blocks
        (`select_streaming`): the workspace the engine plans (ds4.engine.workspace) holds whatever the
        attention does."""
        T, S = allowed.shape
        if S <= self.topk:  # every causal key fits in the budget
            return allowed
        if T * S * self.n_heads > STREAMING or triton_enabled(x.device):
            chosen = self.select_streaming(x, q_latent, rope, keys, positions)
            return positions_mask(chosen, S)
        q = self._rope(self.wq_b(q_latent).view(T, self.n_heads, self.head_dim), rope)  # [T, Hi, Di]
        scores = torch.matmul(q.float(), keys.float().T) * self.head_dim**-0.5  # [T, Hi, S]
        scores = torch.relu(scores)
        weights = (
            self.weights_proj(x.to(compute_dtype(self.weights_proj))).float() * self.n_heads**-0.5
        )  # [T, Hi]
        index_scores = torch.matmul(weights[:, None, :], scores).squeeze(1)  # [T, S]
        index_scores = index_scores.masked_fill(~allowed, float("-inf"))
        chosen = stable_topk_indices(index_scores, self.topk)  # [T, K]
        return torch.zeros_like(allowed).scatter_(1, chosen, True)

    @torch.no_grad()
    def select_streaming(
        self, x, q_latent, rope, keys: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The positions [T, k] each query attends to (-1: none), scored over `keys` [S, Di] in blocks with
        a running top-k: memory [T, k + block] whatever S (long prefills)."""
        from ds4.kernels.indexer import indexer_scores, indexer_topk

        T = x.shape[0]
        q = self._rope(self.wq_b(q_latent).view(T, self.n_heads, self.head_dim), rope).float().contiguous()
        weights = self.weights_proj(x.to(compute_dtype(self.weights_proj))).float()
        weights = weights * (self.n_heads**-0.5 * self.head_dim**-0.5)  # ReLU commutes with the scale
        keys = keys.float().contiguous()
        block = max(256, STREAMING // (T * self.n_heads))  # keys per block: scores within the workspace
        scorer = indexer_scores if triton_enabled(x.device) else _block_scores
        return indexer_topk(q, weights, keys, positions, self.topk, keys_per_block=block, scores_fn=scorer)

    @torch.no_grad()
    def select_decode(self, x, q_latent, rope, pool: torch.Tensor, batch, block_size: int) -> torch.Tensor:
        """Pool rows [B, k] of the keys each sequence's new token attends to (-1 padded), for B sequences
        adding one token each: every cached key while a sequence has no more than k, else the top k.
        Shapes follow the batch and `batch.max_len`, never the scores: a decode graph can hold it."""
        B = x.shape[0]
        q = self._rope(self.wq_b(q_latent).view(B, self.n_heads, self.head_dim), rope)  # [B, Hi, Di]
        weights = self.weights_proj(x.to(compute_dtype(self.weights_proj))).float()
        weights = weights * (self.n_heads**-0.5 * self.head_dim**-0.5)  # ReLU commutes with the scale
        q, width = q.float().contiguous(), batch.max_len
        if triton_enabled(x.device):
            from ds4.kernels.indexer import paged_indexer_scores

            scores = paged_indexer_scores(
                q, weights, pool, batch.block_table, batch.seq_lens, block_size, width
            )
        else:
            pos = torch.arange(width, device=x.device)
            dots = torch.relu(torch.einsum("bhd,bsd->bhs", q, pool[batch.pool_rows(block_size)].float()))
            scores = torch.einsum("bh,bhs->bs", weights, dots)
            scores = scores.masked_fill(pos[None, :] >= batch.seq_lens[:, None], float("-inf"))  # [B, S]
        from ds4.kernels.indexer import paged_topk_rows, topk_ties_low

        if triton_enabled(x.device):  # the same rows, in two kernels around the top-k
            return paged_topk_rows(scores, self.topk, batch.block_table, block_size)
        chosen = topk_ties_low(scores, self.topk)  # [B, k] positions, -1 past the finite ones
        page = batch.block_table.long().gather(1, chosen.clamp(min=0) // block_size)
        return torch.where(chosen >= 0, page * block_size + chosen % block_size, -1)


class CompressedIndexer(nn.Module):
    """DeepSeek-V4's indexer for compressed sparse attention: picks, per query, the top-k compressed rows.

    Its keys come from its own overlapping compressor (width index_head_dim); a compressed row i is
    visible to a query at position p once its window is complete: i < (p + 1) // ratio. Picks past the
    visible rows come back as -1.
    """

    def __init__(self, config: ModelConfig, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = (
            config.index_n_heads,
            config.index_head_dim,
            config.index_topk,
            ratio,
        )
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)  # kept in float32
        self.compressor = Compressor(
            config.hidden_size,
            self.head_dim,
            ratio,
            True,
            config.rms_norm_eps,
            config.compress_rope,
            config.qk_rope_head_dim,
        )

    @torch.no_grad()
    def select(
        self, x, q_latent, q_rope, keys: torch.Tensor, positions: torch.Tensor, start=None
    ) -> torch.Tensor:
        """Indices [T, k] into `keys` [N, Di] (-1 = none) for queries at `positions` [T]; `start`: the
        first query's position, on the host, where the queries are consecutive (a prefill chunk)."""
        T, N = x.shape[0], keys.shape[0]
        q = apply_rope_tail(self.wq_b(q_latent).view(T, self.n_heads, self.head_dim), *q_rope)  # [T, Hi, Di]
        if T * N * self.n_heads > STREAMING:  # long: scored in blocks of keys with a running top-k
            return self._streamed(x, q.float().contiguous(), keys.float().contiguous(), positions, start)
        scores = torch.relu(torch.matmul(q.float(), keys.float().T)) * self.head_dim**-0.5  # [T, Hi, N]
        weights = self.weights_proj(x.float()).float() * self.n_heads**-0.5  # [T, Hi]
        index_scores = (scores * weights.unsqueeze(-1)).sum(dim=1)  # [T, N]
        visible = (positions + 1) // self.ratio  # [T]
        future = torch.arange(N, device=x.device)[None, :] >= visible[:, None]
        chosen = stable_topk_indices(index_scores.masked_fill(future, float("-inf")), min(self.topk, N))
        return chosen.masked_fill(chosen >= visible[:, None], -1)

    def _streamed(self, x, q, keys: torch.Tensor, positions: torch.Tensor, start) -> torch.Tensor:
        """The top-k streamed over blocks of keys (the Triton scorer on its path). With `start`, queries go
        in blocks, each over the rows complete by its last query only: a chunk's work is a staircase,
        not the rectangle of every query against every row."""
        from ds4.kernels.indexer import indexer_scores, indexer_topk

        T, N, k = x.shape[0], keys.shape[0], min(self.topk, keys.shape[0])
        weights = self.weights_proj(x.float()).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        last_visible = (positions + 1) // self.ratio - 1  # row i is complete once i < (p + 1) // ratio
        scorer = indexer_scores if triton_enabled(x.device) else _block_scores
        step = T if start is None else max(64, STREAMING // (N * self.n_heads))  # queries per block
        picks = []
        for a in range(0, T, step):
            b = min(T, a + step)
            rows = N if start is None else min(N, (start + b) // self.ratio)  # complete by query b - 1
            if rows == 0:
                picks.append(torch.full((b - a, k), -1, dtype=torch.int64, device=x.device))
                continue
            block = max(256, STREAMING // ((b - a) * self.n_heads))  # keys per block: within the workspace
            picks.append(
                indexer_topk(
                    q[a:b],
                    weights[a:b],
                    keys[:rows],
                    last_visible[a:b],
                    k,
                    keys_per_block=block,
                    scores_fn=scorer,
                )
            )
        return torch.cat(picks) if len(picks) > 1 else picks[0]

    @torch.no_grad()
    def picked_rows(self, x, q_latent, q_rope, index_pool, table: torch.Tensor, visible: torch.Tensor):
        """For B sequences adding one token each, over compressed rows paged in their blocks (`table`
        [B, blocks]): the pool rows [B, k] of the picked entries (-1 = none; k = min(index_topk, blocks *
        per_block)). The Triton path scores the index keys in place, through the table, and reads no block
        past a sequence's visible rows; the torch path gathers them first."""
        B, per_block = x.shape[0], index_pool.per_block
        if triton_enabled(x.device):
            from ds4.kernels.indexer import paged_indexer_scores, paged_topk_rows

            q = apply_rope_tail(self.wq_b(q_latent).view(B, self.n_heads, self.head_dim), *q_rope)
            weights = self.weights_proj(x.float()).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
            width = table.shape[1] * per_block
            scores = paged_indexer_scores(
                q.float().contiguous(), weights, index_pool.entries, table, visible, per_block, width
            )
            picked = paged_topk_rows(scores, self.topk, table, per_block)  # pool rows, -1 = none
        else:
            keys = index_pool.pages()[table.long()].flatten(1, 2)  # [B, E, Di]
            chosen = self.select_decode(x, q_latent, q_rope, keys, visible)  # [B, k] entry indices
            picked = torch.where(chosen >= 0, index_pool.pool_rows(table, chosen.clamp(min=0)), -1)
        return picked

    @torch.no_grad()
    def select_decode(self, x, q_latent, q_rope, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """For B sequences adding one token each: indices [B, k] into each one's `keys` [B, E, Di] (-1 =
        none), of its first `visible` [B] rows; k = min(index_topk, E) whatever the positions."""
        B, E = x.shape[0], keys.shape[1]
        q = apply_rope_tail(self.wq_b(q_latent).view(B, self.n_heads, self.head_dim), *q_rope)  # [B, Hi, Di]
        scores = torch.relu(torch.matmul(q.float(), keys.float().transpose(1, 2))) * self.head_dim**-0.5
        weights = self.weights_proj(x.float()).float() * self.n_heads**-0.5  # [B, Hi]
        index_scores = (scores * weights.unsqueeze(-1)).sum(dim=1)  # [B, E]
        future = torch.arange(E, device=x.device)[None, :] >= visible[:, None]
        chosen = stable_topk_indices(index_scores.masked_fill(future, float("-inf")), min(self.topk, E))
        return chosen.masked_fill(chosen >= visible[:, None], -1)
