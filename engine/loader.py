"""Safetensors checkpoints (single file or sharded) -> a ds4 model's parameters.

Reads lazily with `safe_open`, one tensor at a time. One table maps Hugging Face names to ds4's
(DeepSeek reference vocabulary); per-expert tensors are stacked; FP8 block-scaled weights are
dequantized; the multi-token-prediction layer (index >= num_hidden_layers) is skipped. Anything that
does not fit (missing, unexpected or misshaped tensor, unsupported dtype, truncated file) raises one
`CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ds4.engine.config import ModelConfig
from ds4.engine.errors import CheckpointError
from ds4.engine.quant import dequantize_fp8_blocks, scale_shape

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
FP8_SCALE_SUFFIX = "_scale_inv"

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
# Parameters kept in float32 whatever the model dtype (routers and the indexer's head weights).
FLOAT32_PARAMS = re.compile(r"(ffn\.gate\.(weight|bias)|indexer\.weights_proj\.weight)$")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally one expert's slice of a stacked one."""

    param: str
    expert: int | None = None
    half: int | None = None  # 0 = first half of the rows (gate), 1 = second (up)


def hf_to_ds4(name: str, num_layers: int) -> Target | None:
    """The ds4 target of an HF tensor name; None when the tensor is to be skipped (MTP layers)."""
    if name in TOP_NAMES:
        return Target(TOP_NAMES[name])
    m = _LAYER.match(name)
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


def ds4_to_hf(param: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors (name, shape) that make up one ds4 parameter: the inverse of `hf_to_ds4`."""
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


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        for file in sorted(set(weight_map.values())):
            if not (path / file).is_file():
                raise CheckpointError(f"{index} lists shard {file}, which is missing from {path}")
            held = set(_open(path / file).keys())
            absent = [name for name, f in weight_map.items() if f == file and name not in held]
            if absent:
                raise CheckpointError(f"{index} lists {absent[0]} in {file}, which does not hold it")
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    name_to_file: dict[str, Path] = {}
    for file in files:
        for name in _open(file).keys():
            if name in name_to_file:
                raise CheckpointError(
                    f"tensor {name} appears in both {name_to_file[name].name} and {file.name}"
                )
            name_to_file[name] = file
    return name_to_file


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt ({e})") from e


def _read(handle, name: str, file: Path) -> torch.Tensor:
    try:
        dtype = handle.get_slice(name).get_dtype()
        if dtype in FLOAT_DTYPES or dtype in FP8_DTYPES:
            return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tensor {name} in {file.name} could not be read ({e})") from e
    raise CheckpointError(
        f"tensor {name} in {file.name} has dtype {dtype}; ds4 loads F32, BF16, F16 and F8_E4M3 (with scales)"
    )


def materialize(model: torch.nn.Module, dtype: torch.dtype, device) -> None:
    """Gives a meta-device model real (uninitialized) storage: routers in float32, the rest in `dtype`.

    On the CPU, matrices are stored input-major (a transposed view keeps their [out, in] shape): MKL's
    matrix-vector products read that layout about twice as fast, which is what decode is made of.
    """
    device = torch.device(device)
    for module_name, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:  # e.g. a Linear built without bias
                continue
            name = f"{module_name}.{key}" if module_name else key
            want = torch.float32 if FLOAT32_PARAMS.search(name) else dtype
            shape = tuple(param.shape)
            if device.type == "cpu" and len(shape) >= 2 and name != "embed.weight":
                swapped = shape[:-2] + (shape[-1], shape[-2])
                data = torch.empty(swapped, dtype=want, device=device).transpose(-1, -2)
            else:
                data = torch.empty(shape, dtype=want, device=device)
            module._parameters[key] = torch.nn.Parameter(data, requires_grad=False)


def load_weights(model: torch.nn.Module, path: str | Path, config: ModelConfig) -> None:
    """Fills every parameter of `model` (already materialized) from the checkpoint at `path`."""
    name_to_file = checkpoint_files(path)
    params = dict(model.named_parameters())
    loaded: set[str] = set()  # HF names read, plus ds4 names of parameters filled whole
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in name_to_file.items():
        if name.endswith(FP8_SCALE_SUFFIX):
            _check_scale(name, name_to_file, config)
        else:
            by_file[file].append(name)
    block = config.fp8_block_size or (128, 128)

    for file, names in by_file.items():
        handle = _open(file)
        for name in names:
            try:
                target = hf_to_ds4(name, config.num_hidden_layers)
            except KeyError:
                raise CheckpointError(
                    f"unexpected tensor {name} in {file.name}: "
                    f"{config.model_type} with this config.json has no such weight"
                ) from None
            if target is None:
                continue
            if target.param not in params:
                raise CheckpointError(
                    f"unexpected tensor {name} in {file.name}: this config.json builds no {target.param}"
                )
            tensor = _read(handle, name, file)
            if tensor.dtype == torch.float8_e4m3fn:
                tensor = _dequantize(name, tensor, name_to_file, block)
            _copy_into(params[target.param], target, tensor, name, file)
            loaded.add(name if target.expert is not None else target.param)

    if config.tie_word_embeddings and "head.weight" not in loaded:
        model.head.weight = model.embed.weight
        loaded.add("head.weight")
    missing = [
        f"{hf} (for {p})"
        for p, t in params.items()
        if p not in loaded
        for hf, _ in ds4_to_hf(p, tuple(t.shape))
        if hf not in loaded
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {path} lacks tensor(s) {shown}")


def _check_scale(name: str, name_to_file: dict[str, Path], config: ModelConfig) -> None:
    """A `*_scale_inv` must sit beside an FP8 weight (scales of skipped MTP layers excepted)."""
    weight = name[: -len(FP8_SCALE_SUFFIX)]
    file = name_to_file[name]
    if weight not in name_to_file:
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            return
        raise CheckpointError(f"unexpected tensor {name} in {file.name}: no weight {weight} to scale")
    weight_file = name_to_file[weight]
    dtype = _open(weight_file).get_slice(weight).get_dtype()
    if dtype not in FP8_DTYPES:
        raise CheckpointError(
            f"{name} in {file.name} scales {weight}, stored as {dtype} in {weight_file.name}: "
            "scales belong to FP8 weights (was the checkpoint converted without applying them?)"
        )


def _dequantize(name, weight, name_to_file, block) -> torch.Tensor:
    scale_name = name + FP8_SCALE_SUFFIX
    if scale_name not in name_to_file:
        raise CheckpointError(
            f"FP8 tensor {name} in {name_to_file[name].name} has no {scale_name}: "
            "cannot dequantize without scales"
        )
    scale_file = name_to_file[scale_name]
    scale = _read(_open(scale_file), scale_name, scale_file)
    if weight.dim() != 2 or tuple(scale.shape) != scale_shape(tuple(weight.shape), block):
        raise CheckpointError(
            f"{scale_name} in {scale_file.name} has shape {tuple(scale.shape)}; weight {tuple(weight.shape)} "
            f"with {block[0]}x{block[1]} blocks needs {scale_shape(tuple(weight.shape), block)}"
        )
    return dequantize_fp8_blocks(weight, scale, block)


def _copy_into(
    param: torch.nn.Parameter, target: Target, tensor: torch.Tensor, name: str, file: Path
) -> None:
    dest = param.data
    if target.expert is not None:
        dest = dest[target.expert]
        if target.half is not None:
            dest = dest.chunk(2, dim=0)[target.half]
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(
            f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} "
            f"for {target.param} (does config.json match the weights?)"
        )
    with torch.no_grad():
        dest.copy_(tensor)
