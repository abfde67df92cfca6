"""`ds4-agent bench pack`: packing time at 100K and 1M-token budgets from a warm index, and how much of
the repository prefix survives an edit to the newest file and to the oldest one."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

from ds4.agent.index.indexer import default_db_path, index_repo
from ds4.agent.index.store import open_index
from ds4.agent.pack import pack
from ds4.agent.tokens import TokenCounter

BUDGETS = (100_000, 1_000_000)


def _repo_part(packed) -> str:
    return packed.parts["system"] + "\n" + packed.parts["tree"] + packed.parts["files"]


def _stability(repo: Path, counter: TokenCounter, budget: int, issue: str, which: str, sticky: bool) -> float:
    """Share of repository-part tokens identical from the front after appending a line to one file;
    `sticky`: the second pack keeps the first one's selection (as the fix loop packs later rounds)."""
    db_path = default_db_path(repo)
    with open_index(db_path) as db:
        before = pack(db, repo, issue, budget, counter)
    placed = [f.path for f in before.files if f.mode != "listed"]
    target = repo / (placed[-1] if which == "newest" else placed[0])
    original, stat = target.read_bytes(), target.stat()
    try:
        target.write_bytes(original + b"\n# ds4 bench edit\n")
        index_repo(repo)
        with open_index(db_path) as db:
            after = pack(db, repo, issue, budget, counter, previous=before.manifest() if sticky else None)
    finally:
        target.write_bytes(original)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        index_repo(repo)
    common = len(os.path.commonprefix([_repo_part(before), _repo_part(after)]))
    return counter.count(_repo_part(before)[:common]) / before.repo_prefix_tokens


def bench_pack(repo: str | Path, tokenizer_file: str | Path, runs: int = 3, issue: str = "") -> dict:
    repo = Path(repo).resolve()
    counter = TokenCounter(tokenizer_file)
    index_repo(repo)  # warm: later packs read token counts and symbols from the index
    with open_index(default_db_path(repo)) as db:
        pack(db, repo, issue, BUDGETS[-1], counter)  # caches every file's token count
        timings = {}
        for budget in BUDGETS:
            seconds, result = [], None
            for _ in range(runs):
                start = time.perf_counter()
                result = pack(db, repo, issue, budget, counter)
                seconds.append(time.perf_counter() - start)
            modes = {
                m: sum(f.mode == m for f in result.files)
                for m in ("whole", "focused", "bodies", "skeleton", "listed")
            }
            timings[str(budget)] = {
                "seconds": statistics.median(seconds),
                "total_tokens": result.total_tokens,
                "repo_prefix_tokens": result.repo_prefix_tokens,
                "files": modes,
            }
    budget = BUDGETS[-1]
    return {
        "repo": str(repo),
        "runs": runs,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "issue": issue,
        "pack": timings,
        "prefix_kept_after_edit": {
            f"{which}_file{'_sticky' if sticky else ''}": _stability(
                repo, counter, budget, issue, which, sticky
            )
            for which in ("newest", "oldest")
            for sticky in (False, True)
        },
    }


def format_pack_report(r: dict) -> str:
    lines = [f"repo {r['repo']}; runs {r['runs']} (medians); {r['machine']}"]
    for budget, t in r["pack"].items():
        f = t["files"]
        lines.append(
            f"budget {int(budget):>9,}: {t['seconds']:.2f} s, {t['total_tokens']:,} tokens "
            f"({f['whole']} whole, {f['skeleton']} skeleton, {f['listed']} listed)"
        )
    kept = r["prefix_kept_after_edit"]
    lines.append(
        f"repository prefix kept after an edit: newest file {kept['newest_file']:.1%}, "
        f"oldest file {kept['oldest_file']:.1%}; keeping the previous selection: newest "
        f"{kept['newest_file_sticky']:.1%}, oldest {kept['oldest_file_sticky']:.1%}"
    )
    return "\n".join(lines)
