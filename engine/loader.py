"""Safetensors checkpoints (single file or sharded) -> a ds4 model's parameters.

Reads lazily with `safe_open`, one tensor at a time. One table maps Hugging Face names to ds4's
(DeepSeek reference vocabulary); per-expert tensors are stacked; FP8 block-scaled weights are
dequantized; the multi-token-prediction layer (index >= num_hidden_layers) is skipped. Anything that
does not fit (missing, unexpected or misshaped tensor, unsupported dtype, truncated file) raises one
`CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ds4.engine.config import ModelConfig
from ds4.engine.errors import CheckpointError
from ds4.engine.layers.linear import Linear, kernel_min_bytes, prepare_cpu_kernel
from ds4.engine.layers.quantized import FP8_BLOCK, QuantizedLinear, quantize_module
from ds4.engine.names import LAYER_PATTERN, Target, ds4_to_hf, hf_to_ds4
from ds4.engine.pipeline import layer_of
from ds4.engine.quant import FP4_GROUP, dequantize, scale_shape
from ds4.kernels import cpu_moe, cpu_ops
from ds4.kernels.cpu_moe import FLOAT_FORMATS

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
PACKED_FP4_DTYPES = {"I8": torch.int8, "U8": torch.uint8}  # two e2m1 codes per byte
SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F8_E8M0": torch.float8_e8m0fnu}
INT_DTYPES = {"I64": torch.int64, "I32": torch.int32}
# A quantized `X.weight` is scaled by `X.weight_scale_inv` (Hugging Face) or `X.scale` (DeepSeek's V4).
SCALE_SUFFIXES = ("_scale_inv", ".scale")

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


WEIGHT_DTYPES = {**FLOAT_DTYPES, **FP8_DTYPES, **PACKED_FP4_DTYPES}
QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)
_DTYPE_NAMES = {dtype: name for name, dtype in WEIGHT_DTYPES.items()}


def _read(handle, name: str, file: Path, allowed: dict = WEIGHT_DTYPES) -> torch.Tensor:
    try:
        dtype = handle.get_slice(name).get_dtype()
        if dtype in allowed:
            return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tensor {name} in {file.name} could not be read ({e})") from e
    expected = (
        "F32, BF16, F16, F8_E4M3 or packed FP4 (I8/U8), quantized ones with scales"
        if allowed is WEIGHT_DTYPES
        else " or ".join(allowed)
    )
    raise CheckpointError(f"tensor {name} in {file.name} has dtype {dtype}; ds4 loads {expected}")


def materialize(
    model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype, device, layer_devices=None
) -> None:
    """Gives a meta-device model real (uninitialized) storage: routers in float32, the rest in `dtype`.

    Everything goes to `device`, unless `layer_devices` (one per layer) pipelines the model: then the
    parameters of layer i go to layer_devices[i], what the model registers before its layers (the
    embeddings) to the first layer's device, and what comes after them (final norm, head) to the last's.

    On the CPU, the dense layers' weights (of at least kernel_min_bytes()) and the routed expert stacks are
    stored row by row for ds4's C++ kernel (ds4.kernels.cpu_moe), which computes decode's products at
    close to the read bandwidth; other matrices, and all of them where the kernel does not build, are
    stored input-major (a transposed view keeps their [out, in] shape): MKL's matrix-vector products read
    that layout about twice as fast.
    """
    home = torch.device(device)
    stages = [torch.device(d) for d in layer_devices] if layer_devices else None
    keep_float32 = FLOAT32_PARAMS_V4 if config.is_v4 else FLOAT32_PARAMS
    seen_layers = False
    on_cpu = home.type == "cpu" or any(d.type == "cpu" for d in stages or [])
    cpu_kernel = on_cpu and cpu_moe.usable()  # built once per machine, only where it may run
    if cpu_kernel:
        cpu_ops.load()  # the kernels as torch operators (decode attention calls them where this succeeds)
    min_bytes = kernel_min_bytes()
    for module_name, module in model.named_modules():
        device, layer = home, layer_of(module_name)
        seen_layers = seen_layers or layer is not None
        if stages:
            device = stages[layer] if layer is not None else stages[-1 if seen_layers else 0]
        for key, param in list(module._parameters.items()):
            if param is None:  # e.g. a Linear built without bias
                continue
            name = f"{module_name}.{key}" if module_name else key
            stored = _is_stored(module)  # quantized values and their scales keep the checkpoint's dtypes
            want = (
                param.dtype
                if stored
                else torch.int64
                if INT_PARAMS.search(name)
                else torch.float32
                if keep_float32.search(name)
                else dtype
            )
            shape = tuple(param.shape)
            is_matrix = len(shape) == 2 and not name.endswith("embed.weight")
            rows = (  # a dense layer's weight the CPU kernel reads row by row at decode
                cpu_kernel
                and device.type == "cpu"
                and isinstance(module, Linear)
                and key == "weight"
                and want in FLOAT_FORMATS
                and shape[1] % 32 == 0
                and shape[0] * shape[1] * want.itemsize >= min_bytes
            )
            if key == "weight" and isinstance(module, Linear):
                module.use_cpu_kernel = rows
                if rows:
                    prepare_cpu_kernel()
            if device.type == "cpu" and is_matrix and want.is_floating_point and not stored and not rows:
                swapped = shape[:-2] + (shape[-1], shape[-2])
                data = torch.empty(swapped, dtype=want, device=device).transpose(-1, -2)
            else:
                data = torch.empty(shape, dtype=want, device=device)
            module._parameters[key] = torch.nn.Parameter(data, requires_grad=False)


def _is_stored(module: torch.nn.Module) -> bool:
    return isinstance(module, QuantizedLinear) or getattr(module, "quant", "none") != "none"


def _format(name: str, dtype: str, config: ModelConfig) -> str:
    if dtype in FP8_DTYPES:
        return "fp8"
    routed = ".experts." in name and "shared_experts" not in name
    return "int4" if config.int4_experts and routed else "fp4"


def keep_stored(model: torch.nn.Module, path: str | Path, config: ModelConfig, dtype: torch.dtype) -> int:
    """Makes a meta-device `model` hold the checkpoint's quantized matrices as stored: each nn.Linear whose
    tensor is FP8 / FP4 / int4 becomes a QuantizedLinear, each expert stack whose experts all share one
    such format keeps it. What cannot (FP8 blocks other than 128 x 128, FP8 experts whose intermediate
    size is not a multiple of 128, mixed formats in one stack) is dequantized at load. Returns how many
    modules now hold quantized weights."""
    name_to_file = checkpoint_files(path)
    handles: dict[Path, object] = {}

    def dtype_of(name: str) -> str:
        file = name_to_file[name]
        if file not in handles:
            handles[file] = _open(file)
        return handles[file].get_slice(name).get_dtype()

    block = tuple(config.fp8_block_size or FP8_BLOCK)
    stacks: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # experts module -> (fmt, dtypes)
    kept = 0
    for name in sorted(name_to_file):
        scale = _scale_of(name, name_to_file)
        if scale is None or _scaled_weight(name, name_to_file) is not None:
            continue
        weight_dtype = dtype_of(name)
        if weight_dtype not in FP8_DTYPES and weight_dtype not in PACKED_FP4_DTYPES:
            continue  # a float weight beside a scale: load_weights names the problem
        try:
            target = hf_to_ds4(name, config)
        except KeyError:
            continue  # load_weights names the unexpected tensor
        fmt = _format(name, weight_dtype, config)
        if target is None or (fmt == "fp8" and block != FP8_BLOCK):
            continue
        scale_dtype = dtype_of(scale)
        if scale_dtype not in SCALE_DTYPES:
            continue
        if target.expert is not None:
            stacks[target.param.rpartition(".")[0]].append((fmt, weight_dtype, scale_dtype))
        elif target.param.endswith(".weight"):
            kept += quantize_module(
                model,
                target.param.removesuffix(".weight"),
                fmt,
                WEIGHT_DTYPES[weight_dtype],
                SCALE_DTYPES[scale_dtype],
                dtype,
            )
    for module_name, formats in stacks.items():
        experts = model.get_submodule(module_name)
        expected = 3 * experts.w13.shape[0]  # gate, up and down of every expert
        fmt, weight_dtype, scale_dtype = formats[0]
        if len(formats) != expected or len(set(formats)) != 1:
            continue
        if fmt == "fp8" and experts.w2.shape[-1] % FP8_BLOCK[0]:
            continue  # gate and up are stacked: their 128-row blocks must not straddle
        experts.keep_quantized(fmt, WEIGHT_DTYPES[weight_dtype], SCALE_DTYPES[scale_dtype])
        kept += 1
    return kept


def load_weights(model: torch.nn.Module, path: str | Path, config: ModelConfig) -> None:
    """Fills every parameter of `model` (already materialized) from the checkpoint at `path`."""
    name_to_file = checkpoint_files(path)
    params = dict(model.named_parameters())
    loaded: set[tuple] = set()  # (param, expert, half) filled; (param, None, None) = all of it
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in name_to_file.items():
        if (weight := _scaled_weight(name, name_to_file)) is not None:
            _check_scale(name, weight, name_to_file, config)
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
            param = params[target.param]
            integer = not param.is_floating_point() and param.dtype not in QUANTIZED_DTYPES
            tensor = _read(handle, name, file, INT_DTYPES if integer else WEIGHT_DTYPES)
            if tensor.dtype in QUANTIZED_DTYPES and not integer:
                fmt = _format(name, _DTYPE_NAMES[tensor.dtype], config)
                module_name, _, key = target.param.rpartition(".")
                scale = _read_scale(name, tensor, name_to_file, block, fmt)
                if _is_stored(model.get_submodule(module_name)) and param.dtype == tensor.dtype:
                    scale_param = "scale" if key == "weight" else f"{key}_scale"
                    scale_target = Target(f"{module_name}.{scale_param}", target.expert, target.half)
                    _copy_into(params[scale_target.param], scale_target, scale, name, file)
                else:  # kept in float: dequantized here, once
                    tensor = dequantize(fmt, tensor, scale, block)
            _copy_into(param, target, tensor, name, file)
            loaded.add(_key(target))

    if config.tie_word_embeddings and ("head.weight", None, None) not in loaded:
        model.head.weight = model.embed.weight
        loaded.add(("head.weight", None, None))
    missing = [
        f"{hf} (for {p})"
        for p, t in params.items()
        if (p, None, None) not in loaded and not p.endswith("scale")  # scales come with their weights
        for hf, _ in ds4_to_hf(p, tuple(t.shape), config)
        if _key(hf_to_ds4(hf, config)) not in loaded
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {path} lacks tensor(s) {shown}")


def _key(target: Target) -> tuple:
    return (target.param, target.expert, target.half)


def _scaled_weight(name: str, name_to_file: dict[str, Path]) -> str | None:
    """The weight that tensor `name` scales, when it is a quantization scale."""
    if name.endswith("_scale_inv"):
        return name.removesuffix("_scale_inv")
    if name.endswith(".scale") and name.removesuffix(".scale") + ".weight" in name_to_file:
        return name.removesuffix(".scale") + ".weight"
    return None


def _scale_of(weight: str, name_to_file: dict[str, Path]) -> str | None:
    for name in (weight + "_scale_inv", weight.removesuffix(".weight") + ".scale"):
        if name in name_to_file:
            return name
    return None


def _check_scale(name: str, weight: str, name_to_file: dict[str, Path], config: ModelConfig) -> None:
    """A scale must sit beside an FP8 or packed-FP4 weight (scales of skipped MTP layers excepted)."""
    file = name_to_file[name]
    if weight not in name_to_file:
        layer = LAYER_PATTERN.match(name) or re.match(r"^layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            return
        raise CheckpointError(f"unexpected tensor {name} in {file.name}: no weight {weight} to scale")
    weight_file = name_to_file[weight]
    dtype = _open(weight_file).get_slice(weight).get_dtype()
    if dtype not in FP8_DTYPES and dtype not in PACKED_FP4_DTYPES:
        raise CheckpointError(
            f"{name} in {file.name} scales {weight}, stored as {dtype} in {weight_file.name}: "
            "scales belong to FP8 or FP4 weights (was the checkpoint converted without applying them?)"
        )


def _read_scale(name: str, weight: torch.Tensor, name_to_file, block, fmt: str) -> torch.Tensor:
    """The scales of quantized tensor `name`, checked against its shape: FP8 one per 128 x 128 block,
    packed FP4 one e8m0 per 32 inputs, packed int4 (ds4-quantized routed experts) one bf16 per 32."""
    kind = fmt.upper()
    scale_name = _scale_of(name, name_to_file)
    if scale_name is None:
        raise CheckpointError(
            f"{kind} tensor {name} in {name_to_file[name].name} has no {name}_scale_inv or .scale: "
            "cannot dequantize without scales"
        )
    scale_file = name_to_file[scale_name]
    scale = _read(_open(scale_file), scale_name, scale_file, SCALE_DTYPES)
    if kind == "FP8":
        need = scale_shape(tuple(weight.shape), block) if weight.dim() == 2 else None
        how = f"with {block[0]}x{block[1]} blocks"
    else:
        need = (weight.shape[0], weight.shape[1] * 2 // FP4_GROUP) if weight.dim() == 2 else None
        how = f"(2 values per byte) with one scale per {FP4_GROUP} inputs"
    if need is None or tuple(scale.shape) != tuple(need):
        raise CheckpointError(
            f"{scale_name} in {scale_file.name} has shape {tuple(scale.shape)}; {kind} weight "
            f"{tuple(weight.shape)} {how} needs {need}"
        )
    return scale


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


CACHE_FORMAT_VERSION = 1  # bump when cached rows change meaning


def model_fingerprint(path: str | Path, dtype: torch.dtype) -> bytes:
    """What cached rows depend on: config.json, the dtype, the cache format, and each weight file's
    name, size, header and first and last 64 KB (cheap even for a terabyte, and differs between seeds)."""
    path = Path(path)
    digest = hashlib.sha256(f"ds4-cache-v{CACHE_FORMAT_VERSION}:{dtype}".encode())
    digest.update((path / "config.json").read_bytes())
    for file in sorted(set(checkpoint_files(path).values())):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            digest.update(f.read(1 << 16))
    return digest.digest()
