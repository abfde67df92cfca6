"""Rotary position embedding: default and YaRN frequencies, interleaved-pair and half-split layouts.

Frequencies are computed exactly as the transformers library does (float32, same operation order),
so cos/sin tables agree bit for bit with the oracle.
"""

from __future__ import annotations

import math

import torch

from ds4.engine.config import RopeConfig
from ds4.kernels import triton_enabled


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(rope: RopeConfig, qk_head_dim: int) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 for YaRN (DeepSeek's long-context correction)."""
    scale = qk_head_dim**-0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def inv_freq_and_attention_factor(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor the cos/sin tables are multiplied by."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / dim)
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(
                yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
            )
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations):
        orig = rope.original_max_position_embeddings
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables [T, dim/2] for given positions; the same tables serve both layouts."""

    def __init__(self, rope: RopeConfig, dim: int):
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device and the table is derived.
        self.inv_freq, self.attention_factor = inv_freq_and_attention_factor(rope, dim)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        if positions.dim() == 1 and triton_enabled(positions.device):
            from ds4.kernels.small_ops import rope_table

            return rope_table(positions.contiguous(), self.inv_freq, self.attention_factor, dtype)
        freqs = positions[:, None].float() * self.inv_freq  # [T, R/2]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates x [T, ..., R] by per-token angles (cos/sin [T, R/2]).

    Interleaved: pairs (x0, x1), (x2, x3), ... (DeepSeek's MLA). Half-split: (x_i, x_{i+R/2}) (V3.2's
    indexer). The output is laid out half-split in both cases; queries and keys share the layout, so
    their dot products are those of the original pairing.
    """
    if x.dim() in (2, 3) and x.stride(-1) == 1 and triton_enabled(x.device):
        from ds4.kernels.small_ops import rope

        return rope(x, cos, sin, interleaved)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_tail(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, negate: bool = False
) -> torch.Tensor:
    """DeepSeek-V4's rope: the trailing R dims of x [T, ..., D] rotated as interleaved pairs, kept in place.

    V4 uses the rotated vector as the value too and de-rotates the output (`negate`: by -sin), so the layout
    must stay the checkpoint's own: pair (x_2i, x_2i+1) in positions 2i, 2i+1. Computed in float32. One
    kernel on the Triton path.
    """
    if x.dim() in (2, 3) and x.stride(-1) == 1 and triton_enabled(x.device):
        from ds4.kernels.small_ops import rope_tail

        return rope_tail(x, cos, sin, negate)
    if negate:
        sin = -sin
    rope_dim = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape).float(), sin.view(shape).float()
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:].float()
    x1, x2 = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
