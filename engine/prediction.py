"""What a placement's speed is predicted to be: bytes moved over bandwidths and FLOPs over compute rates
(DESIGN.md's physics) on a `Hardware`, with defaults for an RTX 4090, PCIe 4.0 x16 and dual-channel DDR5,
each overridable. Where the bytes go is the planner's; this module only times them."""

from __future__ import annotations

from dataclasses import dataclass

from ds4.engine.config import ModelConfig
from ds4.engine.sizing import index_row_bytes, param_counts, row_bytes


@dataclass
class Hardware:
    """The machine a plan is timed on: its bandwidths and compute rates, and the reserves placement keeps."""

    gpu_bandwidth: float = 1008e9  # RTX 4090 GDDR6X
    gpu_flops: float = 165e12  # RTX 4090 bf16 tensor cores, dense
    pcie_bandwidth: float = 25e9  # PCIe 4.0 x16, achieved
    ram_bandwidth: float = 70e9  # dual-channel DDR5-5600, achieved (89.6 GB/s peak)
    cpu_flops: float = 1.5e12  # a 16-core desktop CPU, AVX-512 bf16/int8
    gpu_reserve: float = 0.75e9  # per card: the CUDA context and the allocator's slack
    engine_chunk: int = 2048  # tokens per engine step (max_num_batched_tokens): each card holds the
    # activation workspace of a prefill chunk at the full context (ds4.engine.workspace); 0: none
    ram_reserve: float = 8e9  # the OS and the process
    layer_overhead: float = 20e-6  # per MoE layer and step: GPU -> CPU -> GPU hand-off
    layer_dispatch: float = 0.0  # per layer and step: launching its operations (~0 with CUDA graphs);
    # on a CPU, eager decode spends about as long dispatching small ops as reading weights: `bench
    # hybrid` measures it on a tiny twin of the model
    prefill_chunk: int = 8192  # tokens per prefill chunk (routed experts stream to the GPU once per chunk)


def attention_read_bytes(config: ModelConfig, context: int) -> float:
    """Cache bytes one decode token reads over all layers (sparse layers read their chosen rows only)."""
    if not config.is_v4:
        row = row_bytes(config.kv_lora_rank + config.qk_rope_head_dim, config.qk_rope_head_dim, "fp8")
        if not config.has_indexer:
            return config.num_hidden_layers * context * row
        index = index_row_bytes(config.index_head_dim, "fp8")
        return config.num_hidden_layers * (context * index + min(context, config.index_topk) * row)
    row = row_bytes(config.head_dim, config.qk_rope_head_dim, "fp8")
    index_row = index_row_bytes(config.index_head_dim, "fp8")
    total = 0.0
    for kind, ratio in zip(config.layer_types, config.compress_ratios, strict=True):
        total += min(context, config.sliding_window) * row
        if ratio and kind == "compressed_sparse_attention":
            total += context // ratio * index_row + min(context // ratio, config.index_topk) * row
        elif ratio:
            total += context // ratio * row
    return total


def predict(config, comps, context, batch, hot, total_experts, expert_bytes, moe_layers, hw):
    """(decode tokens/s, prefill tokens/s). Decode: the GPU reads every non-expert weight once per step
    plus each sequence's attention rows; the routed experts a step touches are read from VRAM when hot
    and from RAM (computed on the CPU) otherwise. Prefill: compute-bound on the GPU, plus the cold
    experts streamed over PCIe once per chunk."""
    gpu_weights = comps["embed"] / config.vocab_size + comps["head"]  # one embedding row per token
    gpu_weights += sum(
        lay["attention"] + lay["router"] + lay["shared"] + lay["dense"] for lay in comps["layers"]
    )
    attention = batch * attention_read_bytes(config, context)
    k, experts = config.num_experts_per_tok, max(config.n_routed_experts, 1)
    touched = experts * (1 - (1 - k / experts) ** batch)  # distinct experts per MoE layer in one step
    hot_share = hot / total_experts if total_experts else 0.0
    expert_read = len(moe_layers) * touched * expert_bytes
    params_per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    cpu_flops = 2 * len(moe_layers) * batch * k * params_per_expert * (1 - hot_share)
    cpu_time = max(expert_read * (1 - hot_share) / hw.ram_bandwidth, cpu_flops / hw.cpu_flops)
    gpu_time = (gpu_weights + attention + expert_read * hot_share) / hw.gpu_bandwidth
    handoffs = len(moe_layers) if hot_share < 1 else 0  # GPU -> CPU -> GPU, per MoE layer with cold experts
    step = gpu_time + cpu_time + handoffs * hw.layer_overhead + config.num_hidden_layers * hw.layer_dispatch
    decode = batch / step
    chunk = min(hw.prefill_chunk, context)
    active = _active_params(config)
    heads, dims = config.num_attention_heads, _attention_dims(config)
    attn_flops = 2 * config.num_hidden_layers * heads * dims * chunk * (chunk / 2)
    flops = 2 * active * chunk + attn_flops
    stream = (total_experts - hot) * expert_bytes / hw.pcie_bandwidth
    prefill = chunk / (flops / hw.gpu_flops + stream)
    return decode, prefill


def _active_params(config: ModelConfig) -> float:
    return param_counts(config)["params_active"]


def _attention_dims(config: ModelConfig) -> int:
    if config.is_v4:
        return 2 * config.head_dim
    return config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
