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


KEY_TILE_BYTES = 32 * 1024  # an attention kernel's key tile; with the queries' and the stages', under 99 KiB


def key_rows(width: int, dtype, most: int = 32) -> int:
    """Rows of `width` elements an attention kernel's key tile holds for a model of `dtype`: `most`,
    halved (to 16 at least) while the tile passes 32 KiB at the size a card multiplies the model's
    operands in (bf16: 32 rows of a 512-wide latent; float32: 16). At 32 float32 rows of 512 the MLA
    and sparse attention kernels took 110-129 KiB of shared memory, past an RTX 4090's 99 KiB
    (`ds4-agent bench compile --dtypes float32`). Chosen as a card chooses, also under the interpreter
    (whose products are float32 whatever the model): tests run, and kernels.targets records, the card's
    launch."""
    size = 4 if gpu_dot_args(dtype)["DOT"] == tl.float32 else 2
    rows = most
    while rows > 16 and rows * width * size > KEY_TILE_BYTES:
        rows //= 2
    return rows
