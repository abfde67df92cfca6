"""`ds4-agent model quantize`: a new HF-style checkpoint with routed experts in FP4 (e2m1, an e8m0 scale
per 32 inputs, as DeepSeek-V4 ships them) and the other matrices in FP8 (e4m3, a float32 scale per
128 x 128 block, as DeepSeek-V3 ships them), or kept in bf16.

Streaming: one tensor is read, quantized and queued at a time, and a shard is written whenever the
queue reaches the shard size, so memory stays at one shard plus one tensor whatever the model's size.
Norms, embeddings, the head, routers, biases, mHC mixers, compressors and sinks stay in high precision.
Tensors whose shape a format cannot take (FP4 needs inputs in multiples of 32) stay as they are, and
the report says so. The loader reads the result as it reads DeepSeek's own FP8/FP4 checkpoints.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ds4.engine.loader import checkpoint_files
from ds4.engine.quant import CODECS, FP4_GROUP

KEEP = (
    "norm",
    "embed",
    "lm_head",
    "head.",
    ".gate.",  # routers (and their correction bias)
    "e_score_correction",
    "hc_",
    "compressor",
    "weights_proj",
    "tid2eid",
    "attn_sink",
    "ape",
    "bias",
)
SCALE_SUFFIXES = ("_scale_inv", ".scale")


@dataclass
class QuantizeReport:
    tensors: int = 0
    experts_quantized: int = 0
    matrices_quantized: int = 0
    kept: int = 0
    kept_shapes: list[str] = field(default_factory=list)  # could not take the format
    bytes_in: int = 0
    bytes_out: int = 0
    shards: int = 0
    max_rel_error: dict[str, float] = field(default_factory=dict)  # format -> worst tensor (Frobenius)


def _kind(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) != 2 or not name.endswith(".weight") or any(k in name for k in KEEP):
        return "keep"
    return "expert" if ".experts." in name and "shared_experts" not in name else "matrix"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def quantize_checkpoint(
    src: str | Path, dst: str | Path, experts: str = "fp4", attn: str = "fp8", shard_bytes: int = 2 << 30
) -> QuantizeReport:
    src, dst = Path(src), Path(dst)
    if experts not in ("fp4", "int4", "fp8", "bf16") or attn not in ("fp8", "bf16"):
        raise ValueError(f"experts fp4|int4|fp8|bf16 and attn fp8|bf16, not {experts!r} / {attn!r}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty: quantize into a new folder")
    files = checkpoint_files(src)
    source = json.loads((src / "config.json").read_text())
    source_int4 = (source.get("ds4_quantization") or {}).get("experts") == "int4"  # ds4's own output
    dst.mkdir(parents=True, exist_ok=True)
    report, queue, queued, weight_map = QuantizeReport(), {}, 0, {}

    def flush() -> None:
        nonlocal queue, queued
        if not queue:
            return
        report.shards += 1
        name = f"model-{report.shards:05d}.safetensors"
        save_file(queue, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in queue})
        queue, queued = {}, 0

    def put(name: str, tensor: torch.Tensor) -> None:
        nonlocal queued
        queue[name] = tensor.contiguous()
        queued += tensor.numel() * tensor.element_size()
        report.bytes_out += tensor.numel() * tensor.element_size()
        if queued >= shard_bytes:
            flush()

    handles: dict[Path, object] = {}
    try:
        for name in sorted(files):
            if name.endswith(SCALE_SUFFIXES) and _scaled(name) in files:
                continue  # read with its weight
            file = files[name]
            if file not in handles:
                handles[file] = safe_open(file, "pt").__enter__()
            tensor = handles[file].get_tensor(name)
            report.tensors += 1
            report.bytes_in += tensor.numel() * tensor.element_size()
            scale_name = next(
                (n for n in (name + "_scale_inv", name.removesuffix(".weight") + ".scale") if n in files),
                None,
            )
            if scale_name is not None:  # already quantized: back to float first
                scale_file = files[scale_name]
                if scale_file not in handles:
                    handles[scale_file] = safe_open(scale_file, "pt").__enter__()
                scales = handles[scale_file].get_tensor(scale_name)
                report.bytes_in += scales.numel() * scales.element_size()
                packed = "int4" if source_int4 and _kind(name, (0, 0)) == "expert" else "fp4"
                fmt = "fp8" if tensor.dtype == torch.float8_e4m3fn else packed
                tensor = CODECS[fmt][1](tensor, scales)
            kind = _kind(name, tuple(tensor.shape))
            fmt = {"expert": experts, "matrix": attn}.get(kind, "keep")
            if fmt in ("fp4", "int4") and tensor.shape[1] % FP4_GROUP:
                report.kept_shapes.append(
                    f"{name} {tuple(tensor.shape)}: inputs not a multiple of {FP4_GROUP}"
                )
                fmt = "bf16"
            if fmt in CODECS:
                quantize, dequantize = CODECS[fmt]
                values, scales = quantize(tensor)
                _worst(report, fmt, _rel(dequantize(values, scales), tensor.float()))
                put(name, values)
                put(name + "_scale_inv", scales)
                report.experts_quantized += kind == "expert"
                report.matrices_quantized += kind == "matrix"
            else:  # high precision as stored; "bf16" matrices cast down
                report.kept += 1
                put(
                    name,
                    tensor.to(torch.bfloat16) if fmt == "bf16" and tensor.is_floating_point() else tensor,
                )
        flush()
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    index = {"metadata": {"total_size": report.bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((src / "config.json").read_text())
    if "fp8" in (experts, attn):
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
            "activation_scheme": "dynamic",
        }
    else:
        config.pop("quantization_config", None)
    config["ds4_quantization"] = {"experts": experts, "attn": attn}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():  # tokenizer and generation files come along
        if extra.is_file() and not extra.name.startswith("model") and extra.name != "config.json":
            shutil.copy2(extra, dst / extra.name)
    return report


def _worst(report: QuantizeReport, fmt: str, error: float) -> None:
    report.max_rel_error[fmt] = max(report.max_rel_error.get(fmt, 0.0), error)


def _scaled(scale_name: str) -> str:
    if scale_name.endswith("_scale_inv"):
        return scale_name.removesuffix("_scale_inv")
    return scale_name.removesuffix(".scale") + ".weight"
