"""Multi-head latent attention (DeepSeek-V2/V3), with V3.2's sparse variant over indexer-selected tokens.

Legend: T new tokens, S cached tokens (keys), H heads, C kv latent rank, R rope dim, N nope dim, V value dim.

Two paths, same function:
- naive: per-head K/V materialized from the latent by W_UKV (cheap for long query chunks: prefill); past
  WORKSPACE score elements, in key blocks with an online softmax, so memory stays flat in the context;
- absorbed: W_UK folded into the query and W_UV applied after attention, so attention runs in the
  latent space and reads only the cached [C + R] rows (decode; and on the Triton path, prefill chunks
  past WORKSPACE, in the flash-style kernel ds4.kernels.mla_prefill: nothing expanded, no score matrix;
  on the CPU, decode in ds4's operators, which read each sequence's rows where they sit in the pool).
Only the normalized latent and the roped key are cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds4.engine.config import ModelConfig
from ds4.engine.context import get_forward_context
from ds4.engine.layers.indexer import Indexer, positions_mask
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.norm import RMSNorm
from ds4.engine.layers.quantized import dense_weight
from ds4.engine.layers.rope import apply_rope, softmax_scale
from ds4.kernels import cpu_ops, triton_enabled

# Scores of a chunk against its context above this many elements ([queries x keys x heads]) are computed
# in key blocks of about this size instead: prefill memory stays flat however long the cached prefix.
WORKSPACE = 1 << 24


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        dim, heads, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        if self.q_lora_rank is None:
            self.wq = Linear(dim, heads * config.qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(dim, self.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.wq_b = Linear(self.q_lora_rank, heads * config.qk_head_dim, bias=False)
        self.wkv_a = Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = Linear(heads * self.v_head_dim, dim, bias=bias)
        self.indexer = Indexer(config) if config.has_indexer else None
        self.scale = softmax_scale(config.rope, config.qk_head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ctx = get_forward_context()
        cos, sin = rope
        T = x.shape[0]
        N, R, C = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank

        if self.q_lora_rank is None:
            q_latent = None
            q = self.wq(x)
        else:
            q_latent = self.q_norm(self.wq_a(x))  # [T, q_lora_rank]
            q = self.wq_b(q_latent)
        q = q.view(T, self.n_heads, N + R)  # [T, H, N + R]
        q_nope, q_pe = q.split([N, R], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)  # [T, H, R]

        kv = self.wkv_a(x)  # [T, C + R]: the latent, then the key's rope part
        pool = ctx.cache.kv[self.layer_id] if ctx.decode is not None else None
        if pool is not None and self._rows_in_kernel(kv, pool):
            from ds4.kernels.small_ops import write_latent_rows

            norm = self.kv_norm  # the rows go straight to the cache
            write_latent_rows(
                kv, norm.weight, norm.eps, cos, sin, self.rope_interleave, pool, ctx.decode.slot_rows
            )
            kv_rows = None
        else:
            latent, k_pe = kv.split([C, R], dim=-1)
            latent = self.kv_norm(latent)  # [T, C]
            k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)  # [T, R]
            kv_rows = torch.cat([latent, k_pe], dim=-1)  # [T, C + R]: what the cache holds
        index_rows = self.indexer.keys(x, rope) if self.indexer is not None else None  # [T, Di]
        if ctx.decode is not None:  # decode: every sequence's one token at once
            return self.wo(self._decode(x, q_latent, rope, q_nope, q_pe, kv_rows, index_rows, ctx).flatten(1))

        outs = []
        for seq in ctx.seqs:
            new = slice(seq.offset, seq.offset + seq.num_tokens)
            ctx.cache.write(self.layer_id, seq, kv_rows[new], None if index_rows is None else index_rows[new])
            long = seq.num_tokens * seq.end * self.n_heads > WORKSPACE  # scores in key blocks
            triton = triton_enabled(x.device) and (long or ctx.mla_mode == "absorbed")
            if long or triton:  # V3.2: the picks as positions, streamed over key blocks
                chosen = None
                if self.indexer is not None and seq.end > self.indexer.topk:
                    index_keys = ctx.cache.read_index(self.layer_id, seq)
                    chosen = self.indexer.select_streaming(
                        x[new], q_latent[new], rope_slice(rope, new), index_keys, ctx.positions[new]
                    )
                if triton:  # flash-style over the cached latent rows (or the picked ones), nothing expanded
                    outs.append(self._absorbed_triton(q_nope[new], q_pe[new], ctx.cache, seq, chosen))
                else:
                    outs.append(self._prefill_blocked(q_nope[new], q_pe[new], ctx.cache, seq, chosen))
                continue
            cached = ctx.cache.read(self.layer_id, seq)  # [S, C + R]
            allowed = _causal_mask(seq.start, seq.num_tokens, seq.end, x.device)  # [T, S]
            if self.indexer is not None:
                index_keys = ctx.cache.read_index(self.layer_id, seq)
                allowed = allowed & self.indexer.select(
                    x[new], q_latent[new], rope_slice(rope, new), index_keys, allowed, ctx.positions[new]
                )
            if ctx.mla_mode == "absorbed":
                outs.append(self._absorbed(q_nope[new], q_pe[new], cached, allowed))
            else:
                outs.append(self._naive(q_nope[new], q_pe[new], cached, allowed))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [T, H, V]
        return self.wo(out.flatten(1))

    def _prefill_blocked(self, q_nope, q_pe, cache, seq, chosen=None):
        """A chunk's T queries over their sequence's S cached rows, one block of keys at a time with an
        online softmax: per-head K/V are expanded for one block only and the scores are [H, T, block], so
        memory follows the workspace, never T x S. V3.2: `chosen` [T, k] are the positions each query
        may see (-1: none)."""
        N, R, C, V = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank, self.v_head_dim
        T, H = q_nope.shape[:2]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, T, N + R]
        q_pos = torch.arange(seq.start, seq.end, device=q.device)  # [T]
        block = max(64, WORKSPACE // (T * H))
        top = torch.full((H, T), float("-inf"), device=q.device)  # running max of each query's scores
        total = torch.zeros(H, T, device=q.device)  # running sum of exp(score - top)
        acc = torch.zeros(H, T, V, device=q.device)  # running sum of exp(score - top) * v
        for first in range(0, seq.end, block):
            rows = cache.read_rows(self.layer_id, seq, first, min(seq.end, first + block))  # [b, C + R]
            b = rows.shape[0]
            latent, k_pe = rows.split([C, R], dim=-1)
            k_nope, v = self.wkv_b(latent).view(b, H, N + V).split([N, V], dim=-1)  # [b, H, N], [b, H, V]
            k = torch.cat([k_nope, k_pe[:, None, :].expand(b, H, R)], dim=-1)  # [b, H, N + R]
            scores = torch.matmul(q, k.permute(1, 2, 0)).float().mul_(self.scale)  # [H, T, b]
            key_pos = torch.arange(first, first + b, device=q.device)
            hidden = key_pos[None, :] > q_pos[:, None]  # [T, b]: causal
            if chosen is not None:  # V3.2: only the indexer's picks
                hidden |= ~positions_mask(chosen, b, first)
            scores.masked_fill_(hidden[None], float("-inf"))
            new_top = torch.maximum(top, scores.amax(-1))
            base = torch.where(torch.isinf(new_top), 0.0, new_top)  # a query with nothing yet: no inf - inf
            probs = scores.sub_(base[..., None]).exp_()  # in place: a block's one [H, T, b] tensor
            rescale = torch.exp(top - base)  # earlier sums to the new maximum
            total = total * rescale + probs.sum(-1)
            acc = acc * rescale[..., None] + torch.matmul(probs.to(v.dtype), v.transpose(0, 1)).float()
            top = new_top
            del scores, probs  # freed before the next block's scores exist
        return (acc / total[..., None]).transpose(0, 1).to(q_nope.dtype)  # [T, H, V]

    def _naive(self, q_nope, q_pe, cached, allowed):
        N, R, C = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        latent, k_pe = cached.split([C, R], dim=-1)
        S = latent.shape[0]
        kv = self.wkv_b(latent).view(S, self.n_heads, N + self.v_head_dim)  # [S, H, N + V]
        k_nope, v = kv.split([N, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(S, self.n_heads, R)], dim=-1)  # [S, H, N + R]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, N + R]
        # softmax(q k^T * scale, masked) v, per head: [H, T, S] scores, [H, T, V] out
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=self.scale
        )
        return out.transpose(0, 1)  # [T, H, V]

    def _absorbed(self, q_nope, q_pe, cached, allowed):
        latent = cached[:, : self.kv_lora_rank]  # [S, C]; the rope part of `cached` is the key's tail
        w_uk, w_uv = self._absorbed_weights()  # [H, N, C], [H, V, C]
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # [T, H, C]
        # one shared key/value head in the latent space: scores = q_latent . latent + q_pe . k_pe
        q = torch.cat([q_latent, q_pe], dim=-1).transpose(0, 1)  # [H, T, C + R]
        out_latent = F.scaled_dot_product_attention(
            q, cached[None], latent[None], attn_mask=allowed, scale=self.scale
        )  # [H, T, C]
        return torch.einsum("htc,hvc->thv", out_latent, w_uv)  # [T, H, V]

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, C] and W_UV [H, V, C], the halves of wkv_b."""
        w_ukv = dense_weight(self.wkv_b).unflatten(0, (self.n_heads, self.qk_nope_head_dim + self.v_head_dim))
        return w_ukv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def _decode(self, x, q_latent, rope, q_nope, q_pe, kv_rows, index_rows, ctx):
        """Absorbed attention of B sequences' new tokens (one each) over their paged rows (V3.2: over the
        rows its indexer picks), reading only the step's device tensors (ctx.decode): the same work
        whatever the lengths, so it can be captured."""
        batch, cache = ctx.decode, ctx.cache
        pool = cache.kv[self.layer_id]
        if kv_rows is not None:  # (else written by write_latent_rows)
            pool.index_copy_(0, batch.slot_rows, kv_rows.to(pool.dtype))  # each new row into its block
        w_uk, w_uv = self._absorbed_weights()
        # the decode step runs its products as batched matmuls over heads (einsum's planning and layout
        # copies cost more than the products at one token per sequence); each line's einsum is its comment
        q_latent_heads = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # bhn,hnc->bhc [B, H, C]
        if self.indexer is not None:
            index_pool = cache.index_k[self.layer_id]
            index_pool.index_copy_(0, batch.slot_rows, index_rows.to(index_pool.dtype))
            rows = self.indexer.select_decode(x, q_latent, rope, index_pool, batch, cache.block_size)
            out_latent = self._sparse(q_latent_heads, q_pe, pool, rows)
        elif triton_enabled(q_nope.device):
            from ds4.kernels.mla_decode import paged_mla_decode

            out_latent, _ = paged_mla_decode(
                q_latent_heads,  # [B, H, C] views: the kernel takes their batch and head strides
                q_pe,
                pool,
                batch.block_table,
                batch.seq_lens,
                cache.block_size,
                self.scale,
            )
        else:
            out_latent = self._decode_torch(q_latent_heads, q_pe, pool, batch, cache.block_size)
        out = torch.bmm(out_latent.to(q_nope.dtype).transpose(0, 1), w_uv.transpose(1, 2))  # bhc,hvc->bhv
        return out.transpose(0, 1)  # [B, H, V]

    def _rows_in_kernel(self, kv: torch.Tensor, pool: torch.Tensor) -> bool:
        """Whether a decode step's cache rows (normed latent, roped key) go to the pool in one Triton
        kernel: on the Triton path, into a pool of the model's dtype (FP8 rows are quantized apart)."""
        norm = self.kv_norm
        same = pool.dtype == kv.dtype == norm.weight.dtype and not norm.cast_after_weight
        return same and triton_enabled(kv.device)

    def _sparse(self, q_latent, q_pe, pool, rows):
        """Attention of each query [B, H] over its chosen pool rows [B, k] (-1: none) in the latent space."""
        q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, C + R]
        if triton_enabled(q.device):
            from ds4.kernels.sparse_attention import sparse_attention

            return sparse_attention(q.contiguous(), pool, rows, self.scale, self.kv_lora_rank)[0]
        if _cpu_operator(pool):  # the rows read where they sit, no [B, k, C + R] copy
            return torch.ops.ds4_cpu.sparse_latent_attention(q, pool, rows, self.scale, self.kv_lora_rank)
        cached = pool[rows.clamp(min=0)]  # [B, k, C + R]
        scores = torch.bmm(q, cached.transpose(1, 2)) * self.scale  # bhd,bkd->bhk
        probs = scores.float().masked_fill((rows < 0)[:, None, :], float("-inf")).softmax(-1)
        return torch.bmm(probs.to(cached.dtype), cached[..., : self.kv_lora_rank])  # bhk,bkc->bhc

    def _decode_torch(self, q_latent, q_pe, pool, batch, block_size):
        """The paged decode on the CPU: in ds4's operator, which reads each sequence's rows through its block
        table where they sit; else on torch, the rows gathered up to the batch's longest, the rest masked."""
        C = self.kv_lora_rank
        q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, C + R]: one product over latent and rope
        if _cpu_operator(pool):
            return torch.ops.ds4_cpu.paged_latent_attention(
                q, pool, batch.block_table, batch.seq_lens, block_size, self.scale, C
            )
        pos = batch.span  # [S]
        cached = pool[batch.pool_rows(block_size)]  # [B, S, C + R]
        scores = torch.bmm(q, cached.transpose(1, 2)) * self.scale  # bhd,bsd->bhs [B, H, S]
        hidden = pos[None, None, :] >= batch.seq_lens[:, None, None]
        probs = scores.float().masked_fill(hidden, float("-inf")).softmax(-1).to(cached.dtype)
        return torch.bmm(probs, cached[..., :C])  # bhs,bsc->bhc [B, H, C]

    def _absorbed_triton(self, q_nope, q_pe, cache, seq, chosen=None):
        """The absorbed path on the paged pool with ds4's kernels: the chunk's causal queries in the
        flash-style prefill kernel over the sequence's blocks; with V3.2's selection (the positions
        `chosen` [T, k], -1 none), attention over the chosen rows only. No sync: the index lists' width
        is the top-k's."""
        from ds4.kernels.mla_prefill import mla_prefill
        from ds4.kernels.sparse_attention import sparse_attention

        C = self.kv_lora_rank
        w_uk, w_uv = self._absorbed_weights()
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk).contiguous()  # [T, H, C]
        pool = cache.kv[self.layer_id]
        if chosen is None:
            blocks = torch.tensor(seq.block_ids, dtype=torch.int32, device=pool.device)
            out_latent, _ = mla_prefill(
                q_latent, q_pe.contiguous(), pool, blocks, seq.start, cache.block_size, self.scale
            )
        else:
            indices = torch.where(chosen >= 0, seq.rows[chosen.clamp(min=0)], -1)  # pool rows
            q = torch.cat([q_latent, q_pe], dim=-1).contiguous()
            out_latent, _ = sparse_attention(q, pool, indices, self.scale, C)
        return torch.einsum("thc,hvc->thv", out_latent.to(q_nope.dtype), w_uv)  # [T, H, V]


def _cpu_operator(pool: torch.Tensor) -> bool:
    """Whether decode attention over `pool` runs in ds4's CPU operator (ds4.kernels.cpu_ops: built where
    the CPU kernel is; fp32 or bf16 rows)."""
    return pool.device.type == "cpu" and cpu_ops.READY and pool.dtype in (torch.float32, torch.bfloat16)


def rope_slice(rope, rows: slice):
    return rope[0][rows], rope[1][rows]


def _causal_mask(start: int, num_tokens: int, end: int, device) -> torch.Tensor:
    """allowed[t, s] = key s is at or before query t's position (start + t)."""
    q_pos = torch.arange(start, start + num_tokens, device=device)
    return torch.arange(end, device=device)[None, :] <= q_pos[:, None]  # [T, S]
