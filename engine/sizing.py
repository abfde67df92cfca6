"""What a model costs before it is loaded: parameters (total and active per token), weight bytes per
storage format, and cache bytes per token and at a given context. Read from the meta-device model, so
counts are exact for any config, a 1.6T one included, in well under a second.
"""

from __future__ import annotations

import math

import torch

from ds4.engine.config import ModelConfig
from ds4.engine.layers.compressed_attention import CSA
from ds4.engine.models import build_model

CONTEXTS = {"4K": 4096, "128K": 131072, "1M": 1048576}
FP8_BLOCK = 128
FP4_GROUP = 32
# Matrices DeepSeek keeps in high precision: embeddings, head, routers, mHC mixers, compressors, tables.
HIGH_PRECISION = (
    "embed.",
    "head.",
    "ffn.gate.",
    "hc_",
    "compressor.",
    "weights_proj",
    "tid2eid",
    "attn_sink",
)


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Total parameters, and those one token computes with: all but the routed experts it does not pick
    and the embedding rows it does not look up (DeepSeek's convention for "activated" parameters)."""
    shapes = parameter_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    routed = sum(math.prod(s) for n, s in shapes.items() if ".ffn.experts." in n)
    experts = max(config.n_routed_experts, 1)
    unused = routed * (experts - config.num_experts_per_tok) // experts
    unused += (config.vocab_size - 1) * config.hidden_size
    return {"params_total": total, "params_active": total - unused, "params_routed_experts": routed}


def matrix_bytes(shape: tuple[int, ...], fmt: str) -> float:
    """A weight matrix (or a stack of them) stored in `fmt`, scales included."""
    *stack, out_dim, in_dim = shape
    n = math.prod(stack) if stack else 1
    if fmt == "bf16":
        return 2 * n * out_dim * in_dim
    if fmt == "fp32":
        return 4 * n * out_dim * in_dim
    if fmt == "fp4":  # e2m1 pairs per byte, one e8m0 scale per 32 inputs
        return n * (out_dim * in_dim / 2 + out_dim * math.ceil(in_dim / FP4_GROUP))
    if fmt == "int4":  # two per byte, one bf16 scale per 32 inputs
        return n * (out_dim * in_dim / 2 + 2 * out_dim * math.ceil(in_dim / FP4_GROUP))
    blocks = math.ceil(out_dim / FP8_BLOCK) * math.ceil(in_dim / FP8_BLOCK)  # fp8, a float32 scale per block
    return n * (out_dim * in_dim + 4 * blocks)


def tensor_bytes(name: str, shape: tuple[int, ...], attn_fmt: str, expert_fmt: str) -> float:
    """A parameter's bytes: routed experts in `expert_fmt`, other matrices in `attn_fmt`, the ones DeepSeek
    keeps in high precision (and vectors) in bf16; everything at 4 bytes in a float32 run."""
    numel = math.prod(shape)
    if ".ffn.experts." in name:
        return matrix_bytes(shape, expert_fmt)
    if attn_fmt == "fp32":  # a float32 run (ds4 on a CPU): everything else at 4 bytes
        return 4 * numel
    if len(shape) < 2 or any(x in name for x in HIGH_PRECISION):
        return 2 * numel
    return matrix_bytes(shape, attn_fmt)


def weight_bytes(config: ModelConfig) -> dict[str, int]:
    """Bytes of the weights stored as bf16; as fp8 (128x128 blocks); as fp8 with fp4 routed experts."""
    shapes = parameter_shapes(config).items()
    formats = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "fp8"), "fp8+fp4-experts": ("fp8", "fp4")}
    return {
        label: int(sum(tensor_bytes(name, shape, attn, experts) for name, shape in shapes))
        for label, (attn, experts) in formats.items()
    }


def row_bytes(width: int, rope: int, fmt: str) -> int:
    """One cached row: bf16 throughout, or fp8 (its non-rope part with a float32 scale per 128, the
    rope part kept in bf16, as FlashMLA's 656-byte rows for V3)."""
    if fmt == "bf16":
        return 2 * width
    nope = width - rope
    return nope + 4 * math.ceil(nope / FP8_BLOCK) + 2 * rope


def index_row_bytes(width: int, fmt: str) -> int:
    return 2 * width if fmt == "bf16" else width + 4  # fp8 keys with one float32 scale


def layer_cache_bytes(config: ModelConfig, context: int, fmt: str = "fp8") -> list[int]:
    """Decode-cache bytes of one sequence at `context` tokens, per layer."""
    assert fmt in ("bf16", "fp8"), fmt
    if not config.is_v4:
        row = row_bytes(config.kv_lora_rank + config.qk_rope_head_dim, config.qk_rope_head_dim, fmt)
        index = index_row_bytes(config.index_head_dim, fmt) if config.has_indexer else 0
        return [context * (row + index)] * config.num_hidden_layers
    row = row_bytes(config.head_dim, config.qk_rope_head_dim, fmt)
    index_row = index_row_bytes(config.index_head_dim, fmt)
    out = []
    for kind, ratio in zip(config.layer_types, config.compress_ratios, strict=True):
        total = min(context, config.sliding_window) * row
        if ratio:
            total += context // ratio * row
            if kind == CSA:
                total += context // ratio * index_row
        out.append(total)
    return out


def cache_bytes(config: ModelConfig, context: int, fmt: str = "fp8") -> int:
    """Decode-cache bytes for one sequence of `context` tokens."""
    return sum(layer_cache_bytes(config, context, fmt))


def paged_bytes(config: ModelConfig, tokens: int, itemsize: int, layers=None) -> int:
    """Bytes ds4's engine pages in its cache blocks for `tokens` tokens of one sequence, in the given layers
    (default all). V3 and V3.2: a latent-and-rope row (and V3.2's indexer key) per token, in the model's
    dtype (`itemsize` bytes a value). V4: a compressed row per `ratio` tokens in the model's dtype, and in
    compressed sparse layers its indexer's key in float32. (layer_cache_bytes counts DeepSeek's reference
    formats, fp8 rows with scales, which ds4 does not store.)"""
    total = 0
    for layer in range(config.num_hidden_layers) if layers is None else layers:
        if not config.is_v4:
            index = config.index_head_dim if config.has_indexer else 0
            total += tokens * (config.kv_lora_rank + config.qk_rope_head_dim + index) * itemsize
        elif ratio := config.compress_ratios[layer]:
            index = config.index_head_dim * 4 if config.layer_types[layer] == CSA else 0
            total += tokens // ratio * (config.head_dim * itemsize + index)
    return total


def engine_layer_cache_bytes(config: ModelConfig, context: int, itemsize: int) -> list[int]:
    """What ds4's engine holds for one sequence at `context` tokens, per layer: its paged rows
    (`paged_bytes`) and, for V4, the sliding window's ring of K=V rows in the model's dtype."""
    window = min(context, config.sliding_window) * config.head_dim * itemsize if config.is_v4 else 0
    return [window + paged_bytes(config, context, itemsize, [i]) for i in range(config.num_hidden_layers)]


def model_info(config: ModelConfig) -> dict:
    info = dict(param_counts(config), model_type=config.model_type, weight_bytes=weight_bytes(config))
    info["cache_bytes"] = {
        fmt: {label: cache_bytes(config, n, fmt) for label, n in CONTEXTS.items()} for fmt in ("bf16", "fp8")
    }
    info["cache_bytes_per_token"] = {
        fmt: info["cache_bytes"][fmt]["1M"] / CONTEXTS["1M"] for fmt in ("bf16", "fp8")
    }
    return info


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:,.1f}{unit}"
    return f"{n:,.0f}"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_info(name: str, info: dict) -> str:
    lines = [
        f"{name} ({info['model_type']})",
        f"  parameters   {_count(info['params_total'])} total, "
        f"{_count(info['params_active'])} active per token "
        f"({_count(info['params_routed_experts'])} in routed experts)",
        "  weights      " + ", ".join(f"{fmt} {_bytes(b)}" for fmt, b in info["weight_bytes"].items()),
    ]
    for fmt in ("bf16", "fp8"):
        per_ctx = ", ".join(f"{label} {_bytes(b)}" for label, b in info["cache_bytes"][fmt].items())
        lines.append(f"  cache {fmt:5}  {info['cache_bytes_per_token'][fmt]:,.0f} B/token at 1M; {per_ctx}")
    return "\n".join(lines)
