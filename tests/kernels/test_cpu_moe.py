"""The CPU expert kernel (C++, from stored codes) against dequantize-then-matmul: int4 (its AVX-512 paths with
float activations, and with int8 activations where the CPU has AVX-512 VNNI, AVX-VNNI or AVX2), FP4, FP8 and
float experts (fp32, bf16) at odd token, expert and width counts, V4's clamp, skipped pairs, bf16
activations, 1-3 threads, a token's bits alone and in a batch, in every build this CPU can run (native,
without AVX-512, without AVX-512 and AVX-VNNI, generic); a failed build is reported and leaves the torch
path."""

from __future__ import annotations

import warnings

import pytest
import torch

from ds4.engine.quant import quantize_fp4, quantize_fp8_blocks, quantize_int4
from ds4.kernels import cpu_moe

QUANTIZE = {"int4": quantize_int4, "fp4": quantize_fp4, "fp8": quantize_fp8_blocks}
QUANTIZE |= {"fp32": lambda w: (w, None), "bf16": lambda w: (w.bfloat16(), None)}  # float experts: no scales


VARIANTS = list(cpu_moe.VARIANTS)


@pytest.fixture(autouse=True)
def built():
    """The kernel builds wherever ds4 is installed with g++ (CI installs it): a failed build is a finding."""
    for variant in VARIANTS:
        assert cpu_moe.available(variant), f"{variant} kernel did not build: {cpu_moe.build_error(variant)}"


def stack(gen, fmt: str, experts: int, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [QUANTIZE[fmt](torch.randn(out_dim, in_dim, generator=gen) * 0.05) for _ in range(experts)]
    scales = None if pairs[0][1] is None else torch.stack([s for _, s in pairs]).contiguous()
    return torch.stack([w for w, _ in pairs]).contiguous(), scales


def case(gen, fmt, tokens, topk, experts, hidden, inter):
    w13, s13 = stack(gen, fmt, experts, 2 * inter, hidden)
    w2, s2 = stack(gen, fmt, experts, hidden, inter)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    weights = torch.rand(tokens, topk, generator=gen)
    return x, weights, ids, (w13, s13, w2, s2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("variant", ["native", "generic"])
@pytest.mark.parametrize("fmt", ["int4", "fp4", "fp8", "fp32", "bf16"])
@pytest.mark.parametrize(
    "tokens, topk, experts, hidden, inter",
    # widths of whole 128-input blocks take int4's octet path; (5, ..., 128, 96) mixes both paths
    [(1, 2, 5, 96, 160), (3, 3, 7, 64, 32), (17, 4, 9, 160, 96), (2, 3, 5, 256, 128), (5, 2, 4, 128, 96)],
)
def test_kernel_equals_dequantize_then_matmul(gen, fmt, tokens, topk, experts, hidden, inter, variant):
    x, weights, ids, stacks = case(gen, fmt, tokens, topk, experts, hidden, inter)
    for limit in (None, 0.5):  # V4 clamps the SwiGLU inputs; 0.5 clamps many of these
        want = cpu_moe.reference_moe(x, weights, ids, *stacks, fmt, limit)
        for threads in (1, 2, 3):
            got = cpu_moe.moe(x, weights, ids, *stacks, fmt, limit, threads, variant, int8=False)
            assert relative_error(got, want) < 2e-6, (fmt, limit, threads)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["int4", "fp4", "fp8"])
@pytest.mark.parametrize(
    "tokens, topk, experts, hidden, inter",
    # 4-group chunks and trailing groups: 96 = 3 groups, 160 = 4 + 1, 544 = 16 + 1
    [(1, 2, 5, 96, 160), (3, 3, 7, 64, 32), (17, 4, 9, 160, 96), (2, 4, 6, 544, 256), (5, 2, 4, 128, 96)],
)
def test_int8_activations_equal_their_reference(gen, fmt, tokens, topk, experts, hidden, inter, variant):
    """Where the kernel quantizes activations (int4 with AVX2 or AVX-512 VNNI), it computes
    reference_moe(int8=True) and stays within 3% (of the largest output) of float activations; elsewhere
    its default is float. A SwiGLU output that the kernel and torch compute an ulp apart can round to
    neighbouring int8 codes where it sits on a tie (about 3% of these cases, one token's row): such a row
    is then off by one code step (under 2% of the largest output), the others exact."""
    x, weights, ids, stacks = case(gen, fmt, tokens, topk, experts, hidden, inter)
    exact = cpu_moe.reference_moe(x, weights, ids, *stacks, fmt, None)
    if not cpu_moe.takes_int8(fmt, variant):
        assert relative_error(cpu_moe.moe(x, weights, ids, *stacks, fmt, None, variant=variant), exact) < 2e-6
        return
    for limit in (None, 0.5):
        want = cpu_moe.reference_moe(x, weights, ids, *stacks, fmt, limit, int8=True)
        for threads in (1, 2, 3):
            got = cpu_moe.moe(x, weights, ids, *stacks, fmt, limit, threads, variant, int8=True)
            rows = (got - want).abs().amax(-1) / want.abs().max()  # each token's error
            assert int((rows >= 2e-6).sum()) <= max(1, tokens // 8) and rows.max() < 2e-2, (limit, threads)
    got = cpu_moe.moe(x, weights, ids, *stacks, fmt, None, variant=variant)  # the default
    assert 1e-4 < relative_error(got, exact) < 3e-2


def test_each_build_runs_the_path_its_flags_allow():
    """Where the CPU has AVX-512 VNNI, native is that; without AVX-512, the AVX-VNNI or AVX2 int8 path."""
    import re

    flags = set(re.findall(r"\S+", open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]))
    native = "avx512-vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags else None
    if native:
        assert cpu_moe.isa("native") == native
    if "avx2" in flags and "fma" in flags:
        assert cpu_moe.isa("avx2") == "avx2" and cpu_moe.takes_int8("int4", "avx2")
        assert cpu_moe.isa("avx-vnni") == ("avx-vnni" if "avx_vnni" in flags else "avx2")
    assert cpu_moe.isa("generic") == "generic" and not cpu_moe.takes_int8("int4", "generic")


def test_skipped_pairs_and_bf16_activations(gen):
    x, weights, ids, stacks = case(gen, "int4", 6, 3, 8, 64, 64)
    ids[1, 0] = ids[4, 2] = -1  # computed elsewhere (hot experts on the device)
    int8 = cpu_moe.takes_int8("int4")
    got = cpu_moe.moe(x, weights, ids, *stacks, "int4", None)
    assert relative_error(got, cpu_moe.reference_moe(x, weights, ids, *stacks, "int4", None, int8)) < 2e-6
    xb = x.bfloat16()
    got = cpu_moe.moe(xb, weights, ids, *stacks, "int4", None)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, cpu_moe.reference_moe(xb, weights, ids, *stacks, "int4", None, int8)) < 1e-2


def test_thread_counts_give_identical_bits(gen):
    for fmt in ("fp4", "int4", "fp32"):
        x, weights, ids, stacks = case(gen, fmt, 5, 4, 6, 128, 96)
        runs = [cpu_moe.moe(x, weights, ids, *stacks, fmt, None, threads=n) for n in (1, 2, 3)]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("fmt", ["int4", "fp32", "bf16"])
def test_a_tokens_result_does_not_depend_on_its_batch(gen, fmt):
    """Each token's sums run in one order whatever shares the call: a sequence decodes the same bits alone
    or in a batch (the engine's greedy tokens do not depend on what else is scheduled)."""
    x, weights, ids, stacks = case(gen, fmt, 11, 3, 6, 128, 96)
    batch = cpu_moe.moe(x, weights, ids, *stacks, fmt, None)
    for t in (0, 5, 10):
        alone = cpu_moe.moe(x[t : t + 1], weights[t : t + 1], ids[t : t + 1], *stacks, fmt, None)
        assert torch.equal(alone[0], batch[t]), t


@pytest.mark.parametrize("variant", ["native", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_products_equal_torchs(gen, dtype, variant):
    """The dense layers' decode products: x [T, in] @ W.T for 1-9 rows and output widths that are not
    whole blocks of 16 rows, in 1-3 threads, the same bits whatever the thread count."""
    for rows, n_in, n_out in [(1, 64, 77), (3, 96, 16), (4, 160, 130), (9, 32, 5)]:
        weight = (torch.randn(n_out, n_in, generator=gen) * 0.1).to(dtype)
        x = torch.randn(rows, n_in, generator=gen)
        want = x @ weight.float().T
        runs = [cpu_moe.linear(x, weight, threads, variant) for threads in (1, 2, 3)]
        assert relative_error(runs[0], want) < 2e-6, (rows, n_in, n_out)
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
        assert cpu_moe.linear(x.bfloat16(), weight, variant=variant).dtype == torch.bfloat16


def test_a_failed_build_is_reported_and_leaves_the_torch_path(monkeypatch):
    from ds4.engine.config import ModelConfig
    from ds4.engine.layers.moe import Experts
    from ds4.engine.presets import init_preset

    monkeypatch.setattr(cpu_moe, "_libs", {})
    monkeypatch.setattr(cpu_moe.shutil, "which", lambda name: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_moe.available()
    assert any("could not be built" in str(w.message) for w in caught)
    experts = Experts(ModelConfig.from_hf(init_preset("deepseek_v3", "tiny")))
    experts.keep_quantized("int4", torch.uint8, torch.bfloat16)
    experts.to_empty(device="cpu")
    assert not experts.cpu_kernel()  # the engine keeps dequantizing per call
