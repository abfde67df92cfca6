"""The C++ operator `ds4_cpu::linear` (kernels/cpu_ops.cpp): built here against torch's headers, the same bits
as the ctypes kernel it wraps, torch's GEMM past the kernel's rows, what the loader's layers call, and the
Python custom op where it is turned off or cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ds4.engine.layers import linear as linear_layer
from ds4.kernels import cpu_moe, cpu_ops


@pytest.fixture(autouse=True)
def built():
    if not cpu_moe.available():
        pytest.skip(f"the CPU kernel is not built here: {cpu_moe.build_error()}")
    assert cpu_ops.load() is None  # a machine that builds the kernel builds the operator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_operator_gives_the_kernels_bits(dtype):
    gen = torch.Generator().manual_seed(0)
    for rows, n_in, n_out in [(1, 64, 77), (3, 96, 16), (4, 160, 130), (32, 512, 256)]:
        weight = (torch.randn(n_out, n_in, generator=gen) * 0.1).to(dtype)
        x = torch.randn(rows, n_in, generator=gen).to(dtype)
        got = torch.ops.ds4_cpu.linear(x, weight)
        assert got.dtype == dtype and torch.equal(got, cpu_moe.linear(x, weight)), (rows, n_in, n_out)
    x = torch.randn(2, 3, 64, generator=gen).to(dtype)  # leading dimensions are kept
    weight = torch.randn(40, 64, generator=gen).to(dtype)
    assert torch.equal(
        torch.ops.ds4_cpu.linear(x, weight), cpu_moe.linear(x.view(6, 64), weight).view(2, 3, 40)
    )
    x = torch.randn(33, 64, generator=gen).to(dtype)  # past KERNEL_ROWS: torch's GEMM, as the Python op
    assert torch.equal(torch.ops.ds4_cpu.linear(x, weight), F.linear(x, weight))


def test_a_bad_weight_is_a_clear_error():
    with pytest.raises(RuntimeError, match="fp32 or bf16 weight"):
        torch.ops.ds4_cpu.linear(torch.randn(1, 64), torch.randn(8, 64).half())
    with pytest.raises(RuntimeError, match="against the weight's 64"):
        torch.ops.ds4_cpu.linear(torch.randn(1, 32), torch.randn(8, 64))


def test_the_loaders_layers_call_the_operator_and_the_python_op_gives_the_same(monkeypatch):
    from ds4.engine.config import ModelConfig
    from ds4.engine.presets import init_preset

    config = ModelConfig.from_hf(init_preset("deepseek_v3", "tiny"))
    layer = linear_layer.Linear(config.hidden_size, 96, bias=False)
    layer.weight.data = torch.randn(96, config.hidden_size)
    layer.use_cpu_kernel = True
    linear_layer.prepare_cpu_kernel()
    assert linear_layer._CPU_OP is torch.ops.ds4_cpu.linear
    x = torch.randn(5, config.hidden_size)
    calls = []
    monkeypatch.setattr(cpu_moe, "linear", lambda *a, **k: calls.append(a) or F.linear(*a[:2]))
    got = layer(x)
    assert not calls  # the operator holds its own copy of the kernel: no ctypes call
    monkeypatch.undo()
    monkeypatch.setattr(linear_layer, "_CPU_OP", None)  # where the operator is not built
    assert torch.equal(layer(x), got)
    assert torch.equal(torch.compile(layer, backend="eager")(x), got)  # the custom op, as a compiled step


def test_turned_off_or_unbuildable_it_says_why(monkeypatch):
    monkeypatch.setenv("DS4_CPU_OPS", "python")
    assert cpu_ops.load() == "turned off by DS4_CPU_OPS=python"
    monkeypatch.delenv("DS4_CPU_OPS")
    monkeypatch.setattr(cpu_ops, "_state", {})
    monkeypatch.setattr(cpu_moe.shutil, "which", lambda name: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = cpu_ops.load()
    assert error and "g++" in error and any("could not be built" in str(w.message) for w in caught)
