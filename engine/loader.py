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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ds4.engine.config import ModelConfig
from ds4.engine.errors import CheckpointError
from ds4.engine.names import LAYER_PATTERN, Target, ds4_to_hf, hf_to_ds4
from ds4.engine.quant import dequantize_fp8_blocks, scale_shape

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
INT_DTYPES = {"I64": torch.int64, "I32": torch.int32}
FP8_SCALE_SUFFIX = "_scale_inv"

# Parameters kept in float32 whatever the model dtype: routers and the indexer's head weights; in V4
# also its norms, sinks, mHC mixers and compressors (as DeepSeek runs them).
FLOAT32_PARAMS = re.compile(r"(ffn\.gate\.(weight|bias)|indexer\.weights_proj\.weight)$")
FLOAT32_PARAMS_V4 = re.compile(
    r"(ffn\.gate\.(weight|bias)|indexer\.weights_proj\.weight|hc_(attn|ffn|head)\.\w+|attn_sink"
    r"|compressor\.\w+(\.weight)?|(attn_norm|ffn_norm|attn\.norm|attn\.q_norm)\.weight|^norm\.weight)$"
)
INT_PARAMS = re.compile(r"tid2eid$")  # V4's token-id -> expert-ids table


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


def _read(handle, name: str, file: Path, integer: bool = False) -> torch.Tensor:
    try:
        dtype = handle.get_slice(name).get_dtype()
        if (dtype in INT_DTYPES) if integer else (dtype in FLOAT_DTYPES or dtype in FP8_DTYPES):
            return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tensor {name} in {file.name} could not be read ({e})") from e
    expected = "I64 or I32" if integer else "F32, BF16, F16 and F8_E4M3 (with scales)"
    raise CheckpointError(f"tensor {name} in {file.name} has dtype {dtype}; ds4 loads {expected}")


def materialize(model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype, device) -> None:
    """Gives a meta-device model real (uninitialized) storage: routers in float32, the rest in `dtype`.

    On the CPU, matrices are stored input-major (a transposed view keeps their [out, in] shape): MKL's
    matrix-vector products read that layout about twice as fast, which is what decode is made of.
    """
    device = torch.device(device)
    keep_float32 = FLOAT32_PARAMS_V4 if config.is_v4 else FLOAT32_PARAMS
    for module_name, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None:  # e.g. a Linear built without bias
                continue
            name = f"{module_name}.{key}" if module_name else key
            want = (
                torch.int64
                if INT_PARAMS.search(name)
                else torch.float32
                if keep_float32.search(name)
                else dtype
            )
            shape = tuple(param.shape)
            if device.type == "cpu" and len(shape) >= 2 and want.is_floating_point and name != "embed.weight":
                swapped = shape[:-2] + (shape[-1], shape[-2])
                data = torch.empty(swapped, dtype=want, device=device).transpose(-1, -2)
            else:
                data = torch.empty(shape, dtype=want, device=device)
            module._parameters[key] = torch.nn.Parameter(data, requires_grad=False)


def load_weights(model: torch.nn.Module, path: str | Path, config: ModelConfig) -> None:
    """Fills every parameter of `model` (already materialized) from the checkpoint at `path`."""
    name_to_file = checkpoint_files(path)
    params = dict(model.named_parameters())
    loaded: set[tuple] = set()  # (param, expert, half) filled; (param, None, None) = all of it
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
                target = hf_to_ds4(name, config)
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
            tensor = _read(handle, name, file, integer=not params[target.param].is_floating_point())
            if tensor.dtype == torch.float8_e4m3fn:
                tensor = _dequantize(name, tensor, name_to_file, block)
            _copy_into(params[target.param], target, tensor, name, file)
            loaded.add(_key(target))

    if config.tie_word_embeddings and ("head.weight", None, None) not in loaded:
        model.head.weight = model.embed.weight
        loaded.add(("head.weight", None, None))
    missing = [
        f"{hf} (for {p})"
        for p, t in params.items()
        if (p, None, None) not in loaded
        for hf, _ in ds4_to_hf(p, tuple(t.shape), config)
        if _key(hf_to_ds4(hf, config)) not in loaded
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {path} lacks tensor(s) {shown}")


def _key(target: Target) -> tuple:
    return (target.param, target.expert, target.half)


def _check_scale(name: str, name_to_file: dict[str, Path], config: ModelConfig) -> None:
    """A `*_scale_inv` must sit beside an FP8 weight (scales of skipped MTP layers excepted)."""
    weight = name[: -len(FP8_SCALE_SUFFIX)]
    file = name_to_file[name]
    if weight not in name_to_file:
        layer = LAYER_PATTERN.match(name)
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
