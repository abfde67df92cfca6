"""The engine on a GPU machine, one JSON object per line: fp32 agreement with transformers (forced
Triton path), host syncs per decode step, decode tokens/s at batch 1 and through the scheduler at batch
32 with CUDA graphs on and off, kernels per token and the GPU-busy share, next to transformers and the
bandwidth floor; then `bench kernels`. `make gpu-check` runs it after the kernel tests.

usage: gpu_check.py DEVICE WORKDIR [--quick]   (--quick: tiny presets and sizes, for a CPU dry run)
"""

import json
import os
import sys
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE, WORK = sys.argv[1], sys.argv[2]
QUICK = "--quick" in sys.argv
CUDA = DEVICE.startswith("cuda")
PRESET = "tiny" if QUICK else "small"
PROMPT, NEW, BATCH, BATCH_NEW = (16, 8, 4, 4) if QUICK else (512, 128, 32, 64)

from ds4.engine import LLM, SamplingParams  # noqa: E402
from ds4.engine.bench import active_bytes_per_token  # noqa: E402
from ds4.engine.random_checkpoint import init_checkpoint  # noqa: E402
from ds4.kernels import forced  # noqa: E402

BW = 0.0  # measured copy bandwidth, bytes/s


def emit(**kw):
    print(json.dumps(kw), flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def prompts(vocab, count, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(count)]


def decode_rate(llm, batch, length, new):
    """Decode tokens/s through the engine: generate(new) minus generate(1) (the prefill and first token)."""
    ps = prompts(llm.config.vocab_size, batch, length)
    llm.generate(ps, greedy(2))  # warm-up
    timings = []
    for n in (1, new):
        sync()
        t = time.perf_counter()
        llm.generate(ps, greedy(n))
        sync()
        timings.append(time.perf_counter() - t)
    return batch * (new - 1) / (timings[1] - timings[0])


def step_profile(llm, steps=16):
    """Host syncs (torch's sync debug mode), kernels and GPU-busy time per decode step through the engine."""
    eng = llm.engine
    eng.add_request(prompts(llm.config.vocab_size, 1, PROMPT)[0], greedy(steps + 4))
    eng.step()
    eng.step()
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(steps):
            eng.step()
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught) / steps
    row = dict(host_syncs_per_token=syncs)
    if CUDA:
        from torch.profiler import ProfilerActivity, profile

        eng.add_request(prompts(llm.config.vocab_size, 1, PROMPT, seed=1)[0], greedy(steps + 4))
        eng.step()
        eng.step()
        sync()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            sync()
        wall = time.perf_counter() - t
        ev = prof.key_averages()
        dev = [e for e in ev if "CUDA" in str(getattr(e, "device_type", ""))]
        busy = sum(e.self_device_time_total for e in dev) / 1e6
        row.update(
            kernels_per_token=round(sum(e.count for e in dev) / steps, 1),
            gpu_ms_per_token=round(1000 * busy / steps, 3),
            profiled_ms_per_token=round(1000 * wall / steps, 3),
        )
    while eng.has_unfinished:
        eng.step()
    return row


def bandwidth():
    if not CUDA:
        from ds4.engine.bench import read_bandwidth

        return read_bandwidth()
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * 10 * x.numel() / (time.perf_counter() - t)  # read + write


def hf_decode_rate(path, dtype):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()
    ids = torch.tensor(prompts(hf.config.vocab_size, 1, PROMPT), device=DEVICE)
    timings = []
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for n in (1, NEW):
            sync()
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            sync()
            timings.append(time.perf_counter() - t)
    return (NEW - 1) / (timings[1] - timings[0])


def fp32_agreement(path):
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.getcwd())
    from tests.conftest import stable_indexer_topk

    llm = LLM(path, device=DEVICE, dtype="float32")
    ids = prompts(llm.config.vocab_size, 1, 300, seed=3)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    with torch.inference_mode(), stable_indexer_topk():
        want = hf(torch.tensor([ids], device=DEVICE)).logits[0].float()
    with forced(True):
        got = llm.score(ids).to(want.device)
    err = float((got - want).abs().max() / want.abs().max())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return dict(max_rel_err=err, argmax_agree=agree)


def family(fam):
    path = os.path.join(WORK, fam)
    if not os.path.exists(os.path.join(path, "config.json")):
        init_checkpoint(fam, PRESET, path, seed=0)
    try:
        emit(step="fp32_triton_vs_transformers", family=fam, **fp32_agreement(path))
    except Exception as e:  # a report line per failure: the rest of the check still runs
        emit(step="fp32_triton_vs_transformers", family=fam, error=f"{type(e).__name__}: {e}"[:400])
    dtype = "bfloat16" if CUDA else "float32"
    batch = BATCH if fam != "deepseek_v4" else max(1, BATCH // 4)  # V4's eager batches are slow yet
    for graphs in (True, False):
        try:
            t = time.perf_counter()
            llm = LLM(
                path, device=DEVICE, dtype=dtype, max_num_seqs=batch, cuda_graphs=graphs, cache_memory_gb=4.0
            )
            start_s = time.perf_counter() - t
            captured = llm.runner.graphs is not None
            if graphs and not captured:
                graphs = None  # nothing captured: the eager row below says it all
            row = dict(
                family=fam,
                dtype=dtype,
                cuda_graphs=captured,
                engine_start_s=round(start_s, 2),
                floor_tok_s=round(BW / active_bytes_per_token(llm)),
            )
            if captured:
                g = llm.runner.graphs
                row.update(capture_s=round(g.capture_seconds, 2), graph_mb=round(g.memory_bytes / 2**20, 1))
            row["batch1_tok_s"] = round(decode_rate(llm, 1, PROMPT, NEW), 1)
            row[f"batch{batch}_tok_s"] = round(decode_rate(llm, batch, PROMPT, BATCH_NEW), 1)
            row.update(step_profile(llm))
            if CUDA:  # the device's share of an unprofiled batch-1 step
                row["gpu_busy_share"] = round(row["gpu_ms_per_token"] * row["batch1_tok_s"] / 1000, 3)
            emit(step="decode", **row)
            del llm
        except Exception as e:
            emit(step="decode", family=fam, cuda_graphs=graphs, error=f"{type(e).__name__}: {e}"[:400])
        if CUDA:
            torch.cuda.empty_cache()
        if graphs is None:
            break
    try:
        emit(
            step="decode_transformers",
            family=fam,
            batch1_tok_s=round(hf_decode_rate(path, getattr(torch, dtype)), 1),
        )
    except Exception as e:
        emit(step="decode_transformers", family=fam, error=f"{type(e).__name__}: {e}"[:400])


def main():
    global BW
    BW = bandwidth()
    emit(
        step="machine",
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        torch=torch.__version__,
        copy_gb_per_s=round(BW / 1e9, 1),
    )
    family("deepseek_v3")
    if CUDA:
        from ds4.engine.kernel_bench import bench_kernels, to_json

        rates, results = bench_kernels(DEVICE, small=False, runs=20, compile_refs=False)
        emit(step="bench_kernels", report=json.loads(to_json(torch.cuda.get_device_name(), rates, results)))
    family("deepseek_v32")
    family("deepseek_v4")


if __name__ == "__main__":
    main()
