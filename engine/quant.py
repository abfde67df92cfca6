"""Quantized weight formats: block-scaled FP8 (e4m3) as DeepSeek ships it, one float32
`weight_scale_inv` per [128 x 128] block (edge blocks may be partial); FP4 e2m1 with an e8m0 scale per
32 inputs (V4's experts); symmetric int4 with a bf16 scale per 32 inputs (ds4's own `model quantize`).
The engine keeps weights in these formats and dequantizes inside the matmul (ds4.engine.layers.quantized);
the functions here are the reference dequantization.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """float32 [out, in] = fp8 weight * its block's scale."""
    out_dim, in_dim = weight.shape
    if out_dim % block[0] == 0 and in_dim % block[1] == 0:  # whole blocks: one broadcast multiply
        blocks = weight.float().view(out_dim // block[0], block[0], in_dim // block[1], block[1])
        return (blocks * scale_inv.float()[:, None, :, None]).view(out_dim, in_dim)
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


# FP4 e2m1 codes 0..15 (sign bit 3): the values DeepSeek-V4's routed experts are stored in.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32  # one e8m0 (power-of-two) scale per 32 inputs of a row


def dequantize_fp4(
    packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP, dtype=torch.float32
) -> torch.Tensor:
    """[..., in] in `dtype` from two e2m1 codes per byte [..., in/2] (even element in the low nibble) and
    one scale per `group` inputs [..., in/group] (float8_e8m0fnu or float32), through a byte table."""
    table = _byte_table(E2M1_VALUES, packed.device, dtype)
    values = table.index_select(0, packed.view(torch.uint8).reshape(-1).long())  # [bytes, 2]
    grouped = values.view(*packed.shape[:-1], -1, group)  # [..., in/group, group]
    return (grouped * scale.to(dtype)[..., None]).flatten(-2)


def quantize_fp4(weight: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 [out, in/2], float8_e8m0fnu scales [out, in/group]): each group's scale is the power
    of two that brings its largest magnitude to at most 6, values rounded to the nearest e2m1 code."""
    out_dim, in_dim = weight.shape
    assert in_dim % group == 0 and in_dim % 2 == 0, f"in_dim {in_dim} must be a multiple of {group}"
    w = weight.float().view(out_dim, in_dim // group, group)
    amax = w.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))  # [out, in/group, 1]
    table = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)
    magnitude = (w / scale).abs().clamp(max=6.0)
    codes = (magnitude[..., None] - table).abs().argmin(dim=-1)  # nearest code (ties to the smaller)
    codes = (codes + 8 * (w < 0)).view(out_dim, in_dim).to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, scale.squeeze(-1).to(torch.float8_e8m0fnu)


def quantize_int4(weight: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in/2], bf16 scales [out, in/group]): symmetric int4, each group scaled so its
    largest magnitude maps to 7, stored as code + 8 (0..15), the even input in the low nibble."""
    out_dim, in_dim = weight.shape
    assert in_dim % group == 0 and in_dim % 2 == 0, f"in_dim {in_dim} must be a multiple of {group}"
    w = weight.float().view(out_dim, in_dim // group, group)
    scale = (w.abs().amax(dim=-1, keepdim=True) / 7.0).clamp(min=1e-12).to(torch.bfloat16).float()
    codes = ((w / scale).round().clamp(-8, 7) + 8).to(torch.uint8).view(out_dim, in_dim)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scale.squeeze(-1).to(torch.bfloat16)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP, dtype=torch.float32
) -> torch.Tensor:
    """[..., in] in `dtype` from quantize_int4's packed codes [..., in/2] and per-group scales.

    Arithmetic, in place: the nibbles are written straight into the output's even and odd inputs, then
    each group is shifted by 8 and scaled (about 3x faster on a CPU than a table lookup, which matters
    when experts are dequantized for each call)."""
    codes = packed.view(torch.uint8)
    out = torch.empty(*codes.shape, 2, dtype=dtype, device=codes.device)
    out[..., 0], out[..., 1] = codes & 0xF, codes >> 4
    grouped = out.view(*codes.shape[:-1], -1, group)
    grouped.sub_(8.0).mul_(scale.to(dtype)[..., None])
    return out.view(*codes.shape[:-1], -1)


_TABLES: dict[tuple, torch.Tensor] = {}


def _byte_table(values: tuple[float, ...], device, dtype=torch.float32) -> torch.Tensor:
    """[256, 2]: the two values a byte of packed codes holds (low nibble first)."""
    key = (values, str(device), dtype)
    if key not in _TABLES:
        nibbles = torch.tensor(values, dtype=torch.float32)
        byte = torch.arange(256)
        table = torch.stack([nibbles[byte & 0xF], nibbles[byte >> 4]], dim=-1)
        _TABLES[key] = table.to(device=device, dtype=dtype)
    return _TABLES[key]


def dequantize(
    fmt: str, weight: torch.Tensor, scale: torch.Tensor, block=(128, 128), dtype=torch.float32
) -> torch.Tensor:
    """[out, in] in `dtype` from a weight stored in `fmt` ("fp8", "fp4" or "int4") and its scales.

    4-bit values are produced directly in bfloat16, half the bytes written: a code (at most 4
    significant bits) times a bf16 or power-of-two scale is exact in float32 and rounds once to bf16
    either way, with float32's exponent range. Other dtypes (and FP8, whose scales are float32) go
    through float32."""
    if fmt == "fp8":
        return dequantize_fp8_blocks(weight, scale, block).to(dtype)
    direct = dtype if dtype == torch.bfloat16 else torch.float32
    unpack = dequantize_int4 if fmt == "int4" else dequantize_fp4
    return unpack(weight, scale, FP4_GROUP, direct).to(dtype)


# format -> (quantize, dequantize), each the pair's inverse up to rounding; `model quantize` and the tests
# and benchmarks that round-trip weights pick by name here.
CODECS = {
    "fp8": (quantize_fp8_blocks, dequantize_fp8_blocks),
    "fp4": (quantize_fp4, dequantize_fp4),
    "int4": (quantize_int4, dequantize_int4),
}
