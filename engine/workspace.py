"""The activation workspace of a prefill step, computed from the config before anything runs: what the
engine checks at start-up (a chunk it could not hold is refused with the numbers, not discovered as an
out-of-memory error mid-prefill) and what `ds4-agent plan` reserves per card.

A step's transient memory is the sum of two parts, both bounded whatever the context:
- per token: one layer's activations for the chunk (hidden states and their copies, the attention
  projections, the MoE's gathered rows and expert intermediates), times the chunk's tokens;
- attention: the score blocks, which the blocked prefill caps at a workspace of score elements
  (ds4.engine.layers.mla.WORKSPACE, compressed_attention.WORKSPACE, indexer.STREAMING), with the key rows
  of one block expanded per head, and V3.2/V4's top-k selection buffers.

The figure is an upper bound by construction (every term counts the copies the code makes alive at
once), checked against the counted peak (ds4.engine.activations) in tests/engine/test_workspace.py.
"""

from __future__ import annotations

from ds4.engine.config import ModelConfig

F32, I64 = 4, 8


def prefill_workspace(config: ModelConfig, tokens: int, context: int, dtype_bytes: int) -> int:
    """Bytes of transient memory one prefill step of `tokens` new tokens over `context` positions (the new
    ones included) needs on top of the weights and the cache."""
    T, S = tokens, max(context, tokens)
    if config.is_v4:
        attention = _v4_attention(config, T, S, dtype_bytes)
    else:
        attention = _mla_attention(config, T, S, dtype_bytes)
        if config.has_indexer:
            attention += _indexer(config.index_n_heads, config.index_topk, T, S)
    hidden, projections, feed_forward = _per_token(config, dtype_bytes)
    return T * hidden + max(T * projections + attention, T * feed_forward)  # attention, then the MLP


def _per_token(config: ModelConfig, b: int) -> tuple[int, int, int]:
    """Per token, in bytes: the hidden states a layer keeps alive throughout, the attention's
    projections, and the feed-forward's intermediates (the router's scores in float32)."""
    D, H = config.hidden_size, config.num_attention_heads
    streams = max(1, config.hc_mult)
    hidden = 3 * D * streams  # the residual streams, the normed input, the sublayer's output
    q_rank = config.q_lora_rank or 0
    if config.is_v4:
        projections = q_rank + 2 * H * config.head_dim + config.o_groups * config.o_lora_rank
    else:
        qk, C, R = config.qk_head_dim, config.kv_lora_rank, config.qk_rope_head_dim
        projections = q_rank + 2 * H * qk + 2 * (C + R) + H * config.v_head_dim
    K, I = config.num_experts_per_tok, config.moe_intermediate_size
    moe = 2 * K * D + 3 * K * I + 3 * I * max(1, config.n_shared_experts)
    router = 3 * config.n_routed_experts * F32 // b
    dense = 3 * config.intermediate_size if "dense" in config.mlp_layer_types else 0
    return b * hidden, b * projections, max(b * moe + router * b, b * dense)


def _mla_attention(config: ModelConfig, T: int, S: int, b: int) -> int:
    """MLA prefill: past the workspace, a key block's scores [H, T, keys] in float32 (one tensor: the
    mask, the exponent and the sum run in place on it; in bf16 the matmul's output precedes its float32
    copy; whole, SDPA's fused kernels never hold them), the keys' latent rows and their per-head K/V,
    the masks, the queries and the running output."""
    from ds4.engine.layers import mla

    H, C, R = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    N, V = config.qk_nope_head_dim, config.v_head_dim
    blocked = T * S * H > mla.WORKSPACE
    keys = min(S, max(64, mla.WORKSPACE // (T * H))) if blocked else S
    scores = T * H * keys * (F32 + (b if b < F32 else 0)) if blocked else 0
    rows = 2 * keys * (C + R) * b + keys * H * (2 * N + R + V) * b
    masks = 2 * T * keys  # [T, keys] booleans (causal, and V3.2's selection)
    queries = 2 * T * H * (N + R + V) * F32
    return scores + rows + masks + queries


def _indexer(heads: int, topk: int, T: int, N: int, query_blocks: bool = False) -> int:
    """V3.2/V4's indexer over N keys: [T, heads, N] float32 scores (and their sum over heads), or past
    STREAMING elements one key block at a time with a running top-k of [T, topk + block] (values and
    int64 indices); V4 streams its queries in blocks too (their picks then joined)."""
    from ds4.engine.layers import indexer

    if T * N * heads <= indexer.STREAMING:
        return 2 * T * heads * N * F32 + T * N * (F32 + I64)  # scores, then the stable top-k's sort
    queries = min(T, max(64, indexer.STREAMING // (N * heads))) if query_blocks else T
    block = min(N, max(256, indexer.STREAMING // (queries * heads)))
    joined = 2 * T * topk * I64 if query_blocks else 0
    return 2 * queries * heads * block * F32 + 2 * queries * (topk + block) * (F32 + I64) + joined


def _v4_attention(config: ModelConfig, T: int, S: int, b: int) -> int:
    """V4: the scores of one query block in float32 (one at a time: the softmax runs in place), either
    W queries over the 2W window keys they see or a block of queries over the compressed rows, with the
    block's mask (booleans); the running output; and the compressed indexer's selection."""
    from ds4.engine.layers import compressed_attention as compressed

    H, W = config.num_attention_heads, config.sliding_window
    ratios = [r for r in config.compress_ratios if r]
    rows = S // min(ratios) if ratios else 0
    keys = W + T + rows
    step = min(T, max(1, compressed.WORKSPACE // (H * max(rows, 1))))
    scores = max(min(T, W) * H * 2 * W, step * H * rows) * F32
    masks = max(min(T, W) * 2 * W, step * (rows + 1))  # a block's, made for it (booleans)
    out = 2 * T * H * config.head_dim * F32
    sparse = [r for r in ratios if config.index_n_heads]
    index = _indexer(config.index_n_heads, config.index_topk, T, S // min(sparse), True) if sparse else 0
    return scores + masks + index + out + keys * config.head_dim * b


def available_bytes(device) -> int:
    """Memory free for activations on `device` now: the CUDA allocator's free memory (plus what its
    cache holds unused), or the host's MemAvailable."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def check_fits(config: ModelConfig, chunk: int, max_len: int, dtype_bytes: int, free: int) -> None:
    """ConfigError, with the numbers and the largest chunk that would fit, unless a prefill step of
    `chunk` tokens at any context up to `max_len` fits in `free` bytes."""
    from ds4.engine.errors import ConfigError

    need = prefill_workspace(config, chunk, max_len, dtype_bytes)
    if need <= free:
        return
    fits = [t for t in (2**k for k in range(6, 16)) if t < chunk]
    fits = [t for t in fits if prefill_workspace(config, t, max_len, dtype_bytes) <= free]
    hint = f"max_num_batched_tokens {fits[-1]} would fit" if fits else "not even 64-token chunks fit"
    raise ConfigError(
        f"a prefill chunk of {chunk} tokens at a context of {max_len} needs {need / 2**30:.2f} GiB of "
        f"activations; {free / 2**30:.2f} GiB is free after the weights and the cache ({hint}; or lower "
        "max_model_len or the cache's share)"
    )
