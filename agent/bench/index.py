"""`ds4-agent bench index`: a full index and a one-file incremental update of a repository, side by
side with universal-ctags over the same file list (medians of several runs)."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ds4.agent.index.catalog import list_files
from ds4.agent.index.indexer import index_repo


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_index(repo: str | Path, runs: int = 3) -> dict:
    repo = Path(repo).resolve()
    catalog = list_files(repo)
    total_bytes = sum(e.size for e in catalog.files)
    with tempfile.TemporaryDirectory() as tmp:
        full, reports = [], []
        for run in range(runs):
            db = Path(tmp) / f"full-{run}.db"
            start = time.perf_counter()
            reports.append(index_repo(repo, db))
            full.append(time.perf_counter() - start)
        db = Path(tmp) / f"full-{runs - 1}.db"
        incremental = _incremental_runs(repo, db, catalog, runs)
        ctags = _ctags_runs(repo, catalog, Path(tmp), runs)
    report = reports[-1]
    full_s = statistics.median(full)
    out = {
        "repo": str(repo),
        "files": report.files,
        "bytes": total_bytes,
        "runs": runs,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "ds4": {
            "full_seconds": full_s,
            "files_per_s": report.files / full_s,
            "mb_per_s": total_bytes / 1e6 / full_s,
            "definitions": report.definitions,
            "references": report.references,
            "incremental_one_file_seconds": statistics.median(incremental),
        },
    }
    if ctags is not None:
        ctags_s, tags = ctags
        out["ctags"] = {
            "full_seconds": ctags_s,
            "files_per_s": report.files / ctags_s,
            "mb_per_s": total_bytes / 1e6 / ctags_s,
            "tags": tags,
        }
        out["ratio_full_ds4_over_ctags"] = full_s / ctags_s
    return out


def _incremental_runs(repo: Path, db: Path, catalog, runs: int) -> list[float]:
    """Appends a line to one source file, re-indexes, restores it (times the update only)."""
    target = next(
        (repo / e.path for e in catalog.files if e.path.endswith(".py")), repo / catalog.files[0].path
    )
    original = target.read_bytes()
    stat = target.stat()
    times = []
    try:
        for i in range(runs):
            target.write_bytes(original + f"\n# ds4 bench edit {i}\n".encode())
            times.append(_timed(lambda: index_repo(repo, db)))
    finally:
        target.write_bytes(original)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return times


def _ctags_runs(repo: Path, catalog, tmp: Path, runs: int) -> tuple[float, int] | None:
    if shutil.which("ctags") is None:
        return None
    listing = tmp / "files.txt"
    listing.write_text("\n".join(e.path for e in catalog.files) + "\n")
    out = tmp / "tags.json"
    cmd = ["ctags", "--output-format=json", "--fields=+n", "-f", str(out), "-L", str(listing)]
    times = []
    for _ in range(runs):
        out.unlink(missing_ok=True)  # ctags refuses to overwrite a JSON tag file
        times.append(_timed(lambda: subprocess.run(cmd, cwd=repo, check=True, capture_output=True)))
    return statistics.median(times), sum(1 for _ in out.open())


def format_index_report(r: dict) -> str:
    d = r["ds4"]
    lines = [
        f"repo {r['repo']}: {r['files']} files, {r['bytes'] / 1e6:.1f} MB; "
        f"runs {r['runs']} (medians); {r['machine']}",
        f"ds4 full index   {d['full_seconds']:.2f} s  ({d['files_per_s']:,.0f} files/s, "
        f"{d['mb_per_s']:.1f} MB/s; "
        f"{d['definitions']:,} definitions, {d['references']:,} references)",
        f"ds4 one-file update {d['incremental_one_file_seconds'] * 1e3:,.0f} ms",
    ]
    if "ctags" in r:
        c = r["ctags"]
        lines.append(
            f"ctags full index {c['full_seconds']:.2f} s  ({c['files_per_s']:,.0f} files/s, "
            f"{c['mb_per_s']:.1f} MB/s; {c['tags']:,} tags)"
        )
        lines.append(f"ds4 / ctags time: {r['ratio_full_ds4_over_ctags']:.2f}x")
    return "\n".join(lines)
