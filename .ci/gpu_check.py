"""The engine on a GPU machine, one JSON object per line (and the readable reports): per family, fp32
agreement with transformers on the forced-Triton path, then `bench engine` (prefill, decode at batch 1
and batch 32 through the scheduler with CUDA graphs on and off, next to transformers, host syncs and
kernels per token, the device-busy share, the bandwidth floor); then `bench long` (32K and 128K in 8K
chunks: prefill tok/s and peak memory; `--long-1m` adds V4 at 1,048,576 tokens); then `bench kernels`;
last, batch-1 decode with the layers in two stages (a graph per stage against eager steps) and with the
routed experts in host RAM (graphs in pieces around the host's passes against eager steps).
`make gpu-check` runs it after the kernel tests.

usage: gpu_check.py DEVICE WORKDIR [FAMILY ...] [--quick] [--long-1m]   (--quick: tiny presets, a CPU dry run)
"""

import json
import os
import sys
from functools import partial

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE, WORK = sys.argv[1], sys.argv[2]
QUICK = "--quick" in sys.argv
LONG = [2048, 4096] if QUICK else [32768, 131072]
CUDA = DEVICE.startswith("cuda")
if (
    not CUDA
):  # the dry run's forced-Triton step runs the kernels in Triton's interpreter (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")
PRESET = "tiny" if QUICK else "small"
PROMPT, NEW, BATCH, RUNS = (16, 8, 4, 1) if QUICK else (512, 64, 32, 3)
FAMILIES = [a for a in sys.argv[3:] if not a.startswith("--")] or [
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v4",
]

from ds4.engine import LLM  # noqa: E402
from ds4.engine.bench.engine import bench_engine, format_report  # noqa: E402
from ds4.engine.random_checkpoint import init_checkpoint  # noqa: E402
from ds4.kernels import forced  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def fp32_agreement(path):
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.getcwd())
    from tests.conftest import stable_indexer_topk

    llm = LLM(path, device=DEVICE, dtype="float32")
    ids = torch.randint(2, llm.config.vocab_size, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    with torch.inference_mode(), stable_indexer_topk():
        want = hf(torch.tensor([ids], device=DEVICE)).logits[0].float()
    with forced(True):
        got = llm.score(ids).to(want.device)
    err = float((got - want).abs().max() / want.abs().max())
    return dict(max_rel_err=err, argmax_agree=float((got.argmax(-1) == want.argmax(-1)).float().mean()))


def _decode_rates(path, dtype, **engine):
    """Batch-1 decode tok/s with CUDA graphs and with eager steps, (generate(n) - generate(1)) / (n - 1),
    and each engine's report (`figures(llm)`, keyed by graphs or eager)."""
    import time

    from ds4.engine import SamplingParams

    figures = engine.pop("figures")
    report = {}
    for graphs in (True, False):
        llm = LLM(path, dtype=dtype, max_num_seqs=8, cuda_graphs=graphs, **engine)
        vocab = llm.config.vocab_size
        prompt = torch.randint(2, vocab, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
        runs = []
        for n in (1, NEW, 1, NEW):
            start = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            runs.append(time.perf_counter() - start)
        name = "graphs" if llm.runner.graphs is not None else "eager"
        report[f"{name}_tok_s"] = (NEW - 1) / max(runs[3] - runs[2], 1e-9)
        report |= {f"{name}_{key}": value for key, value in figures(llm).items()}
    return report


def pipeline_decode(path, dtype):
    """Decode at batch 1 with the layers split in two stages (on two cards where there are two, else both
    on one): a graph per stage against eager steps."""
    two = CUDA and torch.cuda.device_count() > 1
    devices = (DEVICE, "cuda:1") if two else (DEVICE, DEVICE)
    handoffs = lambda llm: dict(handoff_bytes_per_token=llm.runner.handoffs.last_num_bytes)  # noqa: E731
    return dict(devices=list(devices)) | _decode_rates(path, dtype, devices=devices, figures=handoffs)


def hybrid_decode(path, dtype):
    """Decode at batch 1 with the routed experts in host RAM, two of each layer's cached on the card: the
    decode graphs in pieces around each MoE layer's host pass against eager steps."""

    def figures(llm):
        graphs, tiered = llm.runner.graphs, llm.runner.tiered
        pieces = graphs.graphs[1, 0].pieces if graphs is not None else 0
        return dict(
            pieces=pieces, cpu_kernel=all(t.use_cpu_kernel for t in tiered), overlaps=tiered[0].overlaps
        )

    return _decode_rates(path, dtype, device=DEVICE, hot_experts=2, figures=figures)


def step(name, fam, run, show=None):
    """One report line for `run()`'s figures (and `show`'s readable report), or for its failure: the rest
    of the check still runs. The card's cache is emptied after."""
    try:
        report = run()
        emit(step=name, family=fam, **report)
        if show is not None:
            print(show(report), flush=True)
    except Exception as e:
        emit(step=name, family=fam, error=f"{type(e).__name__}: {e}"[:400])
    if CUDA:
        torch.cuda.empty_cache()


def family(fam):
    from ds4.engine.bench.long import bench_long, format_long_report

    path = os.path.join(WORK, fam)
    if not os.path.exists(os.path.join(path, "config.json")):
        init_checkpoint(fam, PRESET, path, seed=0)
    dtype = "bfloat16" if CUDA else "float32"
    step("fp32_triton_vs_transformers", fam, partial(fp32_agreement, path))
    engine = partial(
        bench_engine, path, PROMPT, NEW, RUNS, dtype, device=DEVICE, batch=BATCH, batch_prompt_tokens=PROMPT
    )
    step("bench_engine", fam, engine, format_report)
    lengths = LONG + ([1 << 20] if "--long-1m" in sys.argv and fam == "deepseek_v4" else [])
    chunk = 512 if QUICK else 8192
    long = partial(bench_long, path, lengths, DEVICE, dtype, chunk=chunk, decode_tokens=4, peer=False)
    step("bench_long", fam, long, format_long_report)


def main():
    for fam in FAMILIES:
        family(fam)
    if CUDA:
        from ds4.engine.bench.kernels import bench_kernels, to_json

        rates, results = bench_kernels(DEVICE, small=False, runs=20, compile_refs=False)
        emit(step="bench_kernels", report=json.loads(to_json(torch.cuda.get_device_name(), rates, results)))
    for fam in FAMILIES:  # last: the newest figures, the first a short device budget gives up
        dtype = "bfloat16" if CUDA else "float32"
        if fam != "deepseek_v32":
            step("pipeline_decode", fam, partial(pipeline_decode, os.path.join(WORK, fam), dtype))
        if fam == "deepseek_v3":
            step("hybrid_decode", fam, partial(hybrid_decode, os.path.join(WORK, fam), dtype))


if __name__ == "__main__":
    main()
