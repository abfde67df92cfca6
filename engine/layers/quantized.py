"""Weights kept in their stored format: FP8 with 128 x 128 block scales, FP4 e2m1 or int4 with a scale per
32 inputs. A 4-bit expert costs an eighth of its float32 bytes at rest, in host RAM and in VRAM alike.

`QuantizedLinear` replaces an `nn.Linear` whose checkpoint tensor is quantized: `weight` holds what the
file holds (FP8 values or two 4-bit codes per byte) and `scale` its scales, as in DeepSeek's reference
code. On a GPU the matmul dequantizes tile by tile in registers (ds4.kernels.quant_linear); elsewhere
it dequantizes the weight for the duration of the call. Code that needs the matrix itself (MLA's
absorbed W_UK / W_UV) asks `dense_weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds4.engine.quant import FP4_GROUP, dequantize, scale_shape
from ds4.kernels import triton_enabled

FP8_BLOCK = (128, 128)  # the kernels' block; other FP8 block sizes are dequantized at load


def stored_shapes(fmt: str, out_dim: int, in_dim: int, block=FP8_BLOCK) -> tuple[tuple, tuple]:
    """(weight shape, scale shape) of an [out_dim, in_dim] matrix stored in `fmt`."""
    if fmt == "fp8":
        return (out_dim, in_dim), scale_shape((out_dim, in_dim), block)
    return (out_dim, in_dim // 2), (out_dim, in_dim // FP4_GROUP)


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, stored, scale_dtype, dtype):
        """`stored`, `scale_dtype`: the checkpoint's dtypes; `dtype`: the model's, to compute in."""
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        weight_shape, scales = stored_shapes(fmt, out_features, in_features)
        self.weight = nn.Parameter(torch.empty(weight_shape, dtype=stored), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(scales, dtype=scale_dtype), requires_grad=False)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.fmt, self.weight, self.scale, FP8_BLOCK, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.scale, self.fmt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x @ W^T for W stored in `fmt`: in the Triton kernel on a GPU, elsewhere dequantized for this call."""
    if triton_enabled(x.device):
        from ds4.kernels.quant_linear import quant_linear

        return quant_linear(x, weight, scale, fmt)
    return F.linear(x, dequantize(fmt, weight, scale, FP8_BLOCK, x.dtype))


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The [out, in] matrix of a linear layer, dequantized when it is stored quantized."""
    return linear.dequantized() if isinstance(linear, QuantizedLinear) else linear.weight


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in (a quantized one: the model's)."""
    return linear.dtype if isinstance(linear, QuantizedLinear) else linear.weight.dtype


def quantize_module(model: nn.Module, name: str, fmt: str, stored, scale_dtype, dtype) -> bool:
    """Replaces the nn.Linear at `name` (a meta-device model's) with a QuantizedLinear; False when
    `name` is not a bias-free nn.Linear (its weight is then dequantized at load)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child, None)
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        return False
    if fmt != "fp8" and linear.in_features % FP4_GROUP:
        return False
    with torch.device("meta"):
        setattr(
            parent,
            child,
            QuantizedLinear(linear.in_features, linear.out_features, fmt, stored, scale_dtype, dtype),
        )
    return True
