"""`ds4-agent bench engine`: ds4 and the transformers library on the same checkpoint, device and thread
count, in one process: prefill tokens/s, greedy decode tokens/s at batch 1 and for a batch of prompts
(ds4 through its scheduler, transformers' batched `generate`), as medians over several runs, with
their ratios; per decoded token, ds4's host synchronisations, its aten ops (CPU) or kernels and
device-busy share (CUDA), and the memory-bandwidth floor of decode (bytes of active weights per token /
measured read bandwidth). On CUDA, ds4 runs with its decode graphs and again without.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ds4.engine.llm import LLM
from ds4.engine.sampler import SamplingParams
from ds4.engine.syncs import SyncRecorder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn` takes, the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


CPU = torch.device("cpu")


def median_time(fn, runs: int, device: torch.device = CPU) -> float:
    """Median seconds of `runs` calls of `fn`, after one warm-up call."""
    fn()  # warm-up
    return statistics.median(timed(fn, device) for _ in range(runs))


def _prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def machine() -> str:
    """This machine in a line: architecture, processor and CPU count."""
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def decode_rate(llm: LLM, prompts: list[list[int]], new: int, runs: int) -> float:
    """Decode tokens/s through the engine: the tokens of the steps after every prompt has its first one,
    over their time (median of `runs`), so no prefill has to be subtracted out."""
    device = llm.runner.device
    engine = llm.engine
    llm.generate(prompts, greedy(2))  # warm-up: the prompts are in the prefix cache from here on
    rates = []
    for _ in range(runs):
        requests = [engine.add_request(p, greedy(new + 1)) for p in prompts]
        outs = [engine.output(r) for r in requests]
        while any(not o.token_ids and o.finish_reason is None for o in outs):
            engine.step()
        _sync(device)
        start, before = time.perf_counter(), sum(len(o.token_ids) for o in outs)
        while engine.has_unfinished:
            engine.step()
        _sync(device)
        rates.append((sum(len(o.token_ids) for o in outs) - before) / (time.perf_counter() - start))
        for r in requests:
            engine.release(r)
    return statistics.median(rates)


class _StepClock:
    """A transformers logits processor that notes the time of each generation step (after syncing)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _hf_decode_rate(generate, batch: int, new: int, runs: int, device: torch.device) -> float:
    """Decode tokens/s of transformers' generate: from the step after the prefill to the last, as noted by
    a logits processor (median of `runs`)."""
    generate(2, None)  # warm-up
    gaps = []
    for _ in range(runs):
        clock = _StepClock(device)
        generate(new + 1, clock)
        gaps.append(clock.times[new] - clock.times[0])  # `new` decode forwards between the two
    return batch * new / statistics.median(gaps)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _step_profile(llm: LLM, prompt: list[int], steps: int, rate: float) -> dict:
    """Per decoded token at batch 1: host syncs (every op that waits for the device, the copy of the ids
    back included), then aten ops (CPU) or kernels, GPU time and the device's share of a step (CUDA)."""
    engine, device = llm.engine, llm.runner.device
    engine.add_request(prompt, greedy(2 * steps + 2))
    engine.step()  # the prompt
    engine.step()
    recorder = SyncRecorder()
    with recorder:
        for _ in range(steps):
            engine.step()
    row = {"host_syncs_per_token": len(recorder.found) / steps}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            _sync(device)
        kernels = [e for e in prof.key_averages() if "CUDA" in str(getattr(e, "device_type", ""))]
        gpu_s = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
        row.update(
            kernels_per_token=sum(e.count for e in kernels) / steps,
            gpu_ms_per_token=1e3 * gpu_s,
            device_busy_share=gpu_s * rate,  # of an unprofiled step
        )
    elif getattr(llm.runner.decode_forward, "compile_seconds", None) is None:  # compiled: no aten ops
        counter = _OpCounter()
        with counter:
            for _ in range(steps):
                engine.step()
        row["aten_ops_per_token"] = counter.count / steps
    while engine.has_unfinished:
        engine.step()
    return row


def _ds4(llm: LLM, prompt: list[int], batch_prompts: list[list[int]], decode_tokens: int, runs: int) -> dict:
    device = llm.runner.device
    prefill = median_time(lambda: llm.generate([prompt], greedy(1)), runs, device)
    rate = decode_rate(llm, [prompt], decode_tokens, runs)
    batched = decode_rate(llm, batch_prompts, decode_tokens, runs)
    return {
        "prefill_tokens_per_s": len(prompt) / prefill,
        "decode_tokens_per_s": rate,
        "batch_decode_tokens_per_s": batched,
        **_step_profile(llm, prompt, min(16, decode_tokens), rate),
    }


def _transformers(model, prompt: list[int], batch_prompts: list[list[int]], decode_tokens: int, runs: int):
    device = next(model.parameters()).device
    ids, batch_ids = torch.tensor([prompt], device=device), torch.tensor(batch_prompts, device=device)

    @torch.inference_mode()
    def generate(inputs, n, clock):
        from transformers import LogitsProcessorList

        mask = torch.ones_like(inputs)  # no padding: every prompt has the same length
        return model.generate(
            inputs,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock] if clock else []),
        )

    @torch.inference_mode()
    def prefill():
        return model(ids, logits_to_keep=1)

    return {
        "prefill_tokens_per_s": len(prompt) / median_time(prefill, runs, device),
        "decode_tokens_per_s": _hf_decode_rate(
            lambda n, clock: generate(ids, n, clock), 1, decode_tokens, runs, device
        ),
        "batch_decode_tokens_per_s": _hf_decode_rate(
            lambda n, clock: generate(batch_ids, n, clock), len(batch_prompts), decode_tokens, runs, device
        ),
    }


def read_bandwidth(nbytes: int = 256 << 20, runs: int = 5, device: str = "cpu") -> float:
    """Measured bytes/s of streaming a tensor far larger than the caches (a sum): what decode's weight
    reads can reach at best on this machine."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    src.sum()
    best = min(median_time(src.sum, 1, dev) for _ in range(runs))  # a bound: the best run
    return nbytes / best


def active_bytes_per_token(llm: LLM) -> int:
    """Weights one decode step reads: everything but unrouted experts and unused embedding rows."""
    cfg, total = llm.config, 0
    for name, p in llm.runner.model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "embed.weight":
            nbytes //= cfg.vocab_size  # one row
        elif ".ffn.experts." in name:
            nbytes = nbytes * cfg.num_experts_per_tok // cfg.n_routed_experts
        total += nbytes
    return total


def bench_engine(
    model_dir: str,
    prompt_tokens: int = 256,
    decode_tokens: int = 32,
    runs: int = 5,
    dtype: str = "float32",
    threads: int | None = None,
    device: str = "cpu",
    batch: int = 32,
    batch_prompt_tokens: int = 64,
) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ValueError("bench engine compares against transformers: pip install 'ds4-agent[dev]'") from e
    if threads:
        torch.set_num_threads(threads)
    kwargs = dict(
        device=device, dtype=dtype, max_num_seqs=batch, max_num_batched_tokens=max(2048, prompt_tokens)
    )
    llm = LLM(model_dir, **kwargs)
    prompt = _prompts(llm.config.vocab_size, 1, prompt_tokens)[0]
    batch_prompts = _prompts(llm.config.vocab_size, batch, batch_prompt_tokens, seed=1)
    results = {"ds4": _ds4(llm, prompt, batch_prompts, decode_tokens, runs)}
    graphs = llm.runner.graphs is not None
    if graphs:  # the same engine without its decode graphs
        captured = llm.runner.graphs
        results["ds4"].update(
            cuda_graphs=captured.buckets,
            graph_capture_s=captured.capture_seconds,
            graph_memory_mb=captured.memory_bytes / 2**20,
        )
        eager = LLM(model_dir, cuda_graphs=False, **kwargs)
        results["ds4_eager"] = _ds4(eager, prompt, batch_prompts, decode_tokens, runs)
        del eager
    compiled = getattr(llm.runner.decode_forward, "compile_seconds", None)
    if compiled is not None:  # the same engine with its decode step uncompiled
        results["ds4"].update(compile_s=compiled, compile_failure=llm.runner.decode_forward.failure)
        eager = LLM(model_dir, compile_decode=False, **kwargs)
        results["ds4_eager"] = _ds4(eager, prompt, batch_prompts, decode_tokens, runs)
        del eager
    active = active_bytes_per_token(llm)
    del llm
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    results["transformers"] = _transformers(hf, prompt, batch_prompts, decode_tokens, runs)
    del hf
    bandwidth = read_bandwidth(device=device)
    floor = bandwidth / active
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "batch_decode_tokens_per_s")
    return {
        "model": str(model_dir),
        "dtype": dtype,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "batch": batch,
        "batch_prompt_tokens": batch_prompt_tokens,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "torch": torch.__version__,
        **results,
        "ratio": {k: results["ds4"][k] / results["transformers"][k] for k in keys},
        "floor": {
            "active_bytes_per_token": active,
            "read_bandwidth_gb_s": bandwidth / 1e9,
            "decode_tokens_per_s": floor,
            "ds4_fraction_of_floor": results["ds4"]["decode_tokens_per_s"] / floor,
        },
    }


def format_report(r: dict) -> str:
    lines = [
        f"model {r['model']}  dtype {r['dtype']}  device {r['device']}  prompt {r['prompt_tokens']}  "
        f"decode {r['decode_tokens']}  batch {r['batch']} x {r['batch_prompt_tokens']}  runs {r['runs']} "
        f"(medians)  threads {r['threads']}  {r['machine']}  torch {r['torch']}",
        f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>14}{'batch tok/s':>13}{'syncs/tok':>11}{'ops/tok':>9}",
    ]
    for name in ("ds4", "ds4_eager", "transformers"):
        if name not in r:
            continue
        row = r[name]
        ops = row.get("kernels_per_token", row.get("aten_ops_per_token"))
        syncs = row.get("host_syncs_per_token")
        lines.append(
            f"{name:14}{row['prefill_tokens_per_s']:15.1f}{row['decode_tokens_per_s']:14.1f}"
            f"{row['batch_decode_tokens_per_s']:13.1f}"
            + (f"{syncs:11.2f}" if syncs is not None else "")
            + (f"{ops:9.0f}" if ops is not None else f"{'-':>9}" if syncs is not None else "")
            + (f"  device busy {100 * row['device_busy_share']:.0f}%" if "device_busy_share" in row else "")
        )
    ds4 = r["ds4"]
    if "compile_s" in ds4:
        failed = ds4.get("compile_failure")
        lines.append(
            f"ds4's decode step compiled in {ds4['compile_s']:.1f} s (ds4_eager: the same engine uncompiled)"
            + (f"; then fell back to eager: {failed}" if failed else "")
        )
    ratio = r["ratio"]
    lines.append(
        f"{'ds4 / peer':14}{ratio['prefill_tokens_per_s']:14.2f}x{ratio['decode_tokens_per_s']:13.2f}x"
        f"{ratio['batch_decode_tokens_per_s']:12.2f}x"
    )
    f = r["floor"]
    lines.append(
        f"decode floor: {f['active_bytes_per_token'] / 1e6:.1f} MB active weights/token at "
        f"{f['read_bandwidth_gb_s']:.1f} GB/s = {f['decode_tokens_per_s']:.0f} tok/s; "
        f"ds4 reaches {100 * f['ds4_fraction_of_floor']:.0f}% of it"
    )
    return "\n".join(lines)
