"""`ds4-agent bench hybrid`: decode tokens/s of a checkpoint under several expert placements (single
device; all, half or none of each layer's experts hot), then with its routed experts quantized (kept as
stored, computed by the CPU kernel from their codes; and for the first format dequantized at load). Rows
with every expert in host RAM also give the GB/s of expert bytes their decode steps read, against this
machine's measured read bandwidth. Next to them, what the planner predicts for this machine from parts
measured on their own (bench/calibration.py): the bandwidth of the model's matrices one row at a time, the
CPU expert kernel's at the model's expert shapes, and the per-layer dispatch overhead of a decode step
measured on a tiny twin of the model (same family, layers, routing and expert format; tiny widths, so its
step is all overhead)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.bench.calibration import expert_kernel_bandwidth, measure_machine, model_gemv_bandwidth
from ds4.engine.bench.engine import median_time, read_bandwidth
from ds4.engine.compiled import CompiledDecode
from ds4.engine.planner import plan
from ds4.engine.prediction import Hardware
from ds4.engine.quantize import quantize_checkpoint
from ds4.engine.random_checkpoint import init_checkpoint

# what a tiny twin copies from the model: the shape of a decode step (layers, routing), not its widths
TWIN_KEYS = (
    "num_hidden_layers",
    "first_k_dense_replace",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "layer_types",
    "compress_ratios",
)


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


def _row(llm: LLM, label: str, prompt, tokens, runs, **fields) -> dict:
    """A placement's decode rate; with its experts in host RAM, the GB/s their single-token passes read."""
    row = {"placement": label, **fields}
    tiered = llm.runner.tiered
    before = [dict(t.stats) for t in tiered]
    kernel_before = sum(float(t.kernel_seconds) for t in tiered)
    row["decode_tokens_per_s"] = decode_rate(llm, prompt, tokens, runs)
    if tiered and fields.get("hot_experts") == 0:
        pairs = list(zip([t.stats for t in tiered], before, strict=True))
        nbytes = sum(a["decode_expert_bytes"] - b["decode_expert_bytes"] for a, b in pairs)
        seconds = sum(a["decode_expert_s"] - b["decode_expert_s"] for a, b in pairs)
        row["expert_gb_per_s"] = nbytes / max(seconds, 1e-12) / 1e9
        row["expert_ms_per_token"] = 1e3 * seconds / max(1, (tokens - 1) * runs)
        kernel = sum(float(t.kernel_seconds) for t in tiered) - kernel_before
        if kernel > 0:  # the CPU kernel's own clock: the products, without the Python pass around them
            row["kernel_gb_per_s"] = nbytes / kernel / 1e9
    return row


def twin_dispatch(
    model_dir: Path, fmt: str | None, tmp: Path, device: str, dtype: str, runs: int, stream_bytes: int = 0
) -> float:
    """Seconds per layer and decode step of the model's tiny twin with its experts in host RAM, stored in
    `fmt` (None: float). With `stream_bytes`, each twin layer first reads its share of that many bytes of
    a separate buffer, as the model's layers read their weights, and the reads' own time (timed alone,
    right after) is taken out: what is left is dispatch with the caches as a real step leaves them, full
    of weights, not of the interpreter's and torch's working set."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    overrides = {k: config[k] for k in TWIN_KEYS if k in config}
    overrides["moe_intermediate_size"] = 128  # whole FP8 blocks once gate and up stack: kept as stored
    path = init_checkpoint(config["model_type"], "tiny", tmp / f"twin-{fmt}-src", config_overrides=overrides)
    if fmt is not None:
        quantize_checkpoint(path, tmp / f"twin-{fmt}", experts=fmt, attn="bf16")
        path = tmp / f"twin-{fmt}"
    llm = LLM(path, device=device, dtype=dtype, hot_experts=0)
    layers = llm.runner.model.layers
    shares = list(torch.ones(max(stream_bytes // 4, len(layers)), device=device).chunk(len(layers)))
    readers = [_reader(share) for share in shares] if stream_bytes else []
    for layer, read in zip(layers, readers, strict=False):
        layer.register_forward_pre_hook(read)
    step = 1.0 / decode_rate(llm, list(range(10, 74)), 32, runs)

    def stream() -> None:  # the reads alone, run as the step runs them: compiled where it is
        for read in readers:
            read(None, None)

    if isinstance(llm.runner.decode_forward, CompiledDecode):
        stream = torch.compile(stream)
    reads = median_time(stream, 3 * runs) if readers else 0.0
    return max(step - reads, 0.0) / config["num_hidden_layers"]


def _reader(share: torch.Tensor):
    """A pre-hook that reads `share` before its layer runs. The sum lands in a buffer: a compiled step traces
    the hook, and a result nothing uses would be dropped from its graph, the read with it."""
    sink = torch.zeros((), dtype=share.dtype, device=share.device)

    def read(module, args) -> None:  # a pre-hook's result would replace the layer's inputs: none
        sink.copy_(share.sum())

    read.sink = sink  # what it read last (the tests look)
    return read


def bench_hybrid(
    model_dir: str,
    tokens: int = 32,
    prompt_tokens: int = 64,
    runs: int = 3,
    formats: tuple[str, ...] = ("int4", "fp8"),
    devices: tuple[str, ...] = ("cpu",),
    dtype: str = "float32",
) -> dict:
    """`devices`: the compute device (the first; experts on the expert tier stay in host RAM) and the
    stages of the pipelined row (two stages of the one device when only one is given). `formats`: also
    measure the checkpoint with its routed experts in these formats (the first also dequantized at load).
    `dtype`: the model's (what float weights are held and computed in)."""
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
    results, parts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, settings in rows:
            base = {"device": device, "dtype": dtype, "hot_period": 8}
            llm = probe if not settings else LLM(model_dir, **{**base, **settings})
            stage_count = len(settings.get("devices") or [device])
            fields = {"hot_experts": settings.get("hot_experts"), "stages": stage_count}
            if settings.get("hot_experts") == 0:
                fields["expert_format"] = float_format
                parts[float_format] = _parts(probe, model_dir, None, tmp, device, dtype, runs)
                fields["read_gb_per_s"] = read_bandwidth(runs=3) / 1e9
            results.append(_row(llm, label, prompt, tokens, runs, **fields))
        for i, fmt in enumerate(formats):
            quantized_dir = tmp / fmt
            quantize_checkpoint(model_dir, quantized_dir, experts=fmt, attn="bf16")
            for weights in ("stored", "dequantize") if i == 0 else ("stored",):
                how = "kept as stored" if weights == "stored" else "dequantized at load"
                llm = LLM(quantized_dir, device=device, dtype=dtype, weights=weights, hot_experts=0)
                fields = {"hot_experts": 0, "stages": 1, "weights": weights}
                fields["expert_format"] = fmt if weights == "stored" else float_format
                fields["expert_bytes"] = sum(
                    p.numel() * p.element_size()
                    for n, p in llm.runner.model.named_parameters()
                    if ".experts." in n
                )
                if weights == "stored":
                    parts[fmt] = _parts(probe, model_dir, fmt, tmp, device, dtype, runs)
                fields["read_gb_per_s"] = read_bandwidth(runs=3) / 1e9
                results.append(_row(llm, f"{fmt} experts {how}, none hot", prompt, tokens, runs, **fields))
    for r in results:  # against the read bandwidth measured just before the row
        if "expert_gb_per_s" in r:
            r["expert_read_share"] = r["expert_gb_per_s"] / r["read_gb_per_s"]
        if "kernel_gb_per_s" in r:
            r["kernel_read_share"] = r["kernel_gb_per_s"] / r["read_gb_per_s"]
    context, name = prompt_tokens + tokens, model_dir
    flops = machine["matmul_tflop_per_s"] * 1e12  # prefill's; decode is predicted from the parts
    predicted = {f: _predict(config, name, parts[f], flops, f, float_format, context) for f in parts}
    measured = {}
    for r in results:  # the planned placement: every expert in host RAM, stored in the format
        if r.get("hot_experts") == 0 and r.get("weights", "stored") == "stored":
            measured.setdefault(r["expert_format"], r["decode_tokens_per_s"])
    return {
        "machine": machine,
        "dtype": dtype,
        "results": results,
        "parts": parts,
        "layer_dispatch_ms": {fmt: 1e3 * p["dispatch_s"] for fmt, p in parts.items()},
        "predicted_decode_tokens_per_s": predicted[float_format],
        "predicted_by_expert_format": predicted,
        "predicted_over_measured": {f: predicted[f] / measured[f] for f in predicted if f in measured},
    }


def _parts(probe: LLM, model_dir, fmt: str | None, tmp: Path, device: str, dtype: str, runs: int) -> dict:
    """What the prediction for experts in `fmt` (None: float) is made of, measured on their own just
    before the row it predicts (the load on a shared machine moves): the model's matrices at their
    matrix-vector bandwidth, the CPU kernel's bandwidth at the model's expert shapes, the twin's dispatch
    with as many bytes streamed per step as the model's matrices hold."""
    float_format = "fp32" if dtype == "float32" else "bf16"
    kernel = expert_kernel_bandwidth(probe.config, fmt or float_format)
    gemv, matrix_bytes = model_gemv_bandwidth(probe.runner.model)
    return {
        "model_gemv_gb_per_s": gemv / 1e9,
        "expert_kernel_gb_per_s": kernel / 1e9 if kernel else None,
        "dispatch_s": twin_dispatch(
            Path(model_dir), fmt, tmp, device, dtype, runs, stream_bytes=matrix_bytes
        ),
    }


def _predict(config, model_dir, parts, flops, fmt, float_format, context) -> float:
    """The planner's decode rate for this machine: the model on one 'GPU' that is this CPU, every routed
    expert in host RAM (the placement measured). Each part at what it was measured to reach on its own:
    the model's matrices at their matrix-vector bandwidth, the experts at the CPU kernel's (where it
    cannot run them, in torch, at the matrices'), and the twin's dispatch per layer. The measured
    bandwidths include their arithmetic, so no compute bound applies."""
    bw = parts["model_gemv_gb_per_s"] * 1e9
    experts_bw = (parts["expert_kernel_gb_per_s"] or parts["model_gemv_gb_per_s"]) * 1e9
    hw = Hardware(
        gpu_bandwidth=bw,
        ram_bandwidth=experts_bw,
        gpu_flops=flops,
        cpu_flops=float("inf"),
        gpu_reserve=0,
        ram_reserve=0,
        layer_overhead=0,
        layer_dispatch=parts["dispatch_s"],
    )
    result = plan(
        config, model_dir, [1e12], 1e12, context=context, batch=1, expert_format=fmt,
        attn_format=float_format, hardware=hw, experts_in_ram=True,
    )  # fmt: skip
    return result.decode_tokens_per_s


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"this machine: read {m['read_gb_per_s']:.1f} GB/s (matrix-vector {m['gemv_gb_per_s']:.1f}), "
        f"fp32 matmul {m['matmul_tflop_per_s']:.2f} TFLOP/s; model in {report['dtype']}"
    ]
    for r in report["results"]:
        reads = ""
        if "expert_gb_per_s" in r:
            reads = (
                f"  experts {r['expert_ms_per_token']:.2f} ms/token, {r['expert_gb_per_s']:.1f} GB/s "
                f"({100 * r['expert_read_share']:.0f}% of the {r['read_gb_per_s']:.1f} GB/s read just before)"
            )
        if "kernel_gb_per_s" in r:
            reads += f"; in the kernel {r['kernel_gb_per_s']:.1f} GB/s ({100 * r['kernel_read_share']:.0f}%)"
        lines.append(f"  {r['placement']:<44} decode {r['decode_tokens_per_s']:7.1f} tok/s{reads}")
    for fmt, rate in report["predicted_by_expert_format"].items():
        ratio = report["predicted_over_measured"].get(fmt)
        against = f" ({ratio:.2f}x the measured rate)" if ratio else ""
        p = report["parts"][fmt]
        kernel = f", CPU kernel {p['expert_kernel_gb_per_s']:.1f} GB/s" if p["expert_kernel_gb_per_s"] else ""
        lines.append(
            f"  planner's prediction, {fmt} experts in RAM: {rate:.1f} tok/s{against}; from matrices at "
            f"{p['model_gemv_gb_per_s']:.1f} GB/s{kernel}, dispatch {1e3 * p['dispatch_s']:.3f} ms per layer"
        )
    return "\n".join(lines)
