"""`ds4-agent model` (init, info, quantize) and `ds4-agent generate`: checkpoints and raw generation."""

from __future__ import annotations

import json

from ds4.agent.cli import DONE
from ds4.agent.cli.flags import add_device_flags, device_kwargs


def add_parser(sub) -> None:
    model = sub.add_parser("model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    _add_init(model_sub)
    _add_info(model_sub)
    _add_quantize(model_sub)
    _add_generate(sub)


def run(args) -> int:
    if args.command == "generate":
        return _generate(args)
    return {"init": _init, "info": _info, "quantize": _quantize}[args.model_command](args)


def _add_init(sub) -> None:
    init = sub.add_parser(
        "init", help="write a random-weight checkpoint (HF format) for tests and benchmarks"
    )
    init.add_argument("--family", required=True, choices=["deepseek_v3", "deepseek_v32", "deepseek_v4"])
    init.add_argument("--preset", required=True, choices=["tiny", "small"])
    init.add_argument("--out", required=True, help="output folder")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument(
        "--fp8", action="store_true", help="store linear weights as FP8 e4m3 with 128x128 scales"
    )
    init.add_argument(
        "--fp4-experts", action="store_true", help="store routed experts as FP4 e2m1 (V4's format)"
    )
    init.add_argument("--shard-mb", type=int, default=2048, help="largest safetensors shard, in MB")


def _init(args) -> int:
    from ds4.engine.random_checkpoint import init_checkpoint

    out = init_checkpoint(
        args.family,
        args.preset,
        args.out,
        seed=args.seed,
        fp8=args.fp8,
        fp4_experts=args.fp4_experts,
        max_shard_bytes=args.shard_mb << 20,
    )
    print(f"wrote {args.family} ({args.preset}) checkpoint to {out}")
    return DONE


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="parameters, weight and cache bytes of a preset or checkpoint")
    info.add_argument("model", help="a preset name (deepseek-v4-flash, ...) or a checkpoint folder")
    info.add_argument("--json", action="store_true")


def _info(args) -> int:
    from ds4.engine.sizing import format_info, model_info

    info = model_info(model_config(args.model))
    print(json.dumps(info, indent=2) if args.json else format_info(args.model, info))
    return DONE


def model_config(name: str):
    """The ModelConfig of a checkpoint folder, or of a preset by name."""
    from pathlib import Path

    from ds4.engine.config import ModelConfig
    from ds4.engine.presets import load_preset

    if Path(name).is_dir():
        return ModelConfig.from_dir(name)
    return ModelConfig.from_hf(load_preset(name), source=f"preset {name}")


def _add_quantize(sub) -> None:
    quant = sub.add_parser(
        "quantize",
        help="a new checkpoint: FP4 (or FP8) routed experts, FP8 (or bf16) other matrices; streaming",
    )
    quant.add_argument("src", help="a checkpoint folder (bf16/fp32, or DeepSeek's FP8/FP4)")
    quant.add_argument("--out", required=True, help="a new, empty folder")
    quant.add_argument("--experts", choices=["fp4", "int4", "fp8", "bf16"], default="fp4")
    quant.add_argument("--attn", choices=["fp8", "bf16"], default="fp8")
    quant.add_argument("--shard-gb", type=float, default=2.0, help="shard size (memory stays near it)")
    quant.add_argument("--json", action="store_true")


def _quantize(args) -> int:
    from dataclasses import asdict

    from ds4.agent.cli.inputs import require_dir
    from ds4.agent.errors import InputError
    from ds4.engine.quantize import quantize_checkpoint

    require_dir(args.src)
    try:
        report = quantize_checkpoint(args.src, args.out, args.experts, args.attn, int(args.shard_gb * 2**30))
    except FileExistsError as e:
        raise InputError(str(e), "out") from None
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return DONE
    errors = ", ".join(f"{k} {v:.3f}" for k, v in report.max_rel_error.items())
    print(
        f"wrote {args.out}: {report.experts_quantized} expert and {report.matrices_quantized} other matrices "
        f"quantized, {report.kept} tensors kept, {report.shards} shard(s); "
        f"{report.bytes_in / 1e6:,.1f} MB -> {report.bytes_out / 1e6:,.1f} MB; worst relative error {errors}"
    )
    for line in report.kept_shapes:
        print(f"  kept as is: {line}")
    return DONE


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="checkpoint folder")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    add_device_flags(gen)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--no-stream", action="store_true", help="print the completion at the end only")


def _generate(args) -> int:
    from ds4.engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, **device_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    if args.no_stream:
        print(llm.generate(args.prompt, params)[0].text)
        return DONE
    for delta in llm.stream(args.prompt, params):
        print(delta, end="", flush=True)
    print()
    return DONE
