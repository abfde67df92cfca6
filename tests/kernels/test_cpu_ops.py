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

pytestmark = pytest.mark.usefixtures("cpu_operators")


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


@pytest.mark.parametrize("fmt", ["int4", "fp4", "fp8", "fp32", "bf16"])
def test_the_expert_operator_gives_the_kernels_bits(fmt):
    from tests.kernels.test_cpu_moe import case

    gen = torch.Generator().manual_seed(3)
    for tokens, topk, experts, hidden, inter, limit in [(1, 4, 8, 256, 128, None), (7, 3, 5, 128, 96, 0.5)]:
        x, weights, ids, (w13, s13, w2, s2) = case(gen, fmt, tokens, topk, experts, hidden, inter)
        ids[0, 0] = -1  # a pair computed elsewhere (a hot expert)
        for int8 in {False, cpu_moe.takes_int8(fmt)}:
            want = cpu_moe.moe(x, weights, ids, w13, s13, w2, s2, fmt, limit, int8=int8)
            code = cpu_moe.FORMATS[fmt]
            got = torch.ops.ds4_cpu.moe(x, weights, ids, w13, s13, w2, s2, code, int8, limit)
            assert torch.equal(got, want), (fmt, tokens, int8)
    with pytest.raises(RuntimeError, match="expert id 9 outside the stack's 5"):
        torch.ops.ds4_cpu.moe(x, weights, torch.full_like(ids, 9), w13, s13, w2, s2, code, False, None)


@pytest.mark.slow  # compiles a step
def test_a_compiled_step_calls_the_expert_operator(tiny_v3):
    """A plain expert stack in the kernel: the compiled decode step calls ds4_cpu::moe, not the Python op
    that calls back into the stack (whose tokens it gives: tests/engine/test_compiled.py)."""
    from ds4.engine import LLM, SamplingParams
    from ds4.engine.layers.moe import Experts

    llm = LLM(tiny_v3, dtype="float32", max_num_seqs=2, compile_decode=True)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([list(range(3, 20))], params)
    counts = {e.key: e.count for e in prof.key_averages()}
    stacks = [m for m in llm.runner.model.modules() if isinstance(m, Experts)]
    assert stacks and all(m.kernel_op is not None for m in stacks)
    assert counts.get("ds4_cpu::moe", 0) >= 3 * len(stacks)  # every decode step, every MoE layer
    assert "ds4::routed_experts" not in counts
