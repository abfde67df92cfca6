"""DeepSeek-V4 attention: one shared K=V head over a sliding window plus compressed rows, with a sink.

Legend: T new tokens, H query heads, Dh head_dim (512 in V4), S keys (window + compressed), G o_groups.
Per layer kind:
- sliding_attention: the last `sliding_window` tokens only (plain rope, `rope_theta`);
- compressed_sparse_attention: + ratio-4 overlapping compressed rows, top-`index_topk` per query chosen
  by the indexer;
- heavily_compressed_attention: + every visible ratio-128 compressed row.
Rope covers the trailing `qk_rope_head_dim` dims; since keys double as values, the output's rope slice
is rotated back by the query's angle. A learned per-head sink absorbs probability mass. The output
projection is grouped and low-rank: each of G head groups to `o_lora_rank`, then one mix to D.
"""

from __future__ import annotations

import torch
from torch import nn

from ds4.engine.config import ModelConfig
from ds4.engine.context import get_forward_context
from ds4.engine.layers.compressor import Compressor
from ds4.engine.layers.hyper import unweighted_rms_norm
from ds4.engine.layers.indexer import CompressedIndexer, positions_mask
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.norm import RMSNorm
from ds4.engine.layers.quantized import dense_weight
from ds4.engine.layers.rope import apply_rope_tail
from ds4.kernels import triton_enabled

CSA = "compressed_sparse_attention"
WORKSPACE = 1 << 24  # score elements ([queries x heads x keys]) computed at once; more run in query blocks


class CompressedAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.kind = config.layer_types[layer_id]
        ratio = config.compress_ratios[layer_id]
        self.rope_kind = "compress" if ratio else "main"
        D, H, Dh = config.hidden_size, config.num_attention_heads, config.head_dim
        self.n_heads, self.head_dim, self.window = H, Dh, config.sliding_window
        self.o_groups, self.eps = config.o_groups, config.rms_norm_eps
        self.wq_a = Linear(D, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, cast_after_weight=True)
        self.wq_b = Linear(config.q_lora_rank, H * Dh, bias=False)
        self.wkv = Linear(D, Dh, bias=False)
        self.norm = RMSNorm(Dh, config.rms_norm_eps, cast_after_weight=True)
        self.wo_a = Linear(H * Dh // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.wo_b = Linear(config.o_groups * config.o_lora_rank, D, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(H))
        self.compressor = (
            Compressor(
                D,
                Dh,
                ratio,
                self.kind == CSA,
                config.rms_norm_eps,
                config.compress_rope,
                config.qk_rope_head_dim,
            )
            if ratio
            else None
        )
        self.indexer = CompressedIndexer(config, ratio) if self.kind == CSA else None
        self.scale = Dh**-0.5

    def forward(self, x: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        ctx = get_forward_context()
        T, H, Dh = x.shape[0], self.n_heads, self.head_dim
        cos, sin = ropes[self.rope_kind]
        q_latent = self.q_norm(self.wq_a(x))  # [T, q_lora_rank]
        q = unweighted_rms_norm(self.wq_b(q_latent).view(T, H, Dh), self.eps)
        q = apply_rope_tail(q, cos, sin)  # [T, H, Dh]
        kv = apply_rope_tail(self.norm(self.wkv(x)), cos, sin)  # [T, Dh]: key and value alike

        if ctx.decode is not None:  # decode: every sequence's one token at once, from the pooled state
            out = self._decode(x, q, q_latent, kv, ropes, ctx)
        else:  # prefill: sequence by sequence, reading and writing the pooled state
            outs = []
            for seq in ctx.seqs:
                new = slice(seq.offset, seq.offset + seq.num_tokens)
                positions = ctx.positions[new]  # [n]
                keys = self._window(ctx.cache, seq, kv[new])
                window_keys = keys.shape[0]  # the earlier rows, then the new: key k at position end - S_w + k
                chosen = None
                if self.compressor is not None:
                    rows, chosen = self._compressed(
                        ctx.cache, seq, x[new], q_latent[new], ropes, positions, new
                    )
                    keys = torch.cat([keys, rows.to(keys.dtype)])
                outs.append(self._attend(q[new], keys, window_keys, seq.start, chosen))
            out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [T, H, Dh]
        out = apply_rope_tail(out, cos, sin, negate=True)  # the values' rope slice back to the query's frame
        grouped = out.reshape(T, self.o_groups, -1)  # [T, G, H * Dh / G]
        w_a = dense_weight(self.wo_a).unflatten(0, (self.o_groups, -1))  # [G, o_lora_rank, H * Dh / G]
        return self.wo_b(torch.einsum("tgi,goi->tgo", grouped, w_a).flatten(1))

    def _window(self, cache, seq, new_rows):
        """Keys of the sliding window: the cached earlier rows, then the new ones."""
        earlier = cache.read_window(self.layer_id, seq.slot, seq.start)  # [P, Dh]
        cache.write_window(self.layer_id, seq.slot, seq.start, new_rows)
        keys = torch.cat([earlier, new_rows])  # positions start - P .. end - 1
        first, dtype = seq.start - earlier.shape[0], earlier.dtype
        for end in cache.boundaries(seq):  # the window as it stands at each block end inside the chunk
            tail = keys[max(0, end - cache.size + 1) - first : end - first]
            cache.keep(seq.slot, end, f"window.{self.layer_id}", tail.to(dtype, copy=True))
        return keys

    def _compressed(self, cache, seq, x, q_latent, ropes, positions, new):
        """Compressed rows so far, and the indexer's picks [n, k] among them (-1: none) where the layer has
        one (else None: every complete row is visible)."""
        rows = self._compress(self.compressor, cache, "attn", seq, x)  # [N, Dh]
        if self.indexer is None:
            return rows, None
        index_keys = self._compress(self.indexer.compressor, cache, "index", seq, x)
        q_rope = (ropes["compress"][0][new], ropes["compress"][1][new])
        return rows, self.indexer.select(x, q_latent, q_rope, index_keys, positions, seq.start)

    def _compress(self, compressor: Compressor, cache, name: str, seq, x: torch.Tensor) -> torch.Tensor:
        """Feeds one sequence's new tokens to a compressor from its pooled state; every row so far."""
        pool, row = cache.compressor(self.layer_id, name), cache.row(seq.slot)
        state = pool.load(row, seq.start, seq.block_ids)
        state.keep_at = tuple(cache.boundaries(seq)) if compressor.overlap else ()
        rows = compressor(x, state)
        pool.store(row, seq.start, state, seq.block_ids)
        for end, (kv, gate) in state.kept.items():  # the overlap state at each block end inside the chunk
            cache.keep(seq.slot, end, f"{name}_overlap_kv.{self.layer_id}", kv)
            cache.keep(seq.slot, end, f"{name}_overlap_gate.{self.layer_id}", gate)
        return rows

    def _decode(self, x, q, q_latent, kv, ropes, ctx) -> torch.Tensor:
        """B sequences' new tokens (one each) over their window in the pooled state (read through each
        sequence's row, ctx.decode.slot_rows) and their compressed rows (paged in their blocks,
        ctx.decode.block_table), masked by position: fixed shapes, no host read, so the step can be
        captured. On the Triton path the indexer scores the compressed keys where they are paged, and
        attention reads the window's and the picked rows in place: nothing grows with the context but
        the index scores. On the torch path the rows are gathered first."""
        cache, batch, positions = ctx.cache, ctx.decode, ctx.positions
        rows, table = batch.slot_rows, batch.block_table
        ring = cache.windows[self.layer_id]  # [slots, W, Dh]: position p at p % W
        ring[rows, positions % self.window] = kv.to(ring.dtype)
        W = self.window
        ring_pos = positions[:, None] - (positions[:, None] - torch.arange(W, device=x.device)) % W  # [B, W]
        allowed = ring_pos >= 0
        picked = pool = None
        if self.compressor is not None:
            pool = cache.compressor(self.layer_id, "attn")
            self.compressor.decode(x, pool, rows, positions, table)
            visible = (positions + 1) // self.compressor.ratio  # [B]: entries whose window is complete
            if self.indexer is None:  # every complete window: the pool rows of the table's entries
                entry = torch.arange(table.shape[1] * pool.per_block, device=x.device).expand(len(table), -1)
                picked = torch.where(entry < visible[:, None], pool.pool_rows(table, entry), -1)
            else:  # the indexer's top-k of them
                index_pool = cache.compressor(self.layer_id, "index")
                self.indexer.compressor.decode(x, index_pool, rows, positions, table)
                picked = self.indexer.picked_rows(x, q_latent, ropes["compress"], index_pool, table, visible)
        if triton_enabled(x.device):
            window_rows = torch.where(allowed, rows[:, None] * W + torch.arange(W, device=x.device), -1)
            parts = [(ring.flatten(0, 1), window_rows)]
            if pool is not None:
                parts.append((pool.entries, picked))
            return self._attend_rows(q.contiguous(), parts).to(ring.dtype)
        keys = ring[rows]  # [B, W, Dh]
        if pool is not None:
            keys = torch.cat([keys, pool.entries[picked.clamp(min=0)].to(keys.dtype)], dim=1)
            allowed = torch.cat([allowed, picked >= 0], dim=1)
        return self._attend_batch(q, keys, allowed)

    def _attend_rows(self, q: torch.Tensor, parts) -> torch.Tensor:
        """One query per sequence q [B, H, Dh] over the rows each names in each (kv, rows [B, n]) part
        (-1 = none), with the sink: the sparse attention kernel per part, read in place, merged by their
        log-sum-exps (float32 [B, H, Dh])."""
        from ds4.kernels.mla_decode import combine_splits
        from ds4.kernels.sparse_attention import sparse_attention

        if len(parts) == 1:
            kv, picked = parts[0]
            return sparse_attention(q, kv, picked, self.scale, kv.shape[-1], self.attn_sink)[0]
        results = [sparse_attention(q, kv, picked, self.scale, kv.shape[-1]) for kv, picked in parts]
        out, lse = torch.empty_like(results[0][0]), torch.empty_like(results[0][1])
        part = torch.stack([o for o, _ in results], dim=2)  # [B, H, parts, Dh]
        part_lse = torch.stack([r[1] for r in results], dim=2)  # [B, H, parts]
        combine_splits(part, part_lse, out, lse, self.attn_sink)
        return out

    def _attend_batch(self, q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """One query per sequence q [B, H, Dh] over its own keys [B, S, Dh] where `allowed` [B, S]."""
        H = self.n_heads
        scores = torch.bmm(q, keys.transpose(1, 2)).mul_(self.scale)  # bhd,bsd->bhs [B, H, S]
        scores.masked_fill_(~allowed[:, None, :], float("-inf"))
        sinks = self.attn_sink.to(scores.dtype).view(1, H, 1)
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), sinks)  # [B, H, 1]: the sink is a column
        probs = scores.sub_(top).exp_()
        total = probs.sum(dim=-1, keepdim=True) + (sinks - top).exp()
        return torch.bmm(probs.to(keys.dtype), keys) / total.to(keys.dtype)  # bhs,bsd->bhd [B, H, Dh]

    def _attend(self, q, keys: torch.Tensor, window_keys: int, start: int, chosen=None) -> torch.Tensor:
        """softmax over [scores, sink] per head, sink dropped, times the keys (which are the values). The
        first `window_keys` keys are the sliding window's (the last of them at the last query's
        position), the rest compressed rows: each query sees the `window` positions up to its own, then
        the `chosen` rows (else every complete one); the first query is at position `start`. On the
        torch path queries run in blocks, each over the keys it can see, masks made per block: a chunk
        costs what its queries attend to, whatever its length. On the Triton path each query names its
        keys for the sparse attention kernel. No [queries x keys] mask exists on either."""
        n, H = q.shape[0], self.n_heads
        rows = keys.shape[0] - window_keys
        if triton_enabled(q.device):
            from ds4.kernels.sparse_attention import sparse_attention

            indices = self._key_lists(n, window_keys, rows, start, chosen, q.device)
            out, _ = sparse_attention(
                q.contiguous(), keys.contiguous(), indices, self.scale, keys.shape[1], self.attn_sink
            )
            return out.to(keys.dtype)
        earlier, W, device = window_keys - n, self.window, q.device
        top = self.attn_sink.float().view(1, H, 1).expand(n, H, 1).clone()  # the sink is a column
        total = torch.zeros(n, H, 1, device=device)
        acc = torch.zeros(n, H, keys.shape[1], device=device)
        for a in range(0, n, W):  # the window: blocks of W queries over the (at most 2W - 1) keys they see
            b = min(n, a + W)
            lo, hi = max(0, a + earlier - W + 1), b + earlier
            behind = (torch.arange(a, b, device=device) + earlier)[:, None] - torch.arange(
                lo, hi, device=device
            )
            allowed = (behind >= 0) & (behind < W)  # [b - a, hi - lo]: key k is 0 .. W - 1 places back
            self._accumulate(q[a:b], keys[lo:hi], allowed, top[a:b], total[a:b], acc[a:b])
        step = max(1, WORKSPACE // (H * max(rows, 1)))  # compressed rows: blocks of queries sharing them
        for a in range(0, n, step) if rows else ():
            b = min(n, a + step)
            done = min(rows, (start + b) // self.compressor.ratio)  # rows complete by query b - 1
            if done == 0:
                continue
            if chosen is None:  # every complete row
                allowed = (
                    torch.arange(done, device=device)[None, :] < self._complete(start, a, b, device)[:, None]
                )
            else:  # the indexer's picks
                allowed = positions_mask(chosen[a:b], done)
            compressed = keys[window_keys : window_keys + done]
            self._accumulate(q[a:b], compressed, allowed, top[a:b], total[a:b], acc[a:b])
        total += (self.attn_sink.float().view(1, H, 1) - top).exp()
        return (acc / total).to(q.dtype)  # [n, H, Dh]

    def _key_lists(self, n: int, window_keys: int, rows: int, start: int, chosen, device) -> torch.Tensor:
        """[n, window + picks] the keys each query attends to, -1 for none: the window's keys up to its
        own, then its compressed rows (the indexer's picks, or every complete row), from the layout
        alone: no [queries x keys] mask is built or read."""
        i = torch.arange(n, device=device)[:, None]
        window = i + (window_keys - n) - torch.arange(self.window - 1, -1, -1, device=device)[None, :]
        lists = [window.masked_fill(window < 0, -1)]  # keys before the first held one: before position 0
        if rows and chosen is not None:
            lists.append(torch.where(chosen >= 0, chosen + window_keys, -1))
        elif rows:
            cols = torch.arange(rows, device=device)[None, :]
            lists.append(
                torch.where(cols < self._complete(start, 0, n, device)[:, None], cols + window_keys, -1)
            )
        return torch.cat(lists, dim=1)

    def _complete(self, start: int, a: int, b: int, device) -> torch.Tensor:
        """[b - a] how many compressed rows queries a .. b - 1 of a chunk from `start` see: the rows whose
        window has closed by their position."""
        return (start + torch.arange(a, b, device=device) + 1) // self.compressor.ratio

    def _accumulate(self, q, keys: torch.Tensor, allowed: torch.Tensor, top, total, acc) -> None:
        """Adds keys [S, Dh] (allowed [n, S]) to queries q [n, H, Dh]'s online softmax: the running maximum
        `top`, sum `total` [n, H, 1] and output `acc` [n, H, Dh], views updated in place. The [n, H, S]
        scores are the one workspace-sized tensor (in place)."""
        scores = torch.einsum("thd,sd->ths", q, keys).float().mul_(self.scale)  # [n, H, S]
        scores.masked_fill_(~allowed[:, None, :], float("-inf"))
        new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
        probs = scores.sub_(new_top).exp_()
        rescale = (top - new_top).exp()
        total.mul_(rescale).add_(probs.sum(dim=-1, keepdim=True))
        acc.mul_(rescale).add_(torch.einsum("ths,sd->thd", probs.to(keys.dtype), keys).float())
        top.copy_(new_top)
