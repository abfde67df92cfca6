"""`ds4-agent bench engine`: prefill and greedy-decode throughput of ds4 and of the transformers library
on the same checkpoint, machine and thread count, as medians over several runs, with their ratio and
the memory-bandwidth floor of decode (bytes of active weights per token / measured read bandwidth).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from ds4.engine.context import SeqSlice
from ds4.engine.llm import LLM


def _median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ds4_runs(llm: LLM, prompt: list[int], decode_tokens: int):
    runner = llm.runner

    def prefill():
        cache = runner.new_cache(1, len(prompt) + decode_tokens + 1)
        logits = runner.step(prompt, [SeqSlice(0, 0, len(prompt), 0)], cache)
        return cache, int(logits[0].argmax())

    def decode():
        cache, token = prefill()
        start = time.perf_counter()
        for i in range(decode_tokens):
            logits = runner.step([token], [SeqSlice(0, len(prompt) + i, 1, 0)], cache)
            token = int(logits[0].argmax())
        return time.perf_counter() - start

    return prefill, decode


def _hf_runs(model, prompt: list[int], decode_tokens: int):
    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def prefill():
        out = model(ids, use_cache=True, logits_to_keep=1)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def decode():
        cache, token = prefill()
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        return time.perf_counter() - start

    return prefill, decode


def _median_decode(decode, runs: int) -> float:
    decode()
    return statistics.median(decode() for _ in range(runs))


def read_bandwidth(nbytes: int = 256 << 20, runs: int = 5) -> float:
    """Measured bytes/s of streaming a tensor far larger than the caches (a sum): what decode's weight
    reads can reach at best on this machine."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    src.sum()
    best = min(_median_time(src.sum, 1) for _ in range(runs))  # a bound: the best run
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
) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ValueError("bench engine compares against transformers: pip install 'ds4-agent[dev]'") from e
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(model_dir, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, llm.config.vocab_size, (prompt_tokens,), generator=gen).tolist()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    results = {}
    for name, (prefill, decode) in (
        ("ds4", _ds4_runs(llm, prompt, decode_tokens)),
        ("transformers", _hf_runs(hf, prompt, decode_tokens)),
    ):
        prefill_s = _median_time(prefill, runs)
        decode_s = _median_decode(decode, runs)
        results[name] = {
            "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens_per_s": decode_tokens / decode_s,
        }
    bandwidth = read_bandwidth()
    active = active_bytes_per_token(llm)
    floor = bandwidth / active
    return {
        "model": str(model_dir),
        "dtype": dtype,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "torch": torch.__version__,
        **results,
        "ratio": {k: results["ds4"][k] / results["transformers"][k] for k in results["ds4"]},
        "floor": {
            "active_bytes_per_token": active,
            "read_bandwidth_gb_s": bandwidth / 1e9,
            "decode_tokens_per_s": floor,
            "ds4_fraction_of_floor": results["ds4"]["decode_tokens_per_s"] / floor,
        },
    }


def format_report(r: dict) -> str:
    lines = [
        f"model {r['model']}  dtype {r['dtype']}  prompt {r['prompt_tokens']}  decode {r['decode_tokens']}  "
        f"runs {r['runs']} (medians)  threads {r['threads']}  {r['machine']}  torch {r['torch']}",
        f"{'':14}{'prefill tok/s':>16}{'decode tok/s':>16}",
    ]
    for name in ("ds4", "transformers"):
        lines.append(
            f"{name:14}{r[name]['prefill_tokens_per_s']:16.1f}{r[name]['decode_tokens_per_s']:16.1f}"
        )
    lines.append(
        f"{'ds4 / peer':14}{r['ratio']['prefill_tokens_per_s']:16.2f}x"
        f"{r['ratio']['decode_tokens_per_s']:15.2f}x"
    )
    f = r["floor"]
    lines.append(
        f"decode floor: {f['active_bytes_per_token'] / 1e6:.1f} MB active weights/token at "
        f"{f['read_bandwidth_gb_s']:.1f} GB/s = {f['decode_tokens_per_s']:.0f} tok/s; "
        f"ds4 reaches {100 * f['ds4_fraction_of_floor']:.0f}% of it"
    )
    return "\n".join(lines)


def _ttft(llm: LLM, tokens: list[int]) -> tuple[float, int]:
    """Seconds to the first generated token, and how many prompt tokens came from the prefix cache."""
    from ds4.engine.sampler import SamplingParams

    start = time.perf_counter()
    out = llm.generate(tokens, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0]
    return time.perf_counter() - start, out.num_cached_tokens


_DISK_RUN = """
import json, sys, time
from ds4.engine import LLM, SamplingParams
model, tier, tokens = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
llm = LLM(model, prefix_cache_dir=tier)
start = time.perf_counter()
out = llm.generate(tokens, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0]
print(json.dumps({"seconds": time.perf_counter() - start, "cached": out.num_cached_tokens}))
"""


def bench_prefix(
    model_dir: str,
    prompt_tokens: int = 8192,
    suffix_tokens: int = 16,
    runs: int = 3,
    dtype: str = "float32",
    threads: int | None = None,
) -> dict:
    """Time to first token for a prompt whose prefix is cold, warm in memory, and on disk in a new process."""
    import json
    import subprocess
    import sys
    import tempfile

    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    probe = LLM(model_dir, dtype=dtype, enable_prefix_caching=False, num_cache_blocks=1)
    vocab = probe.config.vocab_size
    del probe
    prefix = torch.randint(2, vocab, (prompt_tokens,), generator=gen).tolist()

    def suffix():
        return torch.randint(2, vocab, (suffix_tokens,), generator=gen).tolist()

    cold, warm, disk = [], [], []
    with tempfile.TemporaryDirectory() as tier:
        for run in range(runs):
            run_tier = f"{tier}/{run}"
            llm = LLM(model_dir, dtype=dtype, prefix_cache_dir=run_tier)
            seconds, cached = _ttft(llm, prefix + suffix())
            cold.append(seconds)
            assert cached == 0, cached
            seconds, cached = _ttft(llm, prefix + suffix())
            warm.append(seconds)
            warm_cached = cached
            del llm
            done = subprocess.run(
                [sys.executable, "-c", _DISK_RUN, model_dir, run_tier],
                input=json.dumps(prefix + suffix()),
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            disk.append(result["seconds"])
            disk_cached = result["cached"]
    med = {name: statistics.median(v) for name, v in (("cold", cold), ("warm", warm), ("disk", disk))}
    return {
        "model": str(model_dir),
        "dtype": dtype,
        "prompt_tokens": prompt_tokens + suffix_tokens,
        "prefix_tokens": prompt_tokens,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "ttft_s": med,
        "cached_tokens": {"warm": warm_cached, "disk": disk_cached},
        "speedup": {"warm": med["cold"] / med["warm"], "disk": med["cold"] / med["disk"]},
    }


def format_prefix_report(r: dict) -> str:
    t, c, x = r["ttft_s"], r["cached_tokens"], r["speedup"]
    pad = " " * 21
    return "\n".join(
        [
            f"model {r['model']}  dtype {r['dtype']}  prompt {r['prompt_tokens']} tokens "
            f"({r['prefix_tokens']} shared)  runs {r['runs']} (medians)  threads {r['threads']}",
            f"machine {r['machine']}",
            f"time to first token: cold {t['cold'] * 1e3:,.0f} ms",
            f"{pad}warm {t['warm'] * 1e3:,.0f} ms ({x['warm']:.1f}x faster, {c['warm']} tokens reused)",
            f"{pad}disk {t['disk'] * 1e3:,.0f} ms ({x['disk']:.1f}x faster, "
            f"{c['disk']} tokens from the disk tier, new process)",
        ]
    )
