"""`ds4-agent bench prefix`: time to first token for a long prompt whose prefix is cold, warm in the
prefix cache, and on the disk tier read by a new process. The engine-vs-transformers bench is engine.py.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ds4.engine.bench.engine import greedy, machine
from ds4.engine.llm import LLM


def _ttft(llm: LLM, tokens: list[int]) -> tuple[float, int]:
    """Seconds to the first generated token, and how many prompt tokens came from the prefix cache."""
    start = time.perf_counter()
    out = llm.generate(tokens, greedy(1))[0]
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
        "machine": machine(),
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
