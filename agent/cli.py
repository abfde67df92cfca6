"""The `ds4-agent` command line.

Parsing stays import-light: torch loads only for the commands that run a model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def _add_model_commands(sub) -> None:
    model = sub.add_parser("model", help="create random checkpoints; size up presets and checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser(
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
    init.set_defaults(func=_cmd_model_init)
    info = model_sub.add_parser("info", help="parameters, weight and cache bytes of a preset or checkpoint")
    info.add_argument("model", help="a preset name (deepseek-v4-flash, ...) or a checkpoint folder")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_model_info)
    quant = model_sub.add_parser(
        "quantize",
        help="a new checkpoint: FP4 (or FP8) routed experts, FP8 (or bf16) other matrices; streaming",
    )
    quant.add_argument("src", help="a checkpoint folder (bf16/fp32, or DeepSeek's FP8/FP4)")
    quant.add_argument("--out", required=True, help="a new, empty folder")
    quant.add_argument("--experts", choices=["fp4", "int4", "fp8", "bf16"], default="fp4")
    quant.add_argument("--attn", choices=["fp8", "bf16"], default="fp8")
    quant.add_argument("--shard-gb", type=float, default=2.0, help="shard size (memory stays near it)")
    quant.add_argument("--json", action="store_true")
    quant.set_defaults(func=_cmd_model_quantize)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="checkpoint folder")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    _add_device_flags(gen)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--no-stream", action="store_true", help="print the completion at the end only")
    gen.set_defaults(func=_cmd_generate)


def _add_device_flags(parser) -> None:
    parser.add_argument(
        "--device",
        action="append",
        default=None,
        help="where the model runs (default cpu); repeat it to split the layers over several devices "
        "in order, e.g. --device cuda:0 --device cuda:1",
    )
    parser.add_argument(
        "--layer-split",
        type=_layer_split,
        default=None,
        metavar="N,N,...",
        help="with repeated --device: layers per device, e.g. 30,31 (default: balanced by weight bytes)",
    )
    parser.add_argument(
        "--hot-experts",
        type=int,
        default=None,
        metavar="N",
        help="hybrid: routed experts live in host RAM (computed on the CPU), the N most used per layer "
        "also on the layer's device (see `ds4-agent plan` for how many fit)",
    )
    parser.add_argument(
        "--weights",
        choices=["stored", "dequantize"],
        default="stored",
        help="quantized checkpoints: keep FP8/FP4/int4 tensors as stored, dequantized in each matmul "
        "(default), or dequantize them at load",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run decode steps eagerly on a GPU instead of replaying captured CUDA graphs (for debugging)",
    )


def _expert_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f for f in text.split(",") if f and f != "none")
    if any(f not in ("int4", "fp4", "fp8") for f in formats):
        raise argparse.ArgumentTypeError(f"{text!r}: formats are int4, fp4, fp8 (comma-separated) or none")
    return formats


def _layer_split(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer counts, e.g. 30,31") from None


def _device_kwargs(args) -> dict:
    """The engine's placement from --device (once: that device; repeated: a pipeline), --layer-split,
    --hot-experts and --weights."""
    devices = args.device or ["cpu"]
    memory = {"hot_experts": args.hot_experts, "weights": args.weights, "cuda_graphs": args.cuda_graphs}
    if len(devices) == 1 and args.layer_split is None:
        return {"device": devices[0], **memory}
    return {"devices": tuple(devices), "layer_split": args.layer_split, **memory}


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="measure ds4 side by side with a peer")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    engine = bench_sub.add_parser("engine", help="prefill and decode tokens/s: ds4 vs transformers")
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
    engine.set_defaults(func=_cmd_bench_engine)
    long = bench_sub.add_parser("long", help="one long prompt per length: prefill, TTFT, decode, peak memory")
    long.add_argument("--model", required=True, help="checkpoint folder")
    long.add_argument("--tokens", type=_token_counts, default=[8192, 32768], help="lengths, e.g. 8K,32K,128K")
    long.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    long.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    long.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    long.add_argument("--no-peer", action="store_true", help="skip transformers")
    long.add_argument("--json", action="store_true")
    long.set_defaults(func=_cmd_bench_long)
    prefix = bench_sub.add_parser("prefix", help="time to first token: cold, warm prefix cache, disk tier")
    prefix.add_argument("--model", required=True, help="checkpoint folder")
    prefix.add_argument("--prompt-tokens", type=int, default=8192, help="the shared prefix")
    prefix.add_argument("--suffix-tokens", type=int, default=16)
    prefix.add_argument("--runs", type=int, default=3)
    prefix.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    prefix.add_argument("--threads", type=int, default=None)
    prefix.add_argument("--json", action="store_true")
    prefix.set_defaults(func=_cmd_bench_prefix)
    index = bench_sub.add_parser("index", help="full and one-file index times, next to universal-ctags")
    index.add_argument("--repo", default=".")
    index.add_argument("--runs", type=int, default=3)
    index.add_argument("--json", action="store_true")
    index.set_defaults(func=_cmd_bench_index)
    packing = bench_sub.add_parser("pack", help="pack time at 100K and 1M budgets; prefix kept after edits")
    packing.add_argument("--repo", default=".")
    which = packing.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder (its tokenizer.json counts tokens)")
    which.add_argument("--tokenizer", help="a tokenizer.json")
    packing.add_argument("--issue", default="", help="issue text used for ranking")
    packing.add_argument("--runs", type=int, default=3)
    packing.add_argument("--json", action="store_true")
    packing.set_defaults(func=_cmd_bench_pack)
    kern = bench_sub.add_parser(
        "kernels", help="each Triton kernel vs its torch reference at real sizes (GB/s, TFLOP/s; on a GPU)"
    )
    kern.add_argument("--device", default="cuda")
    kern.add_argument("--small", action="store_true", help="toy sizes: checks the script (CPU: interpreter)")
    kern.add_argument("--runs", type=int, default=20)
    kern.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    kern.add_argument("--json", action="store_true")
    kern.set_defaults(func=_cmd_bench_kernels)
    hybrid = bench_sub.add_parser(
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
    hybrid.set_defaults(func=_cmd_bench_hybrid)
    serving = bench_sub.add_parser(
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
    serving.set_defaults(func=_cmd_bench_serve)


def _add_index_commands(sub) -> None:
    index = sub.add_parser("index", help="index a repository (incremental): files, symbols, references")
    index.add_argument("--repo", default=".", help="repository folder (default: the current one)")
    index.add_argument("--db", default=None, help="index database (default: REPO/.ds4/index.db)")
    index.add_argument("--max-file-mb", type=float, default=1.0, help="skip files larger than this")
    index.add_argument("--watch", action="store_true", help="then keep the index fresh until interrupted")
    index.add_argument("--poll", action="store_true", help="with --watch: poll instead of file events")
    index.add_argument("--json", action="store_true")
    index.set_defaults(func=_cmd_index)
    search = sub.add_parser("search", help="search the index for symbols")
    search.add_argument("query")
    search.add_argument("--repo", default=".")
    search.add_argument("--db", default=None)
    search.add_argument("--kind", default=None, help="function, method, class, interface, struct, ...")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=_cmd_search)
    symbols = sub.add_parser("symbols", help="definitions of a file, or of the whole repository")
    symbols.add_argument("path", nargs="?", default=None, help="a file, relative to the repository")
    symbols.add_argument("--repo", default=".")
    symbols.add_argument("--db", default=None)
    symbols.add_argument("--json", action="store_true")
    symbols.set_defaults(func=_cmd_symbols)


def _add_pack(sub) -> None:
    pack = sub.add_parser(
        "pack", help="pack the repository and an issue into one prompt within a token budget"
    )
    pack.add_argument("--repo", default=".")
    pack.add_argument("--db", default=None)
    pack.add_argument("--issue", default="", help="the issue: a file, or - for standard input")
    pack.add_argument("--issue-text", default=None, help="the issue's text itself (instead of --issue)")
    pack.add_argument("--budget", type=int, default=128_000, help="tokens")
    which = pack.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder (its tokenizer.json counts tokens)")
    which.add_argument("--tokenizer", help="a tokenizer.json")
    pack.add_argument("--out", default=None, help="write the prompt here (default: standard output)")
    pack.add_argument("--manifest", default=None, help="write the manifest JSON here")
    pack.add_argument("--format", default="prompt", choices=["prompt", "markdown", "xml", "json"])
    pack.set_defaults(func=_cmd_pack)


def _add_apply(sub) -> None:
    apply = sub.add_parser(
        "apply", help="apply a model's edits (SEARCH/REPLACE or unified diff): all or nothing"
    )
    apply.add_argument("edits", help="a file with the model's answer, or - for standard input")
    apply.add_argument("--repo", default=".")
    apply.add_argument("--check", action="store_true", help="only check that every edit applies and lints")
    apply.add_argument("--no-lint", action="store_true", help="skip the syntax check of edited files")
    apply.set_defaults(func=_cmd_apply)


FIX_DEFAULTS = {
    "model_name": "default",
    "rounds": 3,
    "samples": 1,
    "budget": 32_000,
    "max_tokens": 2048,
    "test_timeout": 600.0,
    "sandbox": True,
}
SETTINGS_HELP = (
    "Unset flags come from REPO/.ds4.toml, then ~/.config/ds4/config.toml (same names, e.g. rounds); "
    "model, endpoint, model_name and sandbox only from the latter."
)


def _add_sandbox_flag(parser) -> None:
    parser.add_argument(
        "--no-sandbox",
        dest="sandbox",
        action="store_false",
        default=None,
        help="run test commands on the bare machine, not in bubblewrap (setting: sandbox = false)",
    )


def _add_backend_flags(parser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="a checkpoint folder: the engine runs in this process")
    where.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8484")
    parser.add_argument("--model-name", default=None, help="with --endpoint: the model to ask for")
    _add_device_flags(parser)


def _add_fix(sub) -> None:
    fix = sub.add_parser(
        "fix",
        help="turn an issue into a tested patch (in git worktrees; your tree is untouched)",
        epilog=SETTINGS_HELP,
    )
    fix.add_argument(
        "issue",
        nargs="?",
        default=None,
        help="the issue: a file, - for standard input, or a GitHub issue URL",
    )
    fix.add_argument("--issue-text", default=None, help="the issue's text itself (instead of ISSUE)")
    fix.add_argument("--repo", default=".")
    _add_backend_flags(fix)
    fix.add_argument("--tokenizer", default=None, help="with --endpoint: a tokenizer.json for exact budgets")
    fix.add_argument(
        "--test-cmd", default=None, help="default: detected (pytest, npm test, go test, cargo test)"
    )
    fix.add_argument(
        "--rounds", type=int, default=None, help=f"feedback rounds (default {FIX_DEFAULTS['rounds']})"
    )
    fix.add_argument("--samples", type=int, default=None, help="candidates (default 1)")
    fix.add_argument(
        "--budget", type=int, default=None, help="prompt tokens for the repository and issue (default 32000)"
    )
    fix.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 2048)")
    fix.add_argument("--test-timeout", type=float, default=None, help="seconds per test run (default 600)")
    _add_sandbox_flag(fix)
    fix.add_argument(
        "--apply", action="store_true", help="write the selected patch to your tree if it applies"
    )
    fix.add_argument("--json", action="store_true")
    fix.set_defaults(func=_cmd_fix)


def _add_swebench(sub) -> None:
    swe = sub.add_parser("swebench", help="SWE-bench predictions and a local evaluation")
    swe_sub = swe.add_subparsers(dest="swebench_command", required=True)
    predict = swe_sub.add_parser(
        "predict", help="run the fix loop on each instance; write predictions (JSONL)", epilog=SETTINGS_HELP
    )
    predict.add_argument("instances")
    predict.add_argument("--repos-dir", required=True)
    predict.add_argument("--out", required=True)
    _add_backend_flags(predict)
    predict.add_argument("--tokenizer", default=None)
    predict.add_argument("--rounds", type=int, default=None)
    predict.add_argument("--samples", type=int, default=None)
    predict.add_argument("--budget", type=int, default=None)
    predict.add_argument("--max-tokens", type=int, default=None)
    predict.add_argument("--test-timeout", type=float, default=None)
    predict.add_argument("--test-cmd", default=None)
    _add_sandbox_flag(predict)
    predict.set_defaults(func=_cmd_swebench_predict)
    evaluate = swe_sub.add_parser(
        "evaluate", help="apply test_patch and each prediction; run FAIL/PASS_TO_PASS"
    )
    evaluate.add_argument("instances")
    evaluate.add_argument("predictions")
    evaluate.add_argument("--repos-dir", required=True)
    evaluate.add_argument("--test-cmd", default=None)
    _add_sandbox_flag(evaluate)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_cmd_swebench_evaluate)


def _add_serve(sub) -> None:
    serve = sub.add_parser(
        "serve", help="the HTTP service: OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8484)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a checkpoint folder: the engine runs in this process")
    where.add_argument(
        "--endpoint", help="or serve in front of an OpenAI-compatible server (vLLM, SGLang, hosted, ds4)"
    )
    serve.add_argument(
        "--model-name", default=None, help="with --endpoint: the upstream model (default: its first)"
    )
    serve.add_argument(
        "--endpoint-key", default=None, help="with --endpoint: its API key (default: $OPENAI_API_KEY)"
    )
    serve.add_argument(
        "--served-name", default=None, help="the model's id in /v1/models (default: folder or upstream name)"
    )
    serve.add_argument(
        "--api-key", action="append", default=[], help="a bearer token (repeatable; also DS4_API_KEYS=k1,k2)"
    )
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a name the Host header may carry besides the bound address and localhost (repeatable; *: any)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="a web origin allowed to call the API, e.g. https://ci.example.com (repeatable; * for any)",
    )
    serve.add_argument(
        "--max-queued-jobs", type=int, default=16, help="fix jobs waiting to run; more get 429 (default 16)"
    )
    serve.add_argument(
        "--rate-limit", type=int, default=0, help="requests a minute per API key (default 0: no limit)"
    )
    serve.add_argument(
        "--repo-root",
        action="append",
        default=[],
        help="repositories under here may be registered (repeatable)",
    )
    serve.add_argument("--jobs-db", default=".ds4/server/jobs.db", help="where fix jobs are kept")
    serve.add_argument("--test-cmd", default=None, help="for fix jobs (else .ds4.toml, else detected)")
    serve.add_argument(
        "--allow-request-test-cmd", action="store_true", help="let requests choose the test command"
    )
    serve.add_argument("--test-timeout", type=float, default=600.0, help="seconds per test run in fix jobs")
    serve.add_argument(
        "--allow-unsandboxed-tests",
        action="store_true",
        help="where bubblewrap cannot run, run fix jobs' tests unsandboxed (default: refuse them)",
    )
    serve.add_argument("--num-cache-blocks", type=int, default=None)
    serve.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + completion (default: the model's)"
    )
    serve.add_argument("--prefix-cache-dir", default=None, help="keep prefix-cache blocks on disk here")
    _add_device_flags(serve)
    serve.set_defaults(func=_cmd_serve)


def _add_lsp(sub) -> None:
    lsp = sub.add_parser(
        "lsp",
        help="the language server (stdio): workspace symbols, ds4.fix, code actions, inline completion",
        epilog="Settings come from the client's initializationOptions: model or endpoint, apiKey, budget, "
        "testCommand (see examples/vscode-ds4 and examples/nvim).",
    )
    lsp.add_argument("--tcp", metavar="HOST:PORT", default=None, help="listen on TCP instead of stdio")
    lsp.add_argument("--log-file", default=None, help="the server log (stdout is the protocol)")
    lsp.set_defaults(func=_cmd_lsp)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="place a model on GPUs (+ host RAM for the routed experts when they do not fit); predict "
        "tokens/s; print the flags that run it",
    )
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds4-agent",
        description="ds4: a local coding-agent backend on DeepSeek-family models run by its own engine.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_generate(sub)
    _add_index_commands(sub)
    _add_pack(sub)
    _add_apply(sub)
    _add_fix(sub)
    _add_swebench(sub)
    _add_serve(sub)
    _add_lsp(sub)
    _add_plan(sub)
    _add_bench(sub)
    return parser


def _cmd_model_init(args) -> int:
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
    return 0


def _cmd_plan(args) -> int:
    from pathlib import Path

    from ds4.engine.config import ModelConfig
    from ds4.engine.planner import Hardware, format_plan, parse_gpus, parse_size, parse_tokens, plan
    from ds4.engine.presets import load_preset

    try:
        gpus = parse_gpus(args.gpu)
        ram = parse_size(args.ram) if args.ram is not None else None
        context = parse_tokens(args.context)
        if Path(args.model).is_dir():
            config = ModelConfig.from_dir(args.model)
        else:
            config = ModelConfig.from_hf(load_preset(args.model), source=f"preset {args.model}")
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hw = Hardware(
        gpu_bandwidth=args.gpu_bandwidth * 1e9,
        gpu_flops=args.gpu_tflops * 1e12,
        pcie_bandwidth=args.pcie_bandwidth * 1e9,
        ram_bandwidth=args.ram_bandwidth * 1e9,
        cpu_flops=args.cpu_tflops * 1e12,
        layer_dispatch=args.layer_dispatch / 1e3,
    )
    result = plan(config, args.model, gpus, ram, context, args.batch, args.experts, args.attn, hw)
    print(json.dumps(result.as_json(), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 1


def _cmd_model_quantize(args) -> int:
    from dataclasses import asdict

    from ds4.engine.errors import EngineError
    from ds4.engine.quantize import quantize_checkpoint

    _require_dir(args.src)
    try:
        report = quantize_checkpoint(args.src, args.out, args.experts, args.attn, int(args.shard_gb * 2**30))
    except (EngineError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    errors = ", ".join(f"{k} {v:.3f}" for k, v in report.max_rel_error.items())
    print(
        f"wrote {args.out}: {report.experts_quantized} expert and {report.matrices_quantized} other matrices "
        f"quantized, {report.kept} tensors kept, {report.shards} shard(s); "
        f"{report.bytes_in / 1e6:,.1f} MB -> {report.bytes_out / 1e6:,.1f} MB; worst relative error {errors}"
    )
    for line in report.kept_shapes:
        print(f"  kept as is: {line}")
    return 0


def _cmd_model_info(args) -> int:
    from pathlib import Path

    from ds4.engine.config import ModelConfig
    from ds4.engine.presets import load_preset
    from ds4.engine.sizing import format_info, model_info

    if Path(args.model).is_dir():
        config = ModelConfig.from_dir(args.model)
    else:
        config = ModelConfig.from_hf(load_preset(args.model), source=f"preset {args.model}")
    info = model_info(config)
    print(json.dumps(info, indent=2) if args.json else format_info(args.model, info))
    return 0


def _cmd_generate(args) -> int:
    from ds4.engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, **_device_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    if args.no_stream:
        print(llm.generate(args.prompt, params)[0].text)
        return 0
    for delta in llm.stream(args.prompt, params):
        print(delta, end="", flush=True)
    print()
    return 0


def _cmd_bench_engine(args) -> int:
    from ds4.engine.bench import bench_engine, format_report

    report = bench_engine(
        args.model,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        runs=args.runs,
        dtype=args.dtype,
        threads=args.threads,
        device=args.device,
        batch=args.batch,
        batch_prompt_tokens=args.batch_prompt_tokens,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


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


def _cmd_bench_long(args) -> int:
    from ds4.engine.long_bench import bench_long, format_long_report

    report = bench_long(args.model, args.tokens, args.device, args.dtype, args.chunk, peer=not args.no_peer)
    print(json.dumps(report, indent=2) if args.json else format_long_report(report))
    return 0


def _cmd_bench_index(args) -> int:
    from ds4.agent.index.bench import bench_index, format_index_report

    _require_dir(args.repo)
    report = bench_index(args.repo, runs=args.runs)
    print(json.dumps(report, indent=2) if args.json else format_index_report(report))
    return 0


def _cmd_bench_pack(args) -> int:
    from ds4.agent.pack_bench import bench_pack, format_pack_report

    _require_dir(args.repo)
    tokenizer = args.tokenizer or os.path.join(args.model, "tokenizer.json")
    report = bench_pack(args.repo, tokenizer, runs=args.runs, issue=_read_issue(args.issue))
    print(json.dumps(report, indent=2) if args.json else format_pack_report(report))
    return 0


def _cmd_bench_kernels(args) -> int:
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch

    from ds4.engine.kernel_bench import bench_kernels, format_report, to_json

    try:
        rates, results = bench_kernels(args.device, args.small, args.runs, not args.no_compile)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else "CPU (Triton interpreter)"
    )
    print(to_json(name, rates, results) if args.json else format_report(name, rates, results))
    return 0


def _cmd_bench_hybrid(args) -> int:
    from ds4.engine.hybrid_bench import bench_hybrid, format_report

    _require_dir(args.model)
    devices = tuple(args.device or ["cpu"])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = bench_hybrid(
        args.model, args.tokens, args.prompt_tokens, args.runs, args.experts, devices, args.dtype
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_bench_serve(args) -> int:
    from ds4.agent.serve_bench import bench_serve, format_serve_report, to_json

    _require_dir(args.model)
    config = {
        k: getattr(args, k)
        for k in ("clients", "requests", "prompt_tokens", "prefix_tokens", "max_tokens", "peer")
    }
    try:
        results = bench_serve(args.model, **config)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(to_json(results, config) if args.json else format_serve_report(results, config))
    return 0


def _cmd_bench_prefix(args) -> int:
    from ds4.engine.bench import bench_prefix, format_prefix_report

    report = bench_prefix(
        args.model,
        prompt_tokens=args.prompt_tokens,
        suffix_tokens=args.suffix_tokens,
        runs=args.runs,
        dtype=args.dtype,
        threads=args.threads,
    )
    print(json.dumps(report, indent=2) if args.json else format_prefix_report(report))
    return 0


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rindexing {done}/{total} changed files", end="" if done < total else "\n", file=sys.stderr)


def _cmd_index(args) -> int:
    from ds4.agent.index.indexer import index_repo

    _require_dir(args.repo)
    report = index_repo(args.repo, args.db, max_bytes=int(args.max_file_mb * (1 << 20)), progress=_progress)
    if args.json:
        print(json.dumps(report.__dict__, indent=2), flush=True)
    else:
        _print_index_report(report)
    if args.watch:
        _watch(args)
    return 0


def _watch(args) -> None:
    import time

    from ds4.agent.index.watcher import RepoWatcher

    def show(report) -> None:
        changed = ", ".join(report.parsed_paths[:5]) + (" ..." if len(report.parsed_paths) > 5 else "")
        print(
            f"updated: {report.parsed} parsed ({changed}), {report.removed} removed in {report.seconds:.2f}s",
            flush=True,
        )

    watcher = RepoWatcher(args.repo, args.db, on_update=show, polling=args.poll)
    watcher.start()
    print(f"watching {os.path.abspath(args.repo)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        watcher.stop()


def _print_index_report(report) -> None:
    langs = ", ".join(f"{name} {n}" for name, n in list(report.languages.items())[:8])
    skipped = ", ".join(f"{reason}: {n}" for reason, n in report.skipped.items()) or "none"
    print(
        f"{report.files} files ({report.parsed} parsed, {report.unchanged} unchanged, "
        f"{report.removed} removed) in {report.seconds:.2f}s\nlanguages: {langs}\n"
        f"{report.definitions} definitions, {report.references} references\nskipped: {skipped}"
    )


def _open_existing_index(args):
    from ds4.agent.index.indexer import default_db_path
    from ds4.agent.index.store import open_index

    _require_dir(args.repo)
    path = args.db or default_db_path(args.repo)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no index at {path}: run `ds4-agent index --repo {args.repo}` first")
    return open_index(path, write=False)


LOOKS_LIKE_PATH = re.compile(r"\S*/\S*|\S+\.(md|txt|rst|json|ya?ml|org)")


def _read_issue(value: str, literal: str | None = None) -> str:
    """The issue from `literal` text, a GitHub URL, standard input (-) or a file; a value that looks like
    a file name but names none is an error (a typo must not become the issue's text)."""
    from ds4.agent.github import fetch_issue, is_issue_url

    if literal is not None:
        return literal
    if is_issue_url(value):
        return fetch_issue(value)
    if value == "-":
        return sys.stdin.read()
    if value and os.path.isfile(value):
        with open(value, encoding="utf-8", errors="replace") as f:
            return f.read()
    if LOOKS_LIKE_PATH.fullmatch(value.strip()):
        raise FileNotFoundError(f"{value}: no such file; to give the issue as text, use --issue-text")
    return value


def _cmd_pack(args) -> int:
    from ds4.agent.index.indexer import default_db_path, index_repo
    from ds4.agent.index.store import open_index
    from ds4.agent.pack import TokenCounter, pack, render

    _require_dir(args.repo)
    tokenizer = args.tokenizer or os.path.join(args.model, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"{tokenizer}: no tokenizer.json to count tokens with")
    index_repo(args.repo, args.db)  # incremental: brings the index up to date first
    db = open_index(args.db or default_db_path(args.repo))
    packed = pack(
        db, args.repo, _read_issue(args.issue, args.issue_text), args.budget, TokenCounter(tokenizer)
    )
    text = render(packed, args.format)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.manifest:
        with open(args.manifest, "w", encoding="utf-8") as f:
            json.dump(packed.manifest(), f, indent=2)
    _print_pack_summary(packed, to=sys.stderr if not args.out else sys.stdout)
    return 0


def _print_pack_summary(packed, to) -> None:
    by_mode = {
        m: [f for f in packed.files if f.mode == m]
        for m in ("whole", "focused", "bodies", "skeleton", "listed")
    }
    print(
        f"{packed.total_tokens:,} of {packed.budget:,} tokens; "
        f"repository prefix {packed.repo_prefix_tokens:,}",
        file=to,
    )
    for mode, files in by_mode.items():
        print(f"  {mode:9} {len(files):6,} files {sum(f.tokens for f in files):10,} tokens", file=to)
    ranked = sorted((f for f in packed.files if f.why), key=lambda f: -f.score)[:5]
    for f in ranked:
        print(f"  top: {f.path} ({f.mode}, score {f.score}): {'; '.join(f.why[:3])}", file=to)
    for s in packed.secrets:
        print(f"  warning: possible {s['kind']} in {s['path']}:{s['line']}", file=to)


def _cmd_fix(args) -> int:
    from pathlib import Path

    from ds4.agent.backends import GenerationParams
    from ds4.agent.config import merge_args
    from ds4.agent.loop import FixConfig, fix
    from ds4.agent.progress import ProgressView

    _require_dir(args.repo)
    filled = merge_args(args, args.repo, FIX_DEFAULTS)
    issue = _read_issue(args.issue or "", args.issue_text)
    if not issue.strip():
        raise ValueError(
            "the issue is empty: give its text, a file, - for standard input, or a GitHub issue URL"
        )
    config = FixConfig(
        Path(args.repo),
        issue,
        args.test_cmd,
        args.rounds,
        args.samples,
        args.budget,
        args.test_timeout,
        args.apply,
        GenerationParams(max_tokens=args.max_tokens),
        sandbox=_sandbox(args),
    )
    if filled.get("test_cmd", Path()).name == ".ds4.toml":
        _show_repo_test_cmd(filled["test_cmd"], args.test_cmd, config.sandbox)
    progress = None if args.json else ProgressView(sys.stderr)
    result = fix(config, _backend(args), progress)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        if result.diff:
            print(result.diff)
        verdict = {
            "resolved": "resolved: the tests pass",
            "unresolved": "unresolved: no candidate passed the tests",
            "error": f"error: {result.message}",
        }[result.status]
        applied = f"; {result.message}" if result.status == "resolved" and result.message else ""
        print(f"{verdict} ({result.rounds} round(s); run folder {result.run_dir}){applied}")
    return 0 if result.status == "resolved" else 1


def _sandbox(args):
    from ds4.agent.sandbox import choose

    return choose(no_sandbox=args.sandbox is False)


def _show_repo_test_cmd(path, command: str, sandbox) -> None:
    """A repository's file chose code to run: say what, and where, before it runs."""
    where = "in the bubblewrap sandbox" if sandbox.name == "bubblewrap" else "WITHOUT a sandbox"
    print(f"ds4-agent: {path} sets the test command; it runs {where}:\n  {command}", file=sys.stderr)


def _backend(args):
    from ds4.agent.backends import LocalBackend, OpenAIBackend

    if args.model:
        return LocalBackend(args.model, **_device_kwargs(args))
    return OpenAIBackend(args.endpoint, args.model_name, tokenizer_file=args.tokenizer)


def _cmd_swebench_predict(args) -> int:
    from ds4.agent.backends import GenerationParams
    from ds4.agent.config import merge_args
    from ds4.agent.loop import FixConfig
    from ds4.agent.swebench import load_jsonl, predict

    merge_args(args, None, FIX_DEFAULTS)
    instances = load_jsonl(args.instances)
    sandbox = _sandbox(args)

    def make_config(repo, issue):
        return FixConfig(
            repo,
            issue,
            args.test_cmd,
            args.rounds,
            args.samples,
            args.budget,
            args.test_timeout,
            generation=GenerationParams(max_tokens=args.max_tokens),
            sandbox=sandbox,
        )

    preds = predict(instances, args.repos_dir, _backend(args), args.out, make_config)
    print(
        f"{len(preds)} predictions written to {args.out} "
        f"({sum(bool(p['model_patch']) for p in preds)} with a patch)"
    )
    return 0


def _cmd_swebench_evaluate(args) -> int:
    from dataclasses import asdict

    from ds4.agent.swebench import evaluate, load_jsonl

    results = evaluate(
        load_jsonl(args.instances),
        load_jsonl(args.predictions),
        args.repos_dir,
        args.test_cmd,
        sandbox=_sandbox(args),
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.instance_id}: {r.status}" + (f" ({r.reason})" if r.reason else ""))
        counts = {s: sum(r.status == s for r in results) for s in ("resolved", "partial", "failed")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def _cmd_serve(args) -> int:
    from ds4.agent.api.app import ServerConfig, check_bind, keys_from_env

    keys = keys_from_env(args.api_key)
    check_bind(args.host, keys)  # before loading anything: a refused bind costs nothing
    from ds4.agent.api.app import create_app
    from ds4.agent.api.lifecycle import serve
    from ds4.agent.api.served import ServedModel

    backend = None
    if args.endpoint:
        from ds4.agent.api.proxied import ProxiedModel
        from ds4.agent.backends import OpenAIBackend

        key = args.endpoint_key or os.environ.get("OPENAI_API_KEY")
        try:
            model = ProxiedModel(args.endpoint, args.model_name, key, args.served_name)
        except ConnectionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        backend = OpenAIBackend(args.endpoint, model.upstream_model, key)
    else:
        engine_kwargs = _device_kwargs(args)
        if args.num_cache_blocks is not None:
            engine_kwargs["num_cache_blocks"] = args.num_cache_blocks
        if args.prefix_cache_dir is not None:
            engine_kwargs["prefix_cache_dir"] = args.prefix_cache_dir
        if args.max_model_len is not None:
            engine_kwargs["max_model_len"] = args.max_model_len
        model = ServedModel(args.model, args.served_name, **engine_kwargs)
    app = create_app(
        model,
        ServerConfig(
            keys,
            int(args.max_body_mb * 1024 * 1024),
            args.rate_limit,
            [os.path.abspath(r) for r in args.repo_root],
            args.jobs_db,
            args.test_cmd,
            args.allow_request_test_cmd,
            args.test_timeout,
            allow_unsandboxed_tests=args.allow_unsandboxed_tests,
            bind=args.host,
            allowed_hosts=args.allowed_host,
            cors_origins=args.cors_origin,
            max_queued_jobs=args.max_queued_jobs,
        ),
        backend,
    )
    print(f"ds4 serving {model.name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(app, args.host, args.port)
    return 0


def _cmd_lsp(args) -> int:
    import logging

    if args.log_file:
        logging.basicConfig(filename=args.log_file, level=logging.INFO)
    from ds4.lsp.server import create_server

    server = create_server()
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            print(f"error: --tcp wants HOST:PORT, got {args.tcp!r}", file=sys.stderr)
            return 2
        server.start_tcp(host, int(port))
    else:
        server.start_io()
    return 0


def _cmd_apply(args) -> int:
    from ds4.agent.patch import PatchError, apply

    _require_dir(args.repo)
    answer = (
        sys.stdin.read() if args.edits == "-" else open(args.edits, encoding="utf-8", errors="replace").read()
    )
    try:
        result = apply(answer, args.repo, write=not args.check, lint=not args.no_lint)
    except PatchError as e:
        print(f"refused: {e}")
        return 1
    verb = "would apply" if args.check else "applied"
    print(
        f"{verb} {len(result.applied)} edit(s) to {len(result.files)} file(s): "
        + ", ".join(f"{p}{' (deleted)' if t is None else ''}" for p, t in sorted(result.files.items()))
    )
    return 0


def _cmd_search(args) -> int:
    from ds4.agent.index.query import search

    rows = search(_open_existing_index(args), args.query, args.kind, args.limit)
    _print_rows(rows, args.json)
    return 0 if rows else 1  # like ripgrep: nothing found is exit 1


def _cmd_symbols(args) -> int:
    from ds4.agent.index.query import symbols

    rows = symbols(_open_existing_index(args), args.path)
    _print_rows(rows, args.json)
    return 0 if rows else 1


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['path']}:{r['line']}: {r['kind']} {r['name']}  {r['signature']}")


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # the CLI boundary: typed, user-facing errors become one line and an exit code
        from ds4.agent.api.jobs import JobsDatabaseError
        from ds4.agent.github import GitHubError
        from ds4.agent.index.store import IndexDatabaseError
        from ds4.agent.loop import FixError
        from ds4.agent.runs import RunFolderError
        from ds4.agent.sandbox import SandboxError
        from ds4.agent.swebench import SweBenchError
        from ds4.engine.errors import EngineError

        known = (
            EngineError,
            ValueError,
            FileNotFoundError,
            IndexDatabaseError,
            JobsDatabaseError,
            SweBenchError,
            GitHubError,
            FixError,
            SandboxError,
            RunFolderError,
        )
        if isinstance(e, known):
            print(f"ds4-agent: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
