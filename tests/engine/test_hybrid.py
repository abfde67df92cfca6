"""Hybrid execution: routed experts in host RAM, the popular ones cached on the compute device, moved
by popularity during generation, long prefills streaming their cold experts. On this CPU-only machine
every tier is the CPU; what is checked is the logic: the same greedy tokens as single-device
execution for every family, with experts really moving between tiers, and quantized experts in RAM
computed by the CPU kernel from their codes (no full-precision copy) with the same greedy tokens."""

from __future__ import annotations

import subprocess

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.random_checkpoint import init_checkpoint
from tests.servers import EXE

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [list(range(5, 40)), list(range(100, 112))]


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v32", "deepseek_v4"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    init_checkpoint(request.param, "tiny", path, seed=4)
    return path


def test_hybrid_greedy_tokens_equal_single_device_while_experts_move(checkpoint):
    single = [o.token_ids for o in LLM(checkpoint).generate(PROMPTS, GREEDY)]
    hybrid = LLM(checkpoint, hot_experts=2, hot_period=1)  # 2 of 8 experts hot, re-ranked every pass
    got = [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)]
    assert got == single
    stats = [t.stats for t in hybrid.runner.tiered]
    assert stats and all(s["promoted"] >= 2 for s in stats)
    assert sum(s["evicted"] for s in stats) > 0  # popularity moved experts between tiers mid-generation
    assert sum(s["hot_rows"] for s in stats) > 0 and sum(s["cold_rows"] for s in stats) > 0
    assert all(len(t.hot) <= 2 for t in hybrid.runner.tiered)


def test_long_prefills_stream_their_cold_experts_once(checkpoint):
    single = [o.token_ids for o in LLM(checkpoint).generate(PROMPTS, GREEDY)]
    hybrid = LLM(checkpoint, hot_experts=0, stream_tokens=16)  # nothing hot; prompts >= 16 tokens stream
    assert [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)] == single
    stats = [t.stats for t in hybrid.runner.tiered]
    assert sum(s["streamed"] for s in stats) > 0 and all(s["promoted"] == 0 for s in stats)
    assert sum(s["cold_rows"] for s in stats) > 0  # decode steps ran the experts where they live


def test_hybrid_settings_are_checked():
    from ds4.engine.config import EngineConfig

    with pytest.raises(ValueError, match="hot_experts"):
        EngineConfig(hot_experts=-1)
    with pytest.raises(ValueError, match="hot_period"):
        EngineConfig(hot_period=0)


def test_bench_hybrid_reports_each_placement_the_expert_reads_and_the_prediction(tmp_path):
    import json

    path = tmp_path / "tiny"
    init_checkpoint("deepseek_v3", "tiny", path)
    run = subprocess.run(
        [EXE, "bench", "hybrid", "--model", str(path), "--tokens", "4", "--runs", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert [r["hot_experts"] for r in report["results"]] == [None, None, 8, 4, 0, 0, 0, 0]
    assert [r["stages"] for r in report["results"]] == [1, 2, 1, 1, 1, 1, 1, 1]
    assert all(r["decode_tokens_per_s"] > 0 for r in report["results"])
    stored, loaded, fp8 = report["results"][-3:]  # int4 kept as stored / dequantized at load; fp8 stored
    assert (stored["weights"], loaded["weights"], fp8["weights"]) == ("stored", "dequantize", "stored")
    assert [r.get("expert_format") for r in report["results"][-4:]] == ["fp32", "int4", "fp32", "fp8"]
    assert stored["expert_bytes"] * 6 < loaded["expert_bytes"]  # 4 bits + a scale per 32 against fp32
    in_ram = [r for r in report["results"] if r["hot_experts"] == 0]
    assert all(r["expert_gb_per_s"] > 0 and 0 < r["expert_read_share"] for r in in_ram)
    # int4 and float experts run in the CPU kernel, whose own clock counts part of the pass: it reads at
    # least as fast
    for row in (stored, loaded):
        assert row["kernel_gb_per_s"] >= row["expert_gb_per_s"] and row["kernel_read_share"] > 0
    assert report["predicted_decode_tokens_per_s"] > 0 and report["machine"]["read_gb_per_s"] > 0
    parts = report["parts"]  # what each prediction is made of, each measured on its own
    assert set(parts) == {"fp32", "int4", "fp8"} and all(p["model_gemv_gb_per_s"] > 0 for p in parts.values())
    assert parts["int4"]["expert_kernel_gb_per_s"] > 0 and parts["fp32"]["expert_kernel_gb_per_s"] > 0
    assert all(r["read_gb_per_s"] > 0 for r in in_ram)  # each share against a read measured next to it
    predicted = report["predicted_by_expert_format"]
    assert set(predicted) == set(report["predicted_over_measured"]) == {"fp32", "int4", "fp8"}
    # dispatch with the streamed reads taken out: a one-run tiny twin can leave nothing (never below 0)
    assert all(ms >= 0 for ms in report["layer_dispatch_ms"].values())
    assert predicted["int4"] > 0 and predicted["fp8"] > 0


def test_the_twins_streamed_reads_run_inside_a_compiled_step():
    """The tiny twin's layers read their share of a buffer before they run, as a real step's layers read
    their weights; its decode step is compiled, and a read whose result nothing used was dropped from the
    graph, which left the twin's dispatch near 0 once the reads' own time was taken out."""
    from ds4.engine.bench.hybrid import _reader

    share, layer = torch.ones(1000), torch.nn.Linear(4, 4)
    read = _reader(share)
    layer.register_forward_pre_hook(read)
    step = torch.compile(layer)
    with torch.no_grad():
        step(torch.randn(1, 4))
        assert float(read.sink) == 1000.0
        share.fill_(2.0)  # read again on the next call, not a constant of the graph
        step(torch.randn(1, 4))
    assert float(read.sink) == 2000.0


def _quantized(checkpoint, experts: str):
    from ds4.engine.quantize import quantize_checkpoint

    path = checkpoint.parent / f"{experts}-experts"
    if not path.exists():
        quantize_checkpoint(checkpoint, path, experts, "bf16")
    return path


@pytest.mark.parametrize("experts", ["int4", "fp4"])
def test_quantized_experts_in_ram_run_in_the_cpu_kernel_with_the_same_greedy_tokens(checkpoint, experts):
    from ds4 import kernels
    from ds4.kernels import cpu_moe

    assert cpu_moe.available(), f"the CPU expert kernel did not build: {cpu_moe.build_error()}"
    path = _quantized(checkpoint, experts)
    with kernels.cpu_kernels(False):  # the reference: each expert dequantized for its call
        want = [o.token_ids for o in LLM(path, hot_experts=0).generate(PROMPTS, GREEDY)]
    hybrid = LLM(path, hot_experts=2, hot_period=1)
    assert all(t.use_cpu_kernel and t.quant == experts for t in hybrid.runner.tiered)
    with kernels.cpu_activations("float"):  # int8 activations (the default for int4) round differently
        assert [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)] == want
    stats = [t.stats for t in hybrid.runner.tiered]
    assert sum(s["promoted"] for s in stats) > 0 and sum(s["cold_rows"] for s in stats) > 0


def _largest_allocation(fn) -> int:
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_the_cpu_kernel_allocates_no_full_precision_copy_of_an_expert(tmp_path):
    from ds4 import kernels
    from ds4.kernels import cpu_moe

    assert cpu_moe.available(), f"the CPU expert kernel did not build: {cpu_moe.build_error()}"
    init_checkpoint("deepseek_v3", "tiny", tmp_path / "src", seed=2)
    llm = LLM(_quantized(tmp_path / "src", "int4"), hot_experts=0)
    config = llm.config
    smallest = 4 * config.hidden_size * config.moe_intermediate_size  # w2 of one expert in float32
    x = torch.randn(3, config.hidden_size)
    weights, ids = torch.rand(3, 2), torch.tensor([[1, 5], [0, 5], [7, 2]])
    for tiered in llm.runner.tiered:
        assert _largest_allocation(lambda t=tiered: t(x, weights, ids)) < smallest
    with kernels.cpu_kernels(False):  # the torch path does copy: the check can fail
        torch_path = LLM(_quantized(tmp_path / "src", "int4"), hot_experts=0).runner.tiered[0]
        assert _largest_allocation(lambda: torch_path(x, weights, ids)) >= smallest


def test_overlapped_passes_queue_the_shared_expert_before_the_host_computes_with_the_same_tokens(tmp_path):
    """With experts in host RAM and the model on a GPU, a layer's cold experts go to the host while the
    device computes the shared expert. The order is what overlaps, so it is checked here, where every
    tier is the CPU: the shared expert is called before the routed experts' kernel, in every MoE layer and
    step, and the tokens do not change."""
    init_checkpoint("deepseek_v3", "tiny", tmp_path / "src", seed=2)
    llm = LLM(_quantized(tmp_path / "src", "int4"), hot_experts=0)
    assert not any(t.overlaps for t in llm.runner.tiered)  # CPU-only: nothing to overlap with by default
    want = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    calls = []  # (what, layer) of the decode steps (prefills have too many rows for the kernel)
    layers = [m for m in llm.runner.model.modules() if hasattr(m, "shared_experts") and m.shared_experts]
    assert len(layers) == len(llm.runner.tiered) > 1

    def record(what, i, x):
        if x.shape[0] <= len(PROMPTS):
            calls.append((what, i))

    for i, layer in enumerate(layers):
        layer.shared_experts.register_forward_hook(lambda _, args, __, i=i: record("shared", i, args[0]))
        kernel = layer.experts.cpu_forward
        layer.experts.cpu_forward = lambda *a, i=i, kernel=kernel: record("routed", i, a[0]) or kernel(*a)
        layer.experts.overlap = True
    assert all(t.overlaps for t in llm.runner.tiered)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    steps = len(calls) // (2 * len(layers))
    assert steps >= GREEDY.max_tokens - 1
    assert calls == [
        (kind, i) for _ in range(steps) for i in range(len(layers)) for kind in ("shared", "routed")
    ]
    for layer in layers:
        layer.experts.overlap = False
    calls.clear()
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert calls[:2] == [("routed", 0), ("shared", 0)]  # the order the test tells apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_overlapped_passes_give_the_tokens_of_the_plain_ones(tmp_path):
    """On a GPU with int4 experts in host RAM, overlap is on by default; its pinned, non-blocking hand-off
    gives the tokens of the blocking one."""
    init_checkpoint("deepseek_v3", "tiny", tmp_path / "src", seed=2)
    llm = LLM(_quantized(tmp_path / "src", "int4"), device="cuda", hot_experts=1, hot_period=1)
    assert all(t.overlaps for t in llm.runner.tiered)
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    for tiered in llm.runner.tiered:
        tiered.overlap = False
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == got
    stats = [t.stats for t in llm.runner.tiered]
    assert sum(s["cold_rows"] for s in stats) > 0 and sum(s["hot_rows"] for s in stats) > 0
