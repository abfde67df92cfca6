"""`ds4-agent bench hybrid`: decode tokens/s of a checkpoint under several expert placements (single
device; all, half or none of each layer's experts hot), then with its routed experts quantized to 4 bits
(kept as stored and dequantized in each matmul, or dequantized at load), next to what the planner
predicts for this machine from its measured read bandwidth and matmul rate."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.bench import _median_time, read_bandwidth
from ds4.engine.planner import Hardware, plan
from ds4.engine.quantize import quantize_checkpoint


def measure_machine() -> dict:
    """This CPU's streaming-read bandwidth (the engine bench's measure: decode reads weights) and its
    fp32 matmul rate."""
    a = torch.randn(1024, 1024)
    best_mm = min(_median_time(lambda: a @ a, 1) for _ in range(5))
    return {"read_gb_per_s": read_bandwidth() / 1e9, "matmul_tflop_per_s": 2 * 1024**3 / best_mm / 1e12}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rate(llm: LLM, prompt: list[int], tokens: int, runs: int) -> float:
    """Decode tokens/s: (N - 1) tokens over the time a generation of N takes beyond a generation of 1."""
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate([prompt], one)  # warm-up
    rates = []
    for i in range(runs):
        p = [t + i for t in prompt]  # no prefix-cache hits between runs
        t1 = _timed(lambda p=p: llm.generate([p], one))
        tn = _timed(lambda p=p: llm.generate([[t + 1 for t in p]], many))
        rates.append((tokens - 1) / max(tn - t1, 1e-9))
    return sorted(rates)[len(rates) // 2]


def bench_hybrid(
    model_dir: str,
    tokens: int = 32,
    prompt_tokens: int = 64,
    runs: int = 3,
    quantized: str | None = "int4",
    devices: tuple[str, ...] = ("cpu",),
    dtype: str = "float32",
) -> dict:
    """`devices`: the compute device (the first; experts on the expert tier stay in host RAM) and the
    stages of the pipelined row (two stages of the one device when only one is given). `quantized`:
    also measure the checkpoint with its routed experts in this 4-bit format (None: don't). `dtype`:
    the model's (what float weights are held and computed in)."""
    device = devices[0]
    stages = tuple(devices) if len(devices) > 1 else (device, device)
    float_format = "fp32" if dtype == "float32" else "bf16"  # the planner's name for its bytes
    probe = LLM(model_dir, device=device, dtype=dtype)
    config = probe.config
    experts = config.n_routed_experts
    prompt = list(range(10, 10 + prompt_tokens))
    machine = measure_machine()
    rows = [
        ("single device", {}),
        (f"layers over {len(stages)} stages ({', '.join(stages)})", {"devices": stages, "device": None}),
    ]
    rows += [
        (f"{h} of {experts} experts hot per layer", {"hot_experts": h}) for h in (experts, experts // 2, 0)
    ]
    results = []
    for label, settings in rows:
        base = {"device": device, "dtype": dtype, "hot_period": 8}
        llm = probe if not settings else LLM(model_dir, **{**base, **settings})
        results.append(
            {
                "placement": label,
                "hot_experts": settings.get("hot_experts"),
                "stages": len(settings.get("devices") or [device]),
                "decode_tokens_per_s": decode_rate(llm, prompt, tokens, runs),
            }
        )
    if quantized is not None:
        with tempfile.TemporaryDirectory() as tmp:
            quantized_dir = Path(tmp) / quantized
            quantize_checkpoint(model_dir, quantized_dir, experts=quantized, attn="bf16")
            for weights in ("stored", "dequantize"):
                how = "stored 4-bit" if weights == "stored" else "dequantized at load"
                llm = LLM(quantized_dir, device=device, dtype=dtype, weights=weights, hot_experts=0)
                results.append(
                    {
                        "placement": f"{quantized} experts {how}, none hot",
                        "hot_experts": 0,
                        "stages": 1,
                        "weights": weights,
                        "expert_bytes": sum(
                            p.numel() * p.element_size()
                            for n, p in llm.runner.model.named_parameters()
                            if ".experts." in n
                        ),
                        "decode_tokens_per_s": decode_rate(llm, prompt, tokens, runs),
                    }
                )
    bw, flops = machine["read_gb_per_s"] * 1e9, machine["matmul_tflop_per_s"] * 1e12
    hw = Hardware(
        gpu_bandwidth=bw,
        ram_bandwidth=bw,
        gpu_flops=flops,
        cpu_flops=flops,
        gpu_reserve=0,
        ram_reserve=0,
        layer_overhead=0,
    )
    predicted = {
        fmt: plan(
            config,
            model_dir,
            [1e12],
            1e12,
            context=prompt_tokens + tokens,
            batch=1,
            expert_format=fmt,
            attn_format=float_format,
            hardware=hw,
        ).decode_tokens_per_s
        for fmt in [float_format] + ([quantized] if quantized else [])
    }
    return {
        "machine": machine,
        "dtype": dtype,
        "results": results,
        "predicted_decode_tokens_per_s": predicted[float_format],
        "predicted_by_expert_format": predicted,
    }


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"this machine: read {m['read_gb_per_s']:.1f} GB/s, "
        f"fp32 matmul {m['matmul_tflop_per_s']:.2f} TFLOP/s; model in {report['dtype']}"
    ]
    for r in report["results"]:
        lines.append(f"  {r['placement']:<56} decode {r['decode_tokens_per_s']:8.1f} tok/s")
    for fmt, rate in report["predicted_by_expert_format"].items():
        lines.append(f"  planner's prediction for this machine, {fmt} experts: {rate:.1f} tok/s")
    return "\n".join(lines)
