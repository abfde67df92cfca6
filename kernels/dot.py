"""How every kernel multiplies tiles: `dot(a, b, DOT, PRECISION)` with the operand dtype and the
float32 precision chosen once per launch from the model's dtype (`dot_args`)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in float32, the operands fed to the tensor cores as DOT."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PRECISION)


def dot_args(dtype) -> dict:
    """How a kernel feeds `tl.dot` for a model of `dtype` (its DOT and PRECISION constexprs). float32
    models get IEEE float32 products: a GPU's default TF32 keeps 10 mantissa bits and leaves the fp32
    engine ~0.2 relative error from its oracle; `DS4_TF32=1` opts in to TF32 for speed. bf16/fp16 models
    feed their own dtype to the tensor cores and accumulate in float32. Triton's interpreter computes
    bf16 products wrongly (raw bits), so under it every dot runs in float32."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return gpu_dot_args(torch.float32)
    return gpu_dot_args(dtype)


def gpu_dot_args(dtype) -> dict:
    """dot_args as a GPU compiles them, also where the interpreter runs (kernels.targets)."""
    precision = "tf32" if os.environ.get("DS4_TF32") == "1" else "ieee"
    if dtype not in (torch.bfloat16, torch.float16):
        return {"DOT": tl.float32, "PRECISION": precision}
    return {"DOT": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PRECISION": precision}
