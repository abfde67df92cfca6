"""Random-weight checkpoints that ds4 writes itself (`ds4-agent model init`): tests and benchmarks never
download weights. The output is an HF-format folder (config.json, safetensors, tokenizer.json) that the
transformers library loads too; V4 checkpoints use DeepSeek's reference tensor names, as released.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds4.engine.config import ModelConfig
from ds4.engine.models import build_model
from ds4.engine.names import ds4_to_hf
from ds4.engine.presets import init_preset
from ds4.engine.quant import quantize_fp4, quantize_fp8_blocks
from ds4.engine.tokenizer import SPECIAL_TOKENS, train_bpe

FP8_BLOCK = (128, 128)


def _random_tensor(name: str, shape, gen: torch.Generator, config: ModelConfig, std: float) -> torch.Tensor:
    """Random weights with the structure real ones have: unit norms, small biases, valid routing tables."""
    if (
        name.endswith(("layernorm.weight", "norm.weight"))
        or ".norm1." in name
        or ".norm2." in name
        or ".norms." in name
    ):
        return torch.ones(shape)
    if name.endswith("tid2eid"):  # distinct experts per token
        rows = [torch.randperm(config.n_routed_experts, generator=gen)[: shape[1]] for _ in range(shape[0])]
        return torch.stack(rows)
    if name.endswith(("_scale", "hc_head_scale")):
        return torch.ones(shape)
    if name.endswith(("k_norm.bias", "e_score_correction_bias", "gate.bias", ".ape")):
        return torch.randn(shape, generator=gen) * 0.01
    if name.endswith(("attn_sink", "_base")):
        return torch.randn(shape, generator=gen) * 0.3
    return torch.randn(shape, generator=gen) * std


def _keeps_float32(name: str) -> bool:
    return any(
        x in name for x in ("mlp.gate.", "ffn.gate.", "weights_proj", "hc_", "attn_sink", "compressor.")
    )


def _scale_name(weight: str, config: ModelConfig) -> str:
    return weight.removesuffix(".weight") + ".scale" if config.is_v4 else weight + "_scale_inv"


def _is_fp8_candidate(name: str, shape) -> bool:
    excluded = (
        "embed",
        "head",
        "mlp.gate.",
        "ffn.gate.",
        "weights_proj",
        "norm",
        "hc_",
        "compressor.",
        "tid2eid",
    )
    return len(shape) == 2 and name.endswith(".weight") and not any(x in name for x in excluded)


def init_checkpoint(
    family: str,
    preset: str,
    out: str | Path,
    seed: int = 0,
    fp8: bool = False,
    max_shard_bytes: int = 2 << 30,
    fp4_experts: bool = False,
    config_overrides: dict | None = None,
) -> Path:
    """Writes a random checkpoint of `family` at `preset` size into `out`; returns the folder.

    `fp8`: linear weights as e4m3 with 128x128 block scales; `fp4_experts`: routed experts as packed
    e2m1 with one e8m0 scale per 32 inputs (V4's release format). Scales are named `X.scale` in V4
    checkpoints and `X.weight_scale_inv` in V3 ones, as each family ships them.
    """
    cfg = dict(init_preset(family, preset), **(config_overrides or {}))
    if fp4_experts:
        cfg["expert_dtype"] = "fp4"
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
            t = _random_tensor(name, shape, gen, config, cfg.get("initializer_range", 0.02))
            if fp4_experts and ".experts." in name:
                tensors[name], tensors[_scale_name(name, config)] = quantize_fp4(t)
            elif fp8 and _is_fp8_candidate(name, shape):
                tensors[name], tensors[_scale_name(name, config)] = quantize_fp8_blocks(t, FP8_BLOCK)
            elif t.is_floating_point():
                tensors[name] = t.to(torch.float32 if _keeps_float32(name) else dtype)
            else:
                tensors[name] = t
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
