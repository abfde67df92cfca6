"""Block-scaled FP8 (e4m3) weights as DeepSeek ships them: one float32 `weight_scale_inv` per
[128 x 128] block (edge blocks may be partial). Dequantized at load time for now.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """float32 [out, in] = fp8 weight * its block's scale."""
    out_dim, in_dim = weight.shape
    scale = (
        scale_inv.float().repeat_interleave(block[0], 0)[:out_dim].repeat_interleave(block[1], 1)[:, :in_dim]
    )
    return weight.float() * scale


def quantize_fp8_blocks(weight: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv): each block scaled so its largest magnitude maps to FP8_MAX."""
    out_dim, in_dim = weight.shape
    rows, cols = scale_shape(weight.shape, block)
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, block[0], cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [rows, cols]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rows * block[0], cols * block[1])[:out_dim, :in_dim].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv
