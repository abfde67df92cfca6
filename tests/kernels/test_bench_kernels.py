"""`ds4-agent bench kernels` is made for a GPU; `--small --device cpu` runs the same script at toy sizes
through the interpreter, so the benchmark is known to work before a GPU is at hand."""

from __future__ import annotations

import json
import subprocess

from tests.servers import EXE


def test_bench_kernels_runs_every_kernel_at_toy_sizes():
    run = subprocess.run(
        [EXE, "bench", "kernels", "--device", "cpu", "--small", "--runs", "1", "--no-compile", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["rates"]["copy_gb_per_s"] > 0 and report["rates"]["matmul_tflop_per_s"] > 0
    names = [r["name"] for r in report["results"]]
    assert len(names) == 18 and {
        "fused MoE fp4",
        "fused MoE int4",
        "quant linear fp8",
        "quant linear int4",
        "paged MLA decode (V3)",
        "paged MLA decode, one sequence (split)",
        "paged MLA decode, one sequence (unsplit)",
        "MLA prefill (V3, absorbed)",
        "mHC Sinkhorn + collapse (V4)",
    } <= set(names)
    for r in report["results"]:
        assert r["error"] is None and r["max_err"] < 1e-3, r
        assert r["triton_ms"] > 0 and r["bytes_moved"] > 0 and r["flops"] > 0


def test_bench_kernels_without_a_gpu_says_so():
    run = subprocess.run([EXE, "bench", "kernels"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr
