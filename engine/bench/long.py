"""`ds4-agent bench long`: one long prompt per length through the engine (chunked prefill, the prefix
cache), next to transformers' one forward pass where it fits: prefill tokens/s, time to first token,
decode tokens/s at that context, and peak memory (CUDA: the allocator's peak; CPU: the process's peak
resident set growth, and the activation workspace counted op by op on a second cold prompt, next to the
one planned from the config). Transformers is reported as "out of memory" where its scores alone would
not fit.
"""

from __future__ import annotations

import torch

from ds4.engine.activations import ActivationPeak
from ds4.engine.bench.engine import decode_rate, greedy, timed
from ds4.engine.llm import LLM
from ds4.engine.workspace import prefill_workspace


class _Peak:
    """Peak memory of what runs inside: the CUDA allocator's, or on the CPU the growth of the process's
    resident set to its high-water mark, which Linux resets on entry (/proc/self/clear_refs), so each
    length is measured on its own rather than against the peak an earlier one left."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = _status_bytes("VmHWM") - self.start


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _ds4_row(llm: LLM, ids: list[int], decode_tokens: int) -> dict:
    device = llm.runner.device
    with _Peak(device) as peak:
        first = timed(lambda: llm.generate([ids], greedy(1)), device)  # cold: the whole prompt
    cached = timed(lambda: llm.generate([ids], greedy(1)), device)  # the prefix from the cache
    row = {
        "prefill_tokens_per_s": len(ids) / first,
        "ttft_s": first,
        "ttft_cached_s": cached,
        "decode_tokens_per_s": decode_rate(llm, [ids], decode_tokens, 1),
        "peak_gb": peak.bytes / 1e9,
    }
    if device.type == "cpu":  # the RSS moves with the allocator's arenas: count the activations too
        other = [(t + 1) % llm.config.vocab_size or 2 for t in ids]  # a cold prompt of the same length
        with ActivationPeak() as act:
            llm.generate([other], greedy(1))
        row["workspace_gb"] = act.workspace / 1e9
        chunk, n = llm.engine_config.max_num_batched_tokens, len(ids)
        planned = [
            prefill_workspace(llm.config, min(chunk, n - a), min(n, a + chunk), 4) for a in range(0, n, chunk)
        ]
        row["planned_workspace_gb"] = max(planned) / 1e9  # the prompt's own chunks
    return row


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _transformers_row(model, ids: list[int], heads: int, device: torch.device) -> dict:
    """One forward over the prompt; skipped as out of memory when its [heads, T, T] float32 scores alone
    exceed half the free memory (eager attention materialises them)."""
    needed = heads * len(ids) ** 2 * 4
    if needed > _available_bytes(device) // 2:
        return {"out_of_memory": f"its attention scores alone need {needed / 1e9:.0f} GB"}
    x = torch.tensor([ids], device=device)
    with torch.inference_mode(), _Peak(device) as peak:
        try:
            seconds = timed(lambda: model(x, logits_to_keep=1), device)
        except torch.OutOfMemoryError as e:
            return {"out_of_memory": str(e).splitlines()[0]}
    return {"prefill_tokens_per_s": len(ids) / seconds, "ttft_s": seconds, "peak_gb": peak.bytes / 1e9}


def bench_long(
    model_dir: str,
    lengths: list[int],
    device: str = "cpu",
    dtype: str = "float32",
    chunk: int = 2048,
    decode_tokens: int = 16,
    peer: bool = True,
) -> dict:
    """ds4 (and transformers, with `peer`) per prompt length, shortest first."""
    lengths = sorted(lengths)
    dev = torch.device(device)
    max_len = lengths[-1] + decode_tokens + 1
    llm = LLM(
        model_dir,
        device=device,
        dtype=dtype,
        max_model_len=max_len,
        max_num_seqs=1,
        max_num_batched_tokens=chunk,
        num_cache_blocks=-(-max_len // 256) + 2,  # the prompt, kept, and decode
    )
    vocab = llm.config.vocab_size
    llm.generate([list(range(2, 2 + min(chunk, 64)))], greedy(2))  # warm-up: first-use allocations, kernels
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for n in lengths:
        ids = torch.randint(2, vocab, (n,), generator=gen).tolist()
        rows[n] = {"ds4": _ds4_row(llm, ids, decode_tokens)}
    heads = llm.config.num_attention_heads
    del llm
    if peer:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(dev).eval()
        gen = torch.Generator().manual_seed(0)
        for n in lengths:
            ids = torch.randint(2, vocab, (n,), generator=gen).tolist()
            rows[n]["transformers"] = _transformers_row(model, ids, heads, dev)
    return {
        "model": str(model_dir),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "chunk": chunk,
        "threads": torch.get_num_threads(),
        "lengths": {str(n): row for n, row in rows.items()},
    }


def format_long_report(r: dict) -> str:
    lines = [
        f"model {r['model']}  device {r['device']}  dtype {r['dtype']}  chunks of {r['chunk']}  "
        f"threads {r['threads']}",
        f"{'tokens':>9} {'engine':<13}{'prefill tok/s':>14}{'ttft s':>9}{'cached ttft s':>14}"
        f"{'decode tok/s':>13}{'peak GB':>9}{'workspace GB':>14}{'planned GB':>12}",
    ]
    for n, row in r["lengths"].items():
        for name, m in row.items():
            if "out_of_memory" in m:
                lines.append(f"{int(n):>9,} {name:<13}out of memory ({m['out_of_memory']})")
                continue
            cached = f"{m['ttft_cached_s']:.2f}" if "ttft_cached_s" in m else "-"
            decode = f"{m['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in m else "-"
            counted = ""
            if "workspace_gb" in m:
                counted = f"{m['workspace_gb']:>14.3f}{m['planned_workspace_gb']:>12.3f}"
            lines.append(
                f"{int(n):>9,} {name:<13}{m['prefill_tokens_per_s']:>14,.0f}{m['ttft_s']:>9.2f}"
                f"{cached:>14}{decode:>13}{m['peak_gb']:>9.2f}{counted}"
            )
    return "\n".join(lines)
