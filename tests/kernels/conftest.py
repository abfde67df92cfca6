"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter (a GPU runs them for
real): TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, i.e. before the kernel
modules are imported, which the root conftest does. Inputs are fresh random tensors each run; the
seed is in every failure message."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.fixture()
def gen():
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.fixture()
def cpu_operators():
    """ds4's CPU kernels as torch operators (ds4.kernels.cpu_ops): built wherever the CPU kernel is (CI
    installs g++); without a compiler neither exists, and the tests that need them skip."""
    from ds4.kernels import cpu_moe, cpu_ops

    if not cpu_moe.available():
        pytest.skip(f"the CPU kernel is not built here: {cpu_moe.build_error()}")
    assert cpu_ops.load() is None  # a machine that builds the kernel builds the operators
