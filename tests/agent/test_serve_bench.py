"""`ds4-agent bench serve` end to end on a tiny checkpoint: concurrent streaming clients against ds4's
server and a peer given by URL (here a second ds4 server), both workloads, every request answered."""

from __future__ import annotations

import json
import subprocess

from ds4.agent.bench.serve import percentile
from tests.servers import EXE, serving


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (
        percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100
    )
    assert percentile([3.0], 99) == 3.0


def test_bench_serve_runs_both_workloads_against_ds4_and_a_peer(tiny_v3, tmp_path):
    with serving(tiny_v3, tmp_path / "peer.log") as peer:
        run = subprocess.run(
            [EXE, "bench", "serve", "--model", str(tiny_v3), "--peer", peer, "--clients", "3"]
            + [
                "--requests",
                "5",
                "--prompt-tokens",
                "24",
                "--prefix-tokens",
                "600",
                "--max-tokens",
                "4",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    rows = {(r["server"], r["workload"]): r for r in report["results"]}
    assert set(rows) == {(s, w) for s in ("ds4", peer) for w in ("distinct", "shared-prefix")}
    for r in rows.values():
        assert r["requests"] == 5 and r["failures"] == 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["ttft_p50_ms"] <= r["latency_p50_ms"]
        assert r["requests"] <= r["output_tokens"] <= 4 * r["requests"] and r["output_tokens_per_s"] > 0
    shared = rows[("ds4", "shared-prefix")]
    assert shared["cached_tokens"] >= 5 * 512, (
        shared
    )  # the warmed prefix's two whole 256-token blocks, each time
    assert rows[("ds4", "distinct")]["cached_tokens"] == 0  # warm-ups have prompts of their own


def test_bench_serve_names_an_unknown_peer(tiny_v3, tmp_path):
    run = subprocess.run(
        [EXE, "bench", "serve", "--model", str(tiny_v3), "--peer", "vllm"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 2 and "unknown peer 'vllm'" in run.stderr
