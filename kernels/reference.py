"""Torch references for every Triton kernel in this package: the definitions the kernels are tested
against (and the path the engine runs where Triton does not). Plain, unfused, float32 inside.

Layouts are the runtime's: a paged latent pool per layer [num_blocks * block_size, C + R] (the
normalized KV latent, then the roped key), block tables [B, max_blocks] of block ids, -1 for unused.
"""

from __future__ import annotations

import torch


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm(x + residual) * weight, x + residual): the pre-norm block's add-then-normalize; with
    no residual, the second item is None. The sum is kept in x's dtype, as the unfused path keeps it."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), (x if residual is not None else None)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, R] rotated by per-token angles (cos/sin [T, R/2]); the output is half-split laid out
    in both modes (ds4.engine.layers.rope.apply_rope)."""
    xf = x.float()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def gather_rows(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Pool row ids of positions [0, length) of one sequence."""
    positions = torch.arange(length, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def paged_mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode: one query token per sequence, queries already folded with W_UK.

    q_latent [B, H, C], q_rope [B, H, R], pool [rows, C + R]. Scores are q_latent . latent + q_rope .
    rope over the sequence's cached rows; the output is the softmax-weighted latent [B, H, C] (W_UV is
    applied after), with the log-sum-exp [B, H] (natural log, of the scaled scores)."""
    batch, heads, latent = q_latent.shape
    out = torch.zeros(batch, heads, latent, dtype=torch.float32, device=q_latent.device)
    lse = torch.full((batch, heads), float("-inf"), dtype=torch.float32, device=q_latent.device)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        rows = pool[gather_rows(block_table[b], n, block_size)].float()
        scores = (q_latent[b].float() @ rows[:, :latent].T + q_rope[b].float() @ rows[:, latent:].T) * scale
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.softmax(scores, dim=-1) @ rows[:, :latent]
    return out, lse


def mla_prefill(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    pool: torch.Tensor,
    blocks: torch.Tensor,
    start: int,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed, causal MLA prefill of one sequence's chunk: queries q_latent [T, H, C], q_rope [T, H, R]
    at positions start .. start + T - 1 over the rows of positions 0 .. start + T - 1 in the pool (its
    `blocks` in order); query t sees the positions up to start + t. Returns the softmax-weighted latent
    [T, H, C] and the log-sum-exp [T, H], as paged_mla_decode."""
    tokens, _, latent = q_latent.shape
    end = start + tokens
    rows = pool[gather_rows(blocks, end, block_size)].float()  # [S, C + R]
    scores = torch.einsum("thc,sc->ths", q_latent.float(), rows[:, :latent])
    scores = (scores + torch.einsum("thr,sr->ths", q_rope.float(), rows[:, latent:])) * scale
    hidden = (
        torch.arange(end, device=pool.device)[None, :] > torch.arange(start, end, device=pool.device)[:, None]
    )
    scores = scores.masked_fill(hidden[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ rows[:, :latent], torch.logsumexp(scores, dim=-1)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    value_dim: int,
    sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query token over the rows its indices name.

    q [T, H, D], kv [rows, D] (one shared head: MLA's latent + rope, or V4's 512-d K = V), indices
    [T, K] int (row ids, -1 = none). Values are the first `value_dim` columns of each row. `sink` [H]:
    V4's attention sink, an extra logit per head that takes probability but gives no value.
    Returns out [T, H, value_dim] (zeros where a token has no valid row and no sink) and lse [T, H]
    (of the scaled scores, the sink included; -inf where there is nothing)."""
    tokens, heads, _ = q.shape
    out = torch.zeros(tokens, heads, value_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((tokens, heads), float("-inf"), dtype=torch.float32, device=q.device)
    for t in range(tokens):
        valid = indices[t][indices[t] >= 0].long()
        rows = kv[valid].float()
        scores = q[t].float() @ rows.T * scale  # [H, n]
        if sink is not None:
            scores = torch.cat([scores, sink.float()[:, None]], dim=-1)
        if scores.shape[-1] == 0:
            continue
        lse[t] = torch.logsumexp(scores, dim=-1)
        p = torch.softmax(scores, dim=-1)
        out[t] = p[:, : len(valid)] @ rows[:, :value_dim]
    return out, lse


def indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The lightning indexer: score[t, s] = sum_h weights[t, h] * ReLU(q[t, h] . k[s]) for keys s at or
    before token t's position, -inf after it. q [T, H, D], weights [T, H], k [S, D], positions [T]."""
    scores = torch.einsum("thd,sd->ths", q.float(), k.float()).relu()
    scores = (scores * weights.float()[:, :, None]).sum(1)
    future = torch.arange(k.shape[0], device=k.device)[None, :] > positions[:, None]
    return scores.masked_fill(future, float("-inf"))


def paged_indexer_scores(q, weights, pool, block_table, seq_lens, block_size: int, width: int):
    """The indexer for decode queries q [B, H, D] (each sequence's last token) over the keys in `pool`
    [rows, D] that `block_table` [B, blocks] gives for positions [0, seq_lens[b]); [B, width], -inf past
    each length."""
    out = torch.full((q.shape[0], width), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        keys = pool[gather_rows(block_table[b], n, block_size)]
        last = torch.tensor([n - 1], device=q.device)
        out[b, :n] = indexer_scores(q[b : b + 1], weights[b : b + 1], keys, last)[0]
    return out


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, ties to the lower index (ds4's rule everywhere), -1
    where fewer than k are finite."""
    k = min(k, scores.shape[-1])
    order = torch.sort(scores + 0.0, dim=-1, descending=True, stable=True).indices[..., :k]  # -0.0 is +0.0
    picked = torch.gather(scores, -1, order)
    return torch.where(torch.isfinite(picked), order, torch.full_like(order, -1))


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    limit: float | None = None,
) -> torch.Tensor:
    """y[t] = sum_k topk_weights[t, k] * w2[e] @ SwiGLU(w13[e] @ x[t]), e = topk_ids[t, k]; w13 [E, 2I, D]
    (gate rows, then up rows), w2 [E, D, I], float weights (dequantize quantized ones first).
    SwiGLU = silu(gate) * up, with V4's clamps when `limit` is given."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate, up = (w13[e].float() @ x[t].float()).chunk(2)
            if limit is not None:
                gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
            y[t] += float(topk_weights[t, k]) * (w2[e].float() @ (torch.nn.functional.silu(gate) * up))
    return y.to(x.dtype)


def mhc_mix(
    mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, streams: torch.Tensor, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's mHC weights from the streams' projection `mix` [T, (2 + N) * N] (plus `base`
    [(2 + N) * N] and the three `scale`s): pre = sigmoid + eps, post = 2 sigmoid, comb = a row softmax
    made doubly stochastic by Sinkhorn-Knopp (columns, then `iters - 1` rounds of rows and columns);
    returns (post [T, N], comb [T, N, N], collapsed = sum_n pre[n] * streams[:, n] [T, D])."""
    hc = streams.shape[1]
    mix = mix.float()
    pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    collapsed = (pre.unsqueeze(-1) * streams.float()).sum(dim=1).to(streams.dtype)
    return post, comb, collapsed


FP8_ROW_BYTES = 656  # 512 e4m3 latent values, 4 float32 scales (one per 128), 64 bf16 rope values


def quantize_latent_rows(rows: torch.Tensor, latent: int = 512) -> torch.Tensor:
    """[N, latent + R] float rows -> uint8 rows: the latent in FP8 e4m3 with one float32 scale per 128
    values (largest magnitude to 448), then the rope part in bf16. For 512 + 64 that is FlashMLA's
    656-byte FP8 cache row."""
    n = rows.shape[0]
    x = rows[:, :latent].float().view(n, latent // 128, 128)
    scale = (x.abs().amax(-1) / 448.0).clamp(min=1e-12)  # [N, 4]
    q = (x / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, latent)
    groups = latent // 128
    rope = rows[:, latent:]
    out = torch.empty(n, latent + 4 * groups + 2 * rope.shape[1], dtype=torch.uint8, device=rows.device)
    out[:, :latent] = q.view(torch.uint8)
    out[:, latent : latent + 4 * groups] = scale.contiguous().view(torch.uint8).view(n, 4 * groups)
    out[:, latent + 4 * groups :] = rope.to(torch.bfloat16).contiguous().view(torch.uint8).view(n, -1)
    return out


def dequantize_latent_rows(packed: torch.Tensor, latent: int = 512) -> torch.Tensor:
    """uint8 rows of quantize_latent_rows -> [N, latent + R] float32."""
    n, groups = packed.shape[0], latent // 128
    q = packed[:, :latent].contiguous().view(torch.float8_e4m3fn).float().view(n, groups, 128)
    scale = packed[:, latent : latent + 4 * groups].contiguous().view(torch.float32)  # [N, groups]
    rope = packed[:, latent + 4 * groups :].contiguous().view(torch.bfloat16).float()
    return torch.cat([(q * scale[..., None]).view(n, latent), rope], dim=-1)
