"""Every kernel's tl.dot runs at its model's precision: IEEE float32 for fp32 models (a GPU's default
TF32 leaves the fp32 engine ~0.2 relative error from its oracle), the model's own dtype for bf16/fp16.
The launches are recorded, not run: what each wrapper asks the compiler for is the point."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl

import ds4.kernels.indexer as indexer
import ds4.kernels.mla_decode as mla_decode
import ds4.kernels.moe as moe
import ds4.kernels.quant_linear as quant_linear
import ds4.kernels.sparse_attention as sparse_attention
from ds4.kernels.dot import dot_args


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **constexprs)` records the constexprs."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


def launches(monkeypatch, dtype) -> list[dict]:
    """The constexprs of each kernel launch of one small call of every wrapper, inputs in `dtype`."""
    recorders = {}
    for module, name in (
        (mla_decode, "_mla_decode_kernel"),
        (sparse_attention, "_sparse_attention_kernel"),
        (indexer, "_indexer_kernel"),
        (moe, "_expert_gemm_kernel"),
        (quant_linear, "_quant_linear_kernel"),
    ):
        recorders[name] = Recorder()
        monkeypatch.setattr(module, name, recorders[name])
    mla_decode.paged_mla_decode(
        torch.zeros(2, 4, 32, dtype=dtype),
        torch.zeros(2, 4, 16, dtype=dtype),
        torch.zeros(8, 48, dtype=dtype),
        torch.zeros(2, 1, dtype=torch.int32),
        torch.ones(2, dtype=torch.int32),
        8,
        1.0,
    )
    sparse_attention.sparse_attention(
        torch.zeros(2, 4, 48, dtype=dtype), torch.zeros(8, 48, dtype=dtype), torch.zeros(2, 3), 1.0, 32
    )
    indexer.indexer_scores(
        torch.zeros(2, 4, 16, dtype=dtype), torch.zeros(2, 4), torch.zeros(5, 16, dtype=dtype), torch.zeros(2)
    )
    x = torch.zeros(3, 32, dtype=dtype)
    moe.fused_moe(
        x,
        torch.zeros(4, 16, 32, dtype=dtype),
        torch.zeros(4, 32, 8, dtype=dtype),
        torch.ones(3, 2),
        torch.tensor([[0, 1], [1, 2], [3, 0]]),
    )
    quant_linear.quant_linear(
        x, torch.zeros(128, 32, dtype=torch.float8_e4m3fn), torch.ones(1, 1), "fp8", block_k=32
    )
    counts = {name: len(r.launches) for name, r in recorders.items()}
    assert counts == {name: 2 if name == "_expert_gemm_kernel" else 1 for name in recorders}, (
        counts
    )  # MoE: gate/up, down
    return [kwargs for r in recorders.values() for kwargs in r.launches]


def test_float32_kernels_ask_for_ieee_products(monkeypatch):
    monkeypatch.delenv("DS4_TF32", raising=False)
    for kwargs in launches(monkeypatch, torch.float32):
        assert (kwargs["DOT"], kwargs["PRECISION"]) == (tl.float32, "ieee")


@pytest.mark.parametrize("dtype, dot", [(torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)])
def test_half_precision_kernels_feed_their_own_dtype_on_a_gpu(monkeypatch, dtype, dot):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what a GPU compiles; the launches are only recorded
    for kwargs in launches(monkeypatch, dtype):
        assert kwargs["DOT"] == dot


def test_tf32_is_an_explicit_opt_in_and_the_interpreter_runs_float32(monkeypatch):
    monkeypatch.setenv("DS4_TF32", "1")
    assert dot_args(torch.float32)["PRECISION"] == "tf32"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dot_args(torch.bfloat16) == {"DOT": tl.float32, "PRECISION": "tf32"}  # bf16 is wrong there
