"""The flags several commands share (where the model runs, which backend, the sandbox) and what they turn
into; each command's own flags live beside its handler."""

from __future__ import annotations

import argparse


def add_device_flags(parser) -> None:
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
    parser.add_argument(
        "--no-compile",
        dest="compile_decode",
        action="store_false",
        default=None,  # unset: the engine's default (DS4_COMPILE)
        help="run decode steps on the CPU uncompiled instead of compiling the step at the first one "
        "(which takes tens of seconds; DS4_COMPILE=0 sets this default)",
    )


def _layer_split(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer counts, e.g. 30,31") from None


def device_kwargs(args) -> dict:
    """The engine's placement from --device (once: that device; repeated: a pipeline), --layer-split,
    --hot-experts and --weights."""
    devices = args.device or ["cpu"]
    memory = {
        "hot_experts": args.hot_experts,
        "weights": args.weights,
        "cuda_graphs": args.cuda_graphs,
    }
    if args.compile_decode is False:
        memory["compile_decode"] = False
    if len(devices) == 1 and args.layer_split is None:
        return {"device": devices[0], **memory}
    return {"devices": tuple(devices), "layer_split": args.layer_split, **memory}


def add_backend_flags(parser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="a checkpoint folder: the engine runs in this process")
    where.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8484")
    parser.add_argument(
        "--model-name",
        default=None,
        help="with --endpoint: the model to ask for (default: the server's first)",
    )
    add_device_flags(parser)


def backend(args):
    """The backend --model (the engine in this process) or --endpoint names, ready to be asked: the engine
    loaded, or the endpoint probed (reachable, key accepted, model served or chosen) before any test runs."""
    from ds4.agent.backends import LocalBackend, OpenAIBackend

    if args.model:
        return LocalBackend(args.model, **device_kwargs(args))
    chosen = OpenAIBackend(args.endpoint, args.model_name, tokenizer_file=args.tokenizer)
    chosen.probe()
    return chosen


def add_sandbox_flag(parser) -> None:
    parser.add_argument(
        "--no-sandbox",
        dest="sandbox",
        action="store_false",
        default=None,
        help="run test commands on the bare machine, not in bubblewrap (setting: sandbox = false)",
    )


def sandbox(args):
    from ds4.agent.sandbox import choose

    return choose(no_sandbox=args.sandbox is False)
