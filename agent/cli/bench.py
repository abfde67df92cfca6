"""`ds4-agent bench`: ds4 measured side by side with a peer (engine, long prompts, prefix cache, index,
pack, kernels, kernels compiled for the target cards, hybrid placement, serving). Each subcommand's
parser sits above its handler."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ds4.agent.cli import DONE, NOT_RESOLVED, USAGE
from ds4.agent.cli.inputs import read_issue, require_dir
from ds4.agent.errors import InputError


def add_parser(sub) -> None:
    bench = sub.add_parser("bench")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for add in (
        _add_engine,
        _add_long,
        _add_prefix,
        _add_index,
        _add_pack,
        _add_kernels,
        _add_compile,
        _add_hybrid,
        _add_serve,
    ):
        add(bench_sub)


def run(args) -> int:
    return {
        "engine": _engine,
        "long": _long,
        "prefix": _prefix,
        "index": _index,
        "pack": _pack,
        "kernels": _kernels,
        "compile": _compile,
        "hybrid": _hybrid,
        "serve": _serve,
    }[args.bench_command](args)


def _add_engine(sub) -> None:
    engine = sub.add_parser("engine", help="prefill and decode tokens/s: ds4 vs transformers")
    engine.add_argument("--model", required=True, help="checkpoint folder")
    engine.add_argument("--prompt-tokens", type=int, default=256)
    engine.add_argument("--decode-tokens", type=int, default=32)
    engine.add_argument("--runs", type=int, default=5)
    engine.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    engine.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    engine.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    engine.add_argument("--batch", type=int, default=32, help="prompts decoded together (default 32)")
    engine.add_argument(
        "--batch-prompt-tokens", type=int, default=64, help="tokens of each batched prompt (default 64)"
    )
    engine.add_argument("--json", action="store_true")


def _engine(args) -> int:
    from ds4.engine.bench.engine import bench_engine, format_report

    options = (
        "prompt_tokens",
        "decode_tokens",
        "runs",
        "dtype",
        "threads",
        "device",
        "batch",
        "batch_prompt_tokens",
    )
    return _report(args, bench_engine, format_report, options)


def _report(args, bench, format_report, options: tuple[str, ...]) -> int:
    """Runs `bench` on --model with the parsed `options` (each flag named as its parameter), then prints
    the report, as JSON with --json."""
    report = bench(args.model, **{name: getattr(args, name) for name in options})
    return _print_report(args, report, format_report)


def _print_report(args, report: dict, format_report) -> int:
    """Prints `report`, as JSON with --json, else as `format_report` writes it."""
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return DONE


def _add_long(sub) -> None:
    long = sub.add_parser("long", help="one long prompt per length: prefill, TTFT, decode, peak memory")
    long.add_argument("--model", required=True, help="checkpoint folder")
    long.add_argument("--tokens", type=_token_counts, default=[8192, 32768], help="lengths, e.g. 8K,32K,128K")
    long.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    long.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    long.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    long.add_argument("--no-peer", action="store_true", help="skip transformers")
    long.add_argument("--json", action="store_true")


def _token_counts(text: str) -> list[int]:
    """'8K,32K,128K,1M' -> [8192, 32768, 131072, 1048576]."""
    units = {"K": 1024, "M": 1024 * 1024}
    try:
        return [
            int(t[:-1]) * units[t[-1].upper()] if t[-1].upper() in units else int(t) for t in text.split(",")
        ]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of token counts, e.g. 8K,32K,128K"
        ) from None


def _long(args) -> int:
    from ds4.engine.bench.long import bench_long, format_long_report

    report = bench_long(args.model, args.tokens, args.device, args.dtype, args.chunk, peer=not args.no_peer)
    return _print_report(args, report, format_long_report)


def _add_prefix(sub) -> None:
    prefix = sub.add_parser("prefix", help="time to first token: cold, warm prefix cache, disk tier")
    prefix.add_argument("--model", required=True, help="checkpoint folder")
    prefix.add_argument("--prompt-tokens", type=int, default=8192, help="the shared prefix")
    prefix.add_argument("--suffix-tokens", type=int, default=16)
    prefix.add_argument("--runs", type=int, default=3)
    prefix.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    prefix.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    prefix.add_argument("--json", action="store_true")


def _prefix(args) -> int:
    from ds4.engine.bench.prefix import bench_prefix, format_prefix_report

    options = ("prompt_tokens", "suffix_tokens", "runs", "dtype", "threads")
    return _report(args, bench_prefix, format_prefix_report, options)


def _add_index(sub) -> None:
    index = sub.add_parser("index", help="full and one-file index times, next to universal-ctags")
    index.add_argument("--repo", default=".")
    index.add_argument("--runs", type=int, default=3)
    index.add_argument("--json", action="store_true")


def _index(args) -> int:
    from ds4.agent.bench.index import bench_index, format_index_report

    require_dir(args.repo)
    report = bench_index(args.repo, runs=args.runs)
    return _print_report(args, report, format_index_report)


def _add_pack(sub) -> None:
    packing = sub.add_parser(
        "pack", help="pack time at 100K and 1M budgets; prefix kept after edits; --recall over real fixes"
    )
    packing.add_argument("--repo", default=".")
    which = packing.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder (its tokenizer.json counts tokens)")
    which.add_argument("--tokenizer", help="a tokenizer.json")
    packing.add_argument("--issue", default="", help="issue text used for ranking")
    packing.add_argument("--runs", type=int, default=3)
    packing.add_argument(
        "--recall",
        action="store_true",
        help="instead: over the repository's recent small fixes (1-3 modified files, one or more of them "
        "source, at most 60 changed lines), with each commit's message as the issue, how many packs show "
        "every hunk's original lines, next to whole files ranked by BM25",
    )
    packing.add_argument("--commits", type=int, default=30, help="with --recall: fixes to measure")
    packing.add_argument(
        "--budgets",
        type=_token_counts,
        default=[32_000, 128_000],
        help="with --recall: token budgets, e.g. 32000,128K",
    )
    packing.add_argument("--json", action="store_true")


def _pack(args) -> int:
    require_dir(args.repo)
    tokenizer = args.tokenizer or os.path.join(args.model, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise InputError(f"{tokenizer}: no tokenizer.json to count tokens with", "tokenizer")
    if args.recall:
        return _recall(args, tokenizer)
    from ds4.agent.bench.pack import bench_pack, format_pack_report

    report = bench_pack(args.repo, tokenizer, runs=args.runs, issue=read_issue(args.issue))
    return _print_report(args, report, format_pack_report)


def _recall(args, tokenizer: str) -> int:
    from ds4.agent.bench.recall import bench_recall, format_recall_report

    if args.commits < 1:
        raise InputError(f"--commits {args.commits}: give 1 or more", "commits")

    def progress(i: int, n: int, fix) -> None:
        print(f"[{i + 1}/{n}] {fix.sha[:10]} {fix.subject[:70]}", file=sys.stderr, flush=True)

    report = bench_recall(args.repo, tokenizer, args.commits, tuple(args.budgets), progress)
    if len(report["commits"]) < args.commits:
        print(
            f"ds4-agent: note: only {len(report['commits'])} commits match the selection rule "
            f"({args.commits} asked); measured those",
            file=sys.stderr,
        )
    return _print_report(args, report, format_recall_report)


def _add_kernels(sub) -> None:
    kern = sub.add_parser(
        "kernels", help="each Triton kernel vs its torch reference at real sizes (GB/s, TFLOP/s; on a GPU)"
    )
    kern.add_argument("--device", default="cuda")
    kern.add_argument("--small", action="store_true", help="toy sizes: checks the script (CPU: interpreter)")
    kern.add_argument("--runs", type=int, default=20)
    kern.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    kern.add_argument("--json", action="store_true")


def _kernels(args) -> int:
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch

    from ds4.engine.bench.kernels import bench_kernels, format_report, to_json

    try:
        rates, results = bench_kernels(args.device, args.small, args.runs, not args.no_compile)
    except RuntimeError as e:  # no GPU, or one the kernels cannot run on
        print(f"ds4-agent: error: {e}", file=sys.stderr)
        return USAGE
    name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else "CPU (Triton interpreter)"
    )
    print(to_json(name, rates, results) if args.json else format_report(name, rates, results))
    failed = [r.name for r in results if r.error is not None]
    if failed:
        print(
            f"ds4-agent: {len(failed)} kernel(s) failed on this device: {', '.join(failed)}", file=sys.stderr
        )
        return NOT_RESOLVED
    return DONE


def _names(text: str) -> list[str]:
    return [c for c in text.split(",") if c]


def _add_compile(sub) -> None:
    comp = sub.add_parser(
        "compile",
        help="every Triton kernel compiled for the target cards, no GPU needed: shared memory, registers",
    )
    comp.add_argument(
        "--cards", type=_names, default=None, help="sm89 (RTX 4090), sm90 (H100/H200); default both"
    )
    comp.add_argument("--dtypes", type=_names, default=["bfloat16"], help="bfloat16 and/or float32")
    comp.add_argument(
        "--presets",
        type=_names,
        default=None,
        help="real models' sizes; default deepseek-v3,deepseek-v3.2,deepseek-v4-flash",
    )
    comp.add_argument(
        "--families",
        type=_names,
        default=None,
        help="the engine's launches on these families' tiny checkpoints; default all three",
    )
    comp.add_argument("--no-engine", action="store_true", help="only the presets' sizes")
    comp.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per core)")
    comp.add_argument("--triton", default=None, help="a folder holding another Triton to compile with")
    comp.add_argument("--json", action="store_true")


def _compile(args) -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # recorded under the interpreter; compiled in processes without it
    import torch

    from ds4.engine.bench.compile import FAMILIES, PRESETS, format_report, run
    from ds4.kernels.targets import CARDS

    cards, presets = args.cards or list(CARDS), args.presets or list(PRESETS)
    families = [] if args.no_engine else args.families or list(FAMILIES)
    choices = (
        (cards, CARDS),
        (args.dtypes, ("bfloat16", "float32")),
        (presets, PRESETS),
        (families, FAMILIES),
    )
    for given, allowed in choices:
        unknown = [g for g in given if g not in allowed]
        if unknown:
            print(
                f"ds4-agent: error: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}",
                file=sys.stderr,
            )
            return USAGE
    if args.triton and not os.path.isdir(os.path.join(args.triton, "triton")):
        print(f"ds4-agent: error: {args.triton} holds no triton package", file=sys.stderr)
        return USAGE
    dtypes = [getattr(torch, d) for d in args.dtypes]
    builds = run(cards, dtypes, presets, families, args.jobs, args.triton)
    print(json.dumps([vars(b) for b in builds], indent=1) if args.json else format_report(builds))
    bad = [b for b in builds if not b.fits()]
    if bad:
        print(f"ds4-agent: {len(bad)} build(s) failed or exceed their card's limits", file=sys.stderr)
        return NOT_RESOLVED
    return DONE


def _expert_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f for f in text.split(",") if f and f != "none")
    if any(f not in ("int4", "fp4", "fp8") for f in formats):
        raise argparse.ArgumentTypeError(f"{text!r}: formats are int4, fp4, fp8 (comma-separated) or none")
    return formats


def _add_hybrid(sub) -> None:
    hybrid = sub.add_parser(
        "hybrid",
        help="decode tokens/s under expert placements (hot / in RAM) next to the planner's prediction",
    )
    hybrid.add_argument("--model", required=True, help="checkpoint folder (e.g. the small preset)")
    hybrid.add_argument("--tokens", type=int, default=32)
    hybrid.add_argument("--prompt-tokens", type=int, default=64)
    hybrid.add_argument("--runs", type=int, default=3)
    hybrid.add_argument(
        "--experts",
        type=_expert_formats,
        default=("int4", "fp8"),
        metavar="FMT,FMT",
        help="also measure the routed experts in these formats (int4, fp4, fp8; kept as stored, the first "
        "also dequantized at load), or none (default int4,fp8)",
    )
    hybrid.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    hybrid.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    hybrid.add_argument(
        "--device",
        action="append",
        help="compute device (repeat it to pipeline the layers over several; default cpu)",
    )
    hybrid.add_argument("--json", action="store_true")


def _hybrid(args) -> int:
    from ds4.engine.bench.hybrid import bench_hybrid, format_report

    require_dir(args.model)
    devices = tuple(args.device or ["cpu"])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = bench_hybrid(
        args.model, args.tokens, args.prompt_tokens, args.runs, args.experts, devices, args.dtype
    )
    return _print_report(args, report, format_report)


def _add_serve(sub) -> None:
    serving = sub.add_parser(
        "serve", help="TTFT p50/p99 and tokens/s of concurrent streaming clients: ds4 serve vs a peer server"
    )
    serving.add_argument("--model", required=True, help="checkpoint folder (both servers load it)")
    serving.add_argument("--clients", type=int, default=8)
    serving.add_argument("--requests", type=int, default=32, help="per workload")
    serving.add_argument("--prompt-tokens", type=int, default=256, help="each prompt's own tokens")
    serving.add_argument("--prefix-tokens", type=int, default=2048, help="the shared prefix's tokens")
    serving.add_argument("--max-tokens", type=int, default=32)
    serving.add_argument(
        "--peer",
        default="transformers",
        help="transformers (`transformers serve`, needs transformers[serving]), transformers-cb "
        "(its continuous batching), a running server's URL, or none",
    )
    serving.add_argument("--json", action="store_true")


def _serve(args) -> int:
    from ds4.agent.bench.serve import bench_serve, format_serve_report, to_json

    require_dir(args.model)
    config = {
        k: getattr(args, k)
        for k in ("clients", "requests", "prompt_tokens", "prefix_tokens", "max_tokens", "peer")
    }
    results = bench_serve(args.model, **config)
    print(to_json(results, config) if args.json else format_serve_report(results, config))
    return DONE
