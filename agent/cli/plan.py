"""`ds4-agent plan`: a model placed on GPUs and host RAM, with the tokens/s the placement predicts."""

from __future__ import annotations

import json
import sys

from ds4.agent.cli import DONE, NOT_RESOLVED, USAGE


def add_parser(sub) -> None:
    p = sub.add_parser("plan")
    p.add_argument(
        "--model", required=True, help="a preset (deepseek-v3, deepseek-v4-flash, ...) or a checkpoint"
    )
    p.add_argument(
        "--gpu",
        action="extend",
        nargs="+",
        required=True,
        help="GPU memories, e.g. 24GB, 24GiB, '80GB x4' (repeat per card or give a count)",
    )
    p.add_argument("--ram", default=None, help="host RAM, e.g. 512GB (default: report what is needed)")
    p.add_argument("--context", default="128K", help="tokens per sequence: 4096, 128K, 1M (default 128K)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument(
        "--experts", choices=["bf16", "fp8", "fp4", "int4"], default=None, help="default: as shipped"
    )
    p.add_argument("--attn", choices=["bf16", "fp8"], default="fp8", help="attention and dense weights")
    p.add_argument("--gpu-bandwidth", type=float, default=1008, help="GB/s (RTX 4090: 1008)")
    p.add_argument("--gpu-tflops", type=float, default=165, help="bf16 dense TFLOP/s (RTX 4090: 165)")
    p.add_argument("--pcie-bandwidth", type=float, default=25, help="GB/s achieved (PCIe 4.0 x16: 25)")
    p.add_argument("--ram-bandwidth", type=float, default=70, help="GB/s achieved (dual-channel DDR5: 70)")
    p.add_argument("--cpu-tflops", type=float, default=1.5, help="CPU TFLOP/s for the experts in RAM")
    p.add_argument(
        "--layer-dispatch",
        type=float,
        default=0.0,
        metavar="MS",
        help="ms per layer and decode step spent launching operations (0 with CUDA graphs; an eager CPU "
        "run: what `bench hybrid` measures)",
    )
    p.add_argument(
        "--measure-cpu-experts",
        action="store_true",
        help="time ds4's CPU expert kernel here, at the model's expert shapes and format, and predict the "
        "experts in RAM at the bandwidth it reaches (instead of --ram-bandwidth and --cpu-tflops)",
    )
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ds4.agent.cli.model import model_config
    from ds4.engine.planner import format_plan, parse_gpus, parse_size, parse_tokens, plan
    from ds4.engine.prediction import Hardware

    try:
        gpus = parse_gpus(args.gpu)
        ram = parse_size(args.ram) if args.ram is not None else None
        context = parse_tokens(args.context)
        config = model_config(args.model)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    hw = Hardware(
        gpu_bandwidth=args.gpu_bandwidth * 1e9,
        gpu_flops=args.gpu_tflops * 1e12,
        pcie_bandwidth=args.pcie_bandwidth * 1e9,
        ram_bandwidth=args.ram_bandwidth * 1e9,
        cpu_flops=args.cpu_tflops * 1e12,
        layer_dispatch=args.layer_dispatch / 1e3,
    )
    if args.measure_cpu_experts:
        from ds4.engine.bench.calibration import expert_kernel_bandwidth

        fmt = args.experts or ("fp4" if config.is_v4 else "fp8")
        measured = expert_kernel_bandwidth(config, fmt)
        if measured is None:
            print(f"error: ds4's CPU kernel does not run {fmt} experts of this model here", file=sys.stderr)
            return USAGE
        print(f"CPU expert kernel here: {measured / 1e9:.1f} GB/s ({fmt})", file=sys.stderr)
        hw.ram_bandwidth, hw.cpu_flops = measured, float("inf")  # the measured rate includes its compute
    result = plan(config, args.model, gpus, ram, context, args.batch, args.experts, args.attn, hw)
    print(json.dumps(result.as_json(), indent=2) if args.json else format_plan(result))
    return DONE if result.fits else NOT_RESOLVED
