"""Every kernel compiled for an RTX 4090 (sm_89) and an H100 / H200 (sm_90) on this machine, which has
neither (ds4.kernels.targets): launches recorded under Triton's interpreter, then built by Triton's CUDA
backend and ptxas. The interpreter runs Python where a card runs compiled code, so a kernel can pass
every test here and still fail to build, or ask for more shared memory than a card has."""

from __future__ import annotations

import importlib
import os
import pkgutil

import pytest
import torch
import triton.language as tl

import ds4.kernels
from ds4.engine.bench.compile import engine_launches, format_report, preset_launches
from ds4.kernels import tuning
from ds4.kernels.dot import key_rows
from ds4.kernels.moe import _expert_gemm_tuned
from ds4.kernels.quant_linear import _quant_linear_tuned
from ds4.kernels.targets import CARDS, compile_launches, recording, variants
from tests.kernels.unbuildable import early_exit_kernel, wide_tiles_kernel

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="a card compiles its own kernels (tests/kernels on CUDA)",
)


def _all_kernels() -> set[str]:
    """The kernels ds4.kernels launches: its modules' Triton functions named *_kernel."""
    names = set()
    for info in pkgutil.iter_modules(ds4.kernels.__path__):
        module = importlib.import_module(f"ds4.kernels.{info.name}")
        names |= {n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    return names


def test_the_checker_fails_what_a_card_refuses():
    with recording(execute=True) as rec:
        with rec.workload("early exit", torch.float32):
            x, out = torch.tensor([1.0, 2, 3, 4, -20, 5, 6, 7]), torch.empty(1)
            early_exit_kernel[(1,)](x, out, 8, BLOCK=2)
            assert out.item() == 10.0  # the interpreter ran it
        with rec.workload("wide tiles", torch.bfloat16):
            a, b = torch.zeros(128, 256, dtype=torch.bfloat16), torch.zeros(256, 128, dtype=torch.bfloat16)
            wide_tiles_kernel[(1,)](a, b, torch.empty(128, 128), 256, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)
    builds = {(b.card, b.kernel): b for b in compile_launches(list(rec.launches.values()), list(CARDS))}
    for card in CARDS:
        failed = builds[card, "early_exit_kernel"]
        assert not failed.fits() and "unsupported AST node type: Break" in failed.error
    wide_4090, wide_h100 = builds["sm89", "wide_tiles_kernel"], builds["sm90", "wide_tiles_kernel"]
    assert wide_4090.error is None and wide_4090.shared > CARDS["sm89"].shared and not wide_4090.fits()
    assert CARDS["sm89"].shared < wide_h100.shared <= CARDS["sm90"].shared and wide_h100.fits()
    report = format_report(list(builds.values()))
    assert (
        "FAILED early_exit_kernel [early exit]" in report
        and "OVER   wide_tiles_kernel [wide tiles]" in report
    )


def test_the_checker_fails_a_grid_past_cudas_limits():
    """65,535 programs at most on a grid's second and third axes; the launch is only recorded."""
    with recording(execute=False) as rec, rec.workload("tall grid", torch.bfloat16):
        a, b = torch.zeros(32, 64, dtype=torch.bfloat16), torch.zeros(64, 32, dtype=torch.bfloat16)
        for rows in (70_000, 3):  # one build: the largest grid is kept
            wide_tiles_kernel[(1, rows)](a, b, torch.empty(32, 32), 64, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    (build,) = compile_launches(list(rec.launches.values()), ["sm89"])
    assert build.error is None and build.shared <= CARDS["sm89"].shared and build.grid == [1, 70_000]
    assert not build.grid_fits() and not build.fits()
    assert "GRID   wide_tiles_kernel [tall grid]: [1, 70000] programs" in format_report([build])


def test_a_launch_is_recorded_as_a_card_compiles_it():
    """A bf16 model's dots take bf16 on a card (the interpreter multiplies in float32), the autotuned
    kernels' configurations are each a build, and a stride of 1 is a constant, as Triton specialises."""
    with recording(execute=False) as rec:
        preset_launches(rec, "deepseek-v4-flash", torch.bfloat16)
    launches = list(rec.launches.values())
    dots = {str(launch.constexpr("DOT")) for launch in launches if "DOT" in launch.signature}
    assert dots == {"{'dtype': 'bf16'}"}
    gemm = next(launch for launch in launches if launch.kernel == "_expert_gemm_kernel")
    assert gemm.signature["stride_wk"] == "constexpr" and gemm.constexpr("stride_wk") == 1
    tiles = {
        (v.constexpr("BLOCK_N"), v.constexpr("BLOCK_K"), dict(v.options).get("num_warps"))
        for v in variants(gemm)
    }
    assert tiles == {(32, 32, None), (64, 128, 4), (32, 128, 4), (128, 64, 8)}


def test_tiles_follow_the_operands_a_card_multiplies():
    """At a real latent width (512), float32 operands take 16 key rows a step in the attention kernels and
    half the inputs a step in the tuned GEMMs' tiles; bf16 ones keep 32 rows (16 query rows in MLA prefill
    over FP8 rows, whose dequantized tile sits beside the sums). Recorded as a card launches them: under
    the interpreter a bf16 model's prefill still gets the card's 32 query rows."""
    tiles = {}
    for dtype in (torch.bfloat16, torch.float32):
        with recording(execute=False) as rec:
            preset_launches(rec, "deepseek-v3.2", dtype)
        for launch in rec.launches.values():
            if launch.kernel in ("_mla_decode_kernel", "_mla_prefill_kernel", "_sparse_attention_kernel"):
                rows = "BLOCK_M" if launch.kernel == "_mla_prefill_kernel" else "BLOCK_H"
                fp8 = launch.constexpr("FP8") if "FP8" in launch.signature else False
                key = (launch.kernel, str(dtype).split(".")[-1], fp8)
                tiles[key] = (launch.constexpr(rows), launch.constexpr("BLOCK_N"), dict(launch.options))
            if launch.kernel == "_expert_gemm_kernel" and dtype == torch.float32:
                widths = {(v.constexpr("BLOCK_N"), v.constexpr("BLOCK_K")) for v in variants(launch)[1:]}
                assert widths == {(64, 64), (32, 64), (128, 32)}
    assert tiles == {
        ("_mla_decode_kernel", "bfloat16", False): (16, 32, {}),
        ("_mla_decode_kernel", "bfloat16", True): (16, 32, {}),
        ("_mla_prefill_kernel", "bfloat16", False): (32, 32, {"num_warps": 8}),
        ("_mla_prefill_kernel", "bfloat16", True): (16, 32, {"num_warps": 8}),
        ("_sparse_attention_kernel", "bfloat16", False): (16, 32, {}),
        ("_mla_decode_kernel", "float32", False): (16, 16, {}),
        ("_mla_decode_kernel", "float32", True): (16, 16, {}),
        ("_mla_prefill_kernel", "float32", False): (16, 16, {"num_warps": 8}),
        ("_mla_prefill_kernel", "float32", True): (16, 16, {"num_warps": 8}),
        ("_sparse_attention_kernel", "float32", False): (16, 16, {}),
    }
    assert key_rows(64, torch.float32) == 32  # a tiny model's rows fit whole tiles in any dtype
    for tuned in (_expert_gemm_tuned, _quant_linear_tuned):  # what a card's autotuner times
        for dot in (tl.float32, tl.bfloat16):
            timed = tuned.early_config_prune(tuned.configs, {}, DOT=dot)
            assert timed == tuning.for_operands(tuned.configs, dot) and len(timed) == len(tuned.configs)


@pytest.mark.slow
def test_every_kernel_at_the_real_models_sizes_builds_for_the_4090():
    """bf16 at V3.2's and V4-Flash's sizes (V3's launches are V3.2's less the indexer's), decode batches
    of 1 and 32 and a 2,048-token prefill, every autotuned configuration, for the card with the least
    shared memory: all build, all fit. (`ds4-agent bench compile` does the same for the H100 / H200.)"""
    with recording(execute=False) as rec:
        for preset in ("deepseek-v3.2", "deepseek-v4-flash"):
            preset_launches(rec, preset, torch.bfloat16)
    with recording(execute=False) as fp32:  # float32 where tiles depend on it: 110-144 KiB before
        preset_launches(fp32, "deepseek-v3.2", torch.float32)
    attention = ("_mla_decode_kernel", "_mla_prefill_kernel", "_sparse_attention_kernel")
    wide = [
        x
        for x in fp32.launches.values()
        if x.kernel in attention or (x.kernel == "_expert_gemm_kernel" and x.constexpr("QUANT") == 0)
    ]
    builds = compile_launches(list(rec.launches.values()) + wide, ["sm89"])
    assert all(b.fits() for b in builds), format_report(builds)
    mla = [b for b in builds if b.kernel == "_mla_decode_kernel"]
    assert {b.constexprs["BLOCK_C"] for b in mla} == {512}  # the real latent width was built
    assert len(builds) > 150


@pytest.mark.slow
def test_every_launch_of_the_engine_builds_for_the_h100(tmp_path):
    """The engine on the Triton path (V3.2 and V4; prefill, a prefix hit, batched decode) and the presets'
    workloads launch every kernel ds4.kernels has; each of the engine's launches builds for Hopper."""
    with recording(execute=True) as engine:
        for family in ("deepseek_v32", "deepseek_v4"):
            engine_launches(engine, family, torch.bfloat16, str(tmp_path / family))
    with recording(execute=False) as sized:
        for preset in ("deepseek-v3.2", "deepseek-v4-flash"):
            preset_launches(sized, preset, torch.bfloat16)
    launched = {launch.kernel for rec in (engine, sized) for launch in rec.launches.values()}
    assert launched == _all_kernels()
    assert "_compressor_decode_kernel" in {launch.kernel for launch in engine.launches.values()}
    builds = compile_launches(list(engine.launches.values()), ["sm90"])
    assert all(b.fits() for b in builds), format_report(builds)
