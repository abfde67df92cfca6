"""Triton kernels for the engine's hot path, each beside its torch reference (`reference.py`).

One switch decides which path the engine runs: Triton on CUDA devices, torch elsewhere.
`DS4_KERNELS=triton|torch` overrides it for a process; `forced(True)` does so for a block of code
(tests run the Triton path on the CPU through Triton's interpreter, TRITON_INTERPRET=1).

Routed experts on the CPU (quantized, or float32 / bfloat16) run ds4's C++ kernel (cpu_moe) where it builds;
`DS4_CPU_KERNELS=torch` (or `cpu_kernels(False)` for a block) keeps the torch path. There, int4 experts take
their activations quantized to int8 per group of 32 where the CPU has VNNI (faster: docs/perf.md,
issue 21; about 1% off the float result); `DS4_CPU_ACTIVATIONS=float` (or `cpu_activations("float")`)
keeps them in float32."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

_forced: bool | None = None


def triton_enabled(device) -> bool:
    if _forced is not None:
        return _forced
    choice = os.environ.get("DS4_KERNELS", "").lower()
    if choice in ("torch", "triton"):
        return choice == "triton"
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return kind == "cuda" and importlib.util.find_spec("triton") is not None


@contextmanager
def forced(on: bool):
    """Within the block, the engine takes the Triton path (on) or the torch path (off) everywhere."""
    global _forced
    before, _forced = _forced, on
    try:
        yield
    finally:
        _forced = before


_cpu_forced: bool | None = None


def cpu_kernels_enabled() -> bool:
    """Whether routed experts on the CPU take the C++ kernel (when it builds) or torch."""
    if _cpu_forced is not None:
        return _cpu_forced
    return os.environ.get("DS4_CPU_KERNELS", "").lower() != "torch"


@contextmanager
def cpu_kernels(on: bool):
    """Within the block, CPU experts take the C++ kernel (on) or the torch path (off)."""
    global _cpu_forced
    before, _cpu_forced = _cpu_forced, on
    try:
        yield
    finally:
        _cpu_forced = before


_cpu_activations: str | None = None


def cpu_activations_int8() -> bool:
    """Whether the CPU kernel quantizes the activations of int4 experts to int8 (where the CPU can)."""
    choice = _cpu_activations or os.environ.get("DS4_CPU_ACTIVATIONS", "int8").lower()
    if choice not in ("int8", "float"):
        raise ValueError(f"DS4_CPU_ACTIVATIONS={choice!r}: set it to int8 or float")
    return choice == "int8"


@contextmanager
def cpu_activations(kind: str):
    """Within the block, the CPU kernel takes int4 experts' activations as `kind`: "int8" or "float"."""
    global _cpu_activations
    assert kind in ("int8", "float"), kind
    before, _cpu_activations = _cpu_activations, kind
    try:
        yield
    finally:
        _cpu_activations = before
