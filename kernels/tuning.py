"""Tile shapes for the weight-streaming kernels (the quantized linear and the fused MoE) on a GPU: a few
configurations per kernel, timed once per shape by `triton.autotune` on the card it runs on and kept
in Triton's cache directory, so a later process (and a decode graph's capture, whose warm-up step
tunes first) reuses the choice. Decode shapes stream weights to a few rows: tall, narrow tiles (16
rows, 128 inputs) with several stages in flight; prefill shapes take square ones. `DS4_AUTOTUNE=0`
keeps each kernel's fixed tiles instead (the ones the tests and the interpreter use).

The configurations respect the tile readers' rules (moe.tile_width): BLOCK_K is a multiple of 32 (whole
4-bit groups) that divides 128 (one column of FP8 scale blocks)."""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): decode-shaped first, then one prefill-shaped. Few, since
# each is compiled once per format and shape class on a fresh machine (seconds each).
LINEAR_TILES = [
    (16, 64, 128, 4, 3),
    (16, 128, 128, 8, 3),
    (16, 32, 128, 4, 4),
    (64, 128, 64, 8, 3),
]
# the fused MoE's BLOCK_M is the host's (the pairs are aligned to it): (BLOCK_N, BLOCK_K, warps, stages)
EXPERT_TILES = [
    (64, 128, 4, 3),
    (32, 128, 4, 4),
    (128, 64, 8, 3),
]


def autotuning(device: torch.device) -> bool:
    """Whether launches on `device` pick their tiles by timing them (CUDA, unless DS4_AUTOTUNE=0)."""
    return device.type == "cuda" and os.environ.get("DS4_AUTOTUNE", "1") != "0"


def row_class(rows: int) -> int:
    """The autotuner's key for a row count: its power of two (1, 2, 4, ...), so a decode batch's sizes
    share a handful of timings instead of one each."""
    return triton.next_power_of_2(max(rows, 1))


def tuned(kernel, configs: list[triton.Config], key: list[str]):
    """`kernel` timed over `configs` (as `for_operands` fits them to its DOT) once per value of `key`,
    the results kept on disk where this Triton can (its `cache_results`)."""
    extra = (
        {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    )
    fit = {"early_config_prune": lambda configs, named_args, **kwargs: for_operands(configs, kwargs["DOT"])}
    return triton.autotune(configs=configs, key=key, prune_configs_by=fit, **extra)(kernel)


def for_operands(configs: list[triton.Config], dot) -> list[triton.Config]:
    """`configs` fitted to the kernel's dot operands: the tiles above are sized for 2-byte ones; float32
    ones read half as many inputs a step (BLOCK_K halved, 32 at least), so they take the shared memory
    the bf16 tiles take (at most 72 KiB). At full width they took 113-144 KiB, past an RTX 4090's 99 KiB,
    and every expert tile was past it (`ds4-agent bench compile --dtypes float32`)."""
    if dot != tl.float32:
        return configs
    return [
        triton.Config(
            {**c.kwargs, "BLOCK_K": max(32, c.kwargs["BLOCK_K"] // 2)},
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for c in configs
    ]


def linear_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in LINEAR_TILES
    ]


def expert_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in EXPERT_TILES
    ]
