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
from ds4.engine.layers.indexer import CompressedIndexer
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
        self.wq_a = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, cast_after_weight=True)
        self.wq_b = nn.Linear(config.q_lora_rank, H * Dh, bias=False)
        self.wkv = nn.Linear(D, Dh, bias=False)
        self.norm = RMSNorm(Dh, config.rms_norm_eps, cast_after_weight=True)
        self.wo_a = nn.Linear(H * Dh // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(config.o_groups * config.o_lora_rank, D, bias=False)
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

        outs = []
        for seq in ctx.seqs:
            new = slice(seq.offset, seq.offset + seq.num_tokens)
            positions = ctx.positions[new]  # [n]
            keys, allowed = self._window(ctx.cache, seq, kv[new], positions)
            if self.compressor is not None:
                rows, visible = self._compressed(ctx.cache, seq, x[new], q_latent[new], ropes, positions, new)
                keys, allowed = torch.cat([keys, rows.to(keys.dtype)]), torch.cat([allowed, visible], dim=1)
            outs.append(self._attend(q[new], keys, allowed))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [T, H, Dh]
        out = apply_rope_tail(out, cos, -sin)  # rotate the values' rope slice back to the query's frame
        grouped = out.reshape(T, self.o_groups, -1)  # [T, G, H * Dh / G]
        w_a = dense_weight(self.wo_a).unflatten(0, (self.o_groups, -1))  # [G, o_lora_rank, H * Dh / G]
        return self.wo_b(torch.einsum("tgi,goi->tgo", grouped, w_a).flatten(1))

    def _window(self, cache, seq, new_rows, positions):
        """Keys of the sliding window: cached earlier rows + the new ones, and who may see whom."""
        earlier = cache.read_window(self.layer_id, seq.slot, seq.start)  # [P, Dh]
        cache.write_window(self.layer_id, seq.slot, seq.start, new_rows)
        keys = torch.cat([earlier, new_rows])  # positions start - P .. end - 1
        key_pos = torch.arange(seq.start - earlier.shape[0], seq.end, device=positions.device)
        q_pos = positions[:, None]
        allowed = (key_pos[None, :] <= q_pos) & (key_pos[None, :] > q_pos - self.window)  # [n, S_w]
        return keys, allowed

    def _compressed(self, cache, seq, x, q_latent, ropes, positions, new):
        """Compressed rows so far and, per query, which of them it attends to."""
        rows = self.compressor(x, cache.compressor_state(self.layer_id, seq.slot, "attn"))  # [N, Dh]
        N = rows.shape[0]
        if self.indexer is None:  # every complete window is visible
            ratio = self.compressor.ratio
            return rows, torch.arange(N, device=x.device)[None, :] < ((positions + 1) // ratio)[:, None]
        index_keys = self.indexer.compressor(x, cache.compressor_state(self.layer_id, seq.slot, "index"))
        q_rope = (ropes["compress"][0][new], ropes["compress"][1][new])
        chosen = self.indexer.select(x, q_latent, q_rope, index_keys, positions)  # [n, k], -1 = none
        visible = torch.zeros(x.shape[0], N + 1, dtype=torch.bool, device=x.device)
        visible.scatter_(1, chosen.masked_fill(chosen < 0, N), True)
        return rows, visible[:, :N]

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """softmax over [scores, sink] per head, sink dropped, times the keys (which are the values)."""
        n, H = q.shape[0], self.n_heads
        if triton_enabled(q.device):
            from ds4.engine.layers.mla import allowed_rows
            from ds4.kernels.sparse_attention import sparse_attention

            indices = allowed_rows(allowed, torch.arange(keys.shape[0], device=keys.device))
            out, _ = sparse_attention(
                q.contiguous(), keys.contiguous(), indices, self.scale, keys.shape[1], self.attn_sink
            )
            return out.to(keys.dtype)
        step = max(1, WORKSPACE // (H * keys.shape[0]))  # queries per block: scores stay within the workspace
        return torch.cat(
            [self._attend_rows(q[a : a + step], keys, allowed[a : a + step]) for a in range(0, n, step)]
        )

    def _attend_rows(self, q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """One block of queries; the [n, H, S] scores are the one workspace-sized tensor (in place)."""
        H = self.n_heads
        scores = torch.einsum("thd,sd->ths", q, keys).mul_(self.scale)  # [n, H, S]
        scores.masked_fill_(~allowed[:, None, :], float("-inf"))
        sinks = self.attn_sink.to(scores.dtype).view(1, H, 1)
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), sinks)  # [n, H, 1]: the sink is a column
        probs = scores.sub_(top).exp_()
        total = probs.sum(dim=-1, keepdim=True) + (sinks - top).exp()
        return torch.einsum("ths,sd->thd", probs.to(keys.dtype), keys) / total.to(keys.dtype)  # [n, H, Dh]
