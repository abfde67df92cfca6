"""`ds4-agent bench serve`: concurrent streaming clients against `ds4-agent serve` and a peer server
(`transformers serve`, or any OpenAI-compatible URL), one after the other on the same checkpoint.

Two workloads: every prompt distinct, and every prompt behind one shared prefix (a repository packed
once, many questions). Reported per server and workload: time to first token p50/p99 (the first
streamed chunk), request latency p50, and output tokens/s over the whole run."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from ds4.agent.backends import sse_chunks
from ds4.agent.errors import BenchError, InputError


@dataclass
class ServeResult:
    server: str
    workload: str
    requests: int
    failures: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    output_tokens: int
    output_tokens_per_s: float
    wall_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server reported served from its prefix cache


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus_text() -> str:
    """Real code to cut prompts from: the standard library's own sources (always present, no network)."""
    import asyncio
    import email
    import json as json_module

    parts = []
    for module in (asyncio, email, json_module):
        for path in sorted(Path(module.__file__).parent.glob("*.py")):
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def make_prompts(tokenizer, n: int, prompt_tokens: int, prefix_tokens: int, seed: int = 0) -> dict:
    """Per workload, n text prompts of about `prompt_tokens` tokens of their own; the shared-prefix ones
    all start with the same `prefix_tokens`-token block."""
    rng = random.Random(seed)
    ids = tokenizer.encode(corpus_text(), add_bos=False)

    def cut(length: int) -> str:
        start = rng.randrange(0, len(ids) - length)
        return tokenizer.decode(ids[start : start + length])

    prefix = cut(prefix_tokens)
    return {
        "distinct": [cut(prompt_tokens) for _ in range(n)],
        "shared-prefix": [prefix + "\n# question\n" + cut(prompt_tokens) for _ in range(n)],
    }


@contextmanager
def running(command: list[str], base: str, log_path: Path, ready_timeout: float = 600.0):
    """A server subprocess; yields once GET base/v1/models answers."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                    models = json.load(r)["data"]
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text()[-2000:]
                    raise BenchError(f"{command[0]} did not come up:\n{tail}") from None
                time.sleep(0.5)
        yield models[0]["id"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _one(client: httpx.Client, url: str, body: dict) -> tuple[float, float, int, int, int]:
    """Streams one completion: (seconds to the first chunk, seconds in all, completion tokens, prompt
    tokens, cached prompt tokens)."""
    start = time.perf_counter()
    first, tokens, chunks, prompt, cached = None, 0, 0, 0, 0
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for chunk in sse_chunks(response.iter_lines()):
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - start
            if chunk.get("choices"):
                chunks += 1
            usage = chunk.get("usage")
            if usage:
                tokens = usage.get("completion_tokens", 0)
                prompt = usage.get("prompt_tokens", 0)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens or chunks, prompt, cached


def drive(
    base: str, model: str, prompts: list[str], clients: int, max_tokens: int, server: str, workload: str
):
    """`clients` threads share the prompts, each sending its next one as soon as the last is done."""
    url = base + "/v1/completions"
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    ttfts, latencies, tokens, failures, prompt_tokens, cached_tokens = [], [], [0], [0], [0], [0]

    def worker():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    _, prompt = todo.pop(0)
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                try:
                    ttft, latency, n, p, c = _one(client, url, body)
                except (httpx.HTTPError, ValueError):
                    with lock:
                        failures[0] += 1
                    continue
                with lock:
                    ttfts.append(ttft)
                    latencies.append(latency)
                    tokens[0] += n
                    prompt_tokens[0] += p
                    cached_tokens[0] += c

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if not ttfts:
        raise BenchError(f"{server}: every request failed")
    return ServeResult(
        server,
        workload,
        len(ttfts),
        failures[0],
        round(percentile(ttfts, 50) * 1000, 1),
        round(percentile(ttfts, 99) * 1000, 1),
        round(percentile(latencies, 50) * 1000, 1),
        tokens[0],
        round(tokens[0] / wall, 2),
        round(wall, 2),
        prompt_tokens[0],
        cached_tokens[0],
    )


def servers(model_dir: str, peer: str) -> list[tuple[str, list[str] | str]]:
    """(name, command to start it) for ds4 and the peer; a URL peer is already running."""
    ds4 = [str(Path(sys.executable).parent / "ds4-agent"), "serve", "--model", model_dir, "--port", "{port}"]
    out: list[tuple[str, list[str] | str]] = [("ds4", ds4)]
    if peer == "transformers":
        exe = Path(sys.executable).parent / "transformers"
        out.append(
            ("transformers serve", [str(exe), "serve", str(Path(model_dir).resolve()), "--port", "{port}"])
        )
    elif peer.startswith("http"):
        out.append((peer, peer.rstrip("/").removesuffix("/v1")))
    elif peer == "transformers-cb":
        exe = Path(sys.executable).parent / "transformers"
        command = [
            str(exe),
            "serve",
            str(Path(model_dir).resolve()),
            "--continuous-batching",
            "--port",
            "{port}",
        ]
        out.append(("transformers serve --continuous-batching", command))
    elif peer != "none":
        raise InputError(f"unknown peer {peer!r}: transformers, transformers-cb, none, or a URL", "peer")
    return out


def bench_serve(
    model_dir: str,
    clients: int = 8,
    requests: int = 32,
    prompt_tokens: int = 256,
    prefix_tokens: int = 2048,
    max_tokens: int = 32,
    peer: str = "transformers",
    workdir: str | Path = ".ds4/bench-serve",
) -> list[ServeResult]:
    from ds4.engine.tokenizer import Tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(model_dir, None)
    prompts = make_prompts(tokenizer, requests + 2, prompt_tokens, prefix_tokens)  # the last two: warm-ups
    results = []
    for name, command in servers(model_dir, peer):
        if isinstance(command, str):  # already running
            base, context = command, None
        else:
            port = _free_port()
            base = f"http://127.0.0.1:{port}"
            command = [c.replace("{port}", str(port)) for c in command]
            context = running(command, base, workdir / f"{name.split()[0]}.log")
        if context is None:
            with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
                model = json.load(r)["data"][0]["id"]
            results += _run_workloads(base, model, prompts, clients, max_tokens, name)
        else:
            with context as model:
                results += _run_workloads(base, model, prompts, clients, max_tokens, name)
    return results


def _run_workloads(base, model, prompts, clients, max_tokens, name) -> list[ServeResult]:
    """Warm-ups use prompts of their own (the last two of each list), so nothing measured is cached by
    them except, in shared-prefix, the prefix itself: the repository is packed once, then questions
    follow."""
    distinct, shared = prompts["distinct"], prompts["shared-prefix"]
    drive(base, model, distinct[-2:], 2, 4, name, "warm-up")  # first-request costs, not measured
    results = [drive(base, model, distinct[:-2], clients, max_tokens, name, "distinct")]
    drive(base, model, shared[-1:], 1, 1, name, "warm-up")  # puts the shared prefix in the cache
    results.append(drive(base, model, shared[:-2], clients, max_tokens, name, "shared-prefix"))
    return results


def format_serve_report(results: list[ServeResult], config: dict) -> str:
    lines = [
        f"{config['clients']} concurrent streaming clients, {config['requests']} requests per workload, "
        f"prompts of ~{config['prompt_tokens']} own tokens "
        f"(+{config['prefix_tokens']} shared in shared-prefix), "
        f"{config['max_tokens']} tokens out, greedy",
        f"{'server':<40} {'workload':<14} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>9} "
        f"{'out tok/s':>10} {'cached':>7} {'fail':>5}",
    ]
    for r in results:
        hit = f"{100 * r.cached_tokens / r.prompt_tokens:.0f}%" if r.prompt_tokens else "n/a"
        lines.append(
            f"{r.server:<40} {r.workload:<14} {r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms "
            f"{r.latency_p50_ms:>7.0f}ms {r.output_tokens_per_s:>10.1f} "
            f"{hit:>7} {r.failures:>5}"
        )
    ds4 = {r.workload: r for r in results if r.server == "ds4"}
    for r in results:
        if r.server != "ds4" and r.workload in ds4:
            mine = ds4[r.workload]
            lines.append(
                f"ds4 vs {r.server}, {r.workload}: TTFT p50 {r.ttft_p50_ms / mine.ttft_p50_ms:.2f}x faster, "
                f"throughput {mine.output_tokens_per_s / r.output_tokens_per_s:.2f}x"
            )
    return "\n".join(lines)


def to_json(results: list[ServeResult], config: dict) -> str:
    return json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=2)
