"""Random-weight checkpoints that ds4 writes itself (`ds4-agent model init`): tests and benchmarks never
download weights. The output is an HF-format folder (config.json, safetensors, tokenizer.json) that the
transformers library loads too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds4.engine.config import ModelConfig
from ds4.engine.loader import ds4_to_hf
from ds4.engine.models import build_model
from ds4.engine.quant import quantize_fp8_blocks
from ds4.engine.tokenizer import SPECIAL_TOKENS, train_bpe

FAMILIES = ("deepseek_v3", "deepseek_v32")
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}

PRESETS = {
    # Runs in seconds on a CPU: tests.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        max_position_embeddings=2048,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=512,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        index_n_heads=4,
        index_head_dim=16,
        index_topk=16,
        dtype="float32",
    ),
    # About 100M parameters (27M active per token): benchmarks.
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=1536,
        moe_intermediate_size=256,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        max_position_embeddings=16384,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        index_n_heads=8,
        index_head_dim=64,
        index_topk=256,
        dtype="bfloat16",
    ),
}
INDEXER_KEYS = ("index_n_heads", "index_head_dim", "index_topk")
FP8_BLOCK = (128, 128)


def preset_config(family: str, preset: str) -> dict:
    """The config.json of a preset, in the transformers format (legacy `rope_scaling`, as DeepSeek ships)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if family != "deepseek_v32":
        for key in INDEXER_KEYS:
            cfg.pop(key)
    cfg.update(
        model_type=family,
        architectures=[ARCHITECTURES[family]],
        num_key_value_heads=cfg["num_attention_heads"],
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        attention_bias=False,
        initializer_range=0.02,
        num_nextn_predict_layers=0,
    )
    return cfg


def _random_tensor(name: str, shape, gen: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith(("layernorm.weight", "norm.weight")):
        return torch.ones(shape)
    if name.endswith(("k_norm.bias", "e_score_correction_bias")):
        return torch.randn(shape, generator=gen) * 0.01
    return torch.randn(shape, generator=gen) * std


def _is_fp8_candidate(name: str, shape) -> bool:
    excluded = ("embed_tokens", "lm_head", "mlp.gate.weight", "weights_proj", "norm")
    return len(shape) == 2 and name.endswith(".weight") and not any(x in name for x in excluded)


def init_checkpoint(
    family: str,
    preset: str,
    out: str | Path,
    seed: int = 0,
    fp8: bool = False,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Writes a random checkpoint of `family` at `preset` size into `out`; returns the folder."""
    cfg = preset_config(family, preset)
    if fp8:
        cfg["quantization_config"] = dict(
            quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(FP8_BLOCK)
        )
    config = ModelConfig.from_hf(cfg, source=f"preset {preset}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = build_model(config)
    tensors: dict[str, torch.Tensor] = {}
    for param, p in model.named_parameters():
        for name, shape in ds4_to_hf(param, tuple(p.shape), config):
            t = _random_tensor(name, shape, gen, cfg["initializer_range"])
            if fp8 and _is_fp8_candidate(name, shape):
                tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(t, FP8_BLOCK)
            else:
                tensors[name] = t.to(
                    torch.float32 if "mlp.gate." in name or "weights_proj" in name else dtype
                )
    _save_shards(tensors, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _write_tokenizer(out, cfg["vocab_size"])
    return out


def _save_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    width = max(5, int(math.log10(len(shards))) + 1)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:0{width}d}-of-{len(shards):0{width}d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    train_bpe(vocab_size).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIAL_TOKENS[0],
                "eos_token": SPECIAL_TOKENS[1],
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 1 << 20,
            },
            indent=2,
        )
        + "\n"
    )
