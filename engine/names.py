"""Checkpoint tensor names <-> ds4 parameter names, one table per family.

V3/V3.2 checkpoints use Hugging Face names (`model.layers.{i}.self_attn.kv_b_proj.weight`); V4 ships
DeepSeek's reference names (`layers.{i}.attn.wkv.weight`), which ds4 uses for its own parameters, so
its map is nearly the identity (transformers' save_pretrained adds a `model.` prefix; both are read).
Per-expert tensors map to one slice of ds4's stacked `w13` (gate; up) or `w2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ds4.engine.config import ModelConfig

# HF module path (after "model.layers.{i}.") -> ds4 module path. Suffixes (.weight/.bias) carry over.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn.wq",
    "self_attn.q_a_proj": "attn.wq_a",
    "self_attn.q_a_layernorm": "attn.q_norm",
    "self_attn.q_b_proj": "attn.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attn.wkv_a",
    "self_attn.kv_a_layernorm": "attn.kv_norm",
    "self_attn.kv_b_proj": "attn.wkv_b",
    "self_attn.o_proj": "attn.wo",
    "self_attn.indexer.wq_b": "attn.indexer.wq_b",
    "self_attn.indexer.wk": "attn.indexer.wk",
    "self_attn.indexer.k_norm": "attn.indexer.k_norm",
    "self_attn.indexer.weights_proj": "attn.indexer.weights_proj",
    "mlp.gate_proj": "ffn.w1",
    "mlp.up_proj": "ffn.w3",
    "mlp.down_proj": "ffn.w2",
    "mlp.gate": "ffn.gate",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
    "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
EXPERT_PARTS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
FUSED_EXPERTS = {"gate_up_proj": "w13", "down_proj": "w2"}
LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally one expert's slice of a stacked one."""

    param: str
    expert: int | None = None
    half: int | None = None  # 0 = first half of the rows (gate), 1 = second (up)


def _v3_to_ds4(name: str, num_layers: int) -> Target | None:
    """The ds4 target of an HF tensor name; None when the tensor is to be skipped (MTP layers)."""
    if name in TOP_NAMES:
        return Target(TOP_NAMES[name])
    m = LAYER_PATTERN.match(name)
    if not m:
        raise KeyError(name)
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= num_layers:
        return None  # multi-token prediction module
    prefix = f"layers.{layer}.ffn.experts."
    if em := _EXPERT.match(rest):
        param, half = EXPERT_PARTS[em.group(2)]
        return Target(prefix + param, int(em.group(1)), half)
    if fm := _FUSED.match(rest):
        return Target(prefix + FUSED_EXPERTS[fm.group(1)])
    module, _, suffix = rest.rpartition(".")
    if suffix == "e_score_correction_bias":
        module, suffix = rest.rpartition(".")[0], "bias"
    if module not in LAYER_NAMES:
        raise KeyError(name)
    return Target(f"layers.{layer}.{LAYER_NAMES[module]}.{suffix}")


def _ds4_to_v3(param: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    top = {v: k for k, v in TOP_NAMES.items()}
    if param in top:
        return [(top[param], shape)]
    _, layer, rest = param.split(".", 2)
    prefix = f"model.layers.{layer}."
    if rest.startswith("ffn.experts."):
        which = rest.rsplit(".", 1)[1]
        parts = [hf for hf, (p, _) in EXPERT_PARTS.items() if p == which]
        per_expert = shape[1:] if which == "w2" else (shape[1] // 2, shape[2])
        return [(f"{prefix}mlp.experts.{e}.{hf}.weight", per_expert) for e in range(shape[0]) for hf in parts]
    module, suffix = rest.rsplit(".", 1)
    hf_module = {v: k for k, v in LAYER_NAMES.items()}[module]
    if hf_module == "mlp.gate" and suffix == "bias":
        suffix = "e_score_correction_bias"
    return [(f"{prefix}{hf_module}.{suffix}", shape)]


# DeepSeek-V4 (reference names). Only these differ from ds4's; everything else maps to itself.
V4_TOP_NAMES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head.fn",
    "hc_head.hc_base": "hc_head.base",
    "hc_head.hc_scale": "hc_head.scale",
    "hc_head_fn": "hc_head.fn",
    "hc_head_base": "hc_head.base",
    "hc_head_scale": "hc_head.scale",
}
_V4_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_V4_HC = re.compile(r"^hc_(attn|ffn)_(fn|base|scale)$")
_V4_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
V4_EXPERT_PARTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}


def _v4_to_ds4(name: str, num_layers: int) -> Target | None:
    name = name.removeprefix("model.")
    if name.startswith("mtp."):
        return None  # multi-token prediction module
    if name in V4_TOP_NAMES:
        return Target(V4_TOP_NAMES[name])
    m = _V4_LAYER.match(name)
    if not m:
        return Target(name)
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= num_layers:
        return None
    if hc := _V4_HC.match(rest):
        return Target(f"layers.{layer}.hc_{hc.group(1)}.{hc.group(2)}")
    if ex := _V4_EXPERT.match(rest):
        param, half = V4_EXPERT_PARTS[ex.group(2)]
        return Target(f"layers.{layer}.ffn.experts.{param}", int(ex.group(1)), half)
    return Target(name)


def _ds4_to_v4(param: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    if param.startswith("hc_head."):
        return [(f"hc_head_{param.split('.')[1]}", shape)]
    if param in ("embed.weight", "head.weight", "norm.weight"):
        return [(param, shape)]
    _, layer, rest = param.split(".", 2)
    if rest.startswith("ffn.experts."):
        which = rest.rsplit(".", 1)[1]
        parts = [w for w, (p, _) in V4_EXPERT_PARTS.items() if p == which]
        per_expert = shape[1:] if which == "w2" else (shape[1] // 2, shape[2])
        return [
            (f"layers.{layer}.ffn.experts.{e}.{w}.weight", per_expert) for e in range(shape[0]) for w in parts
        ]
    if rest.startswith(("hc_attn.", "hc_ffn.")):
        return [(f"layers.{layer}.{rest.replace('.', '_')}", shape)]
    return [(param, shape)]


def hf_to_ds4(name: str, config: ModelConfig) -> Target | None:
    """The ds4 target of a checkpoint tensor; None when it is to be skipped (multi-token prediction).
    Raises KeyError for a name the family does not have."""
    if config.is_v4:
        return _v4_to_ds4(name, config.num_hidden_layers)
    return _v3_to_ds4(name, config.num_hidden_layers)


def ds4_to_hf(param: str, shape: tuple[int, ...], config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint tensors (name, shape) that make up one ds4 parameter: the inverse of `hf_to_ds4`."""
    return _ds4_to_v4(param, shape) if config.is_v4 else _ds4_to_v3(param, shape)
