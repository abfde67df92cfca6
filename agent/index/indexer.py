"""Brings the index database up to date with the repository, touching only what changed.

A file is re-read when its size or mtime changed, and re-parsed only when its content hash changed;
files gone from the catalog are removed (with their rows). Work is committed in batches, so a killed
run leaves a consistent database and the next run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ds4.agent.index.catalog import DEFAULT_MAX_BYTES, Entry, list_files
from ds4.agent.index.languages import language_of
from ds4.agent.index.store import open_index
from ds4.agent.index.tags import extract, has_tags
from ds4.agent.runs import checked, exclude_from_git

BATCH = 200  # files per transaction
PARALLEL_MIN_FILES = 64  # fewer changed files than this are analyzed in-process
MAX_LINE = 2000  # a line this long means minified or generated
MAX_AVERAGE_LINE = 300


@dataclass
class IndexReport:
    files: int = 0  # in the catalog
    parsed: int = 0  # read and (re)indexed this run
    unchanged: int = 0
    removed: int = 0
    definitions: int = 0  # in the whole index after the run
    references: int = 0
    languages: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    parsed_paths: list[str] = field(default_factory=list)


def default_db_path(repo: str | Path) -> Path:
    """REPO/.ds4/index.db; RunFolderError when .ds4 or the database is a symlink (a committed one
    would send the index's writes outside the repository)."""
    return checked(Path(repo).resolve() / ".ds4") / "index.db"


def content_skip_reason(data: bytes) -> str | None:
    if b"\0" in data[:8192]:
        return "binary"
    lines = data.split(b"\n")
    longest = max(len(line) for line in lines) if lines else 0
    if longest > MAX_LINE or (len(lines) > 1 and len(data) / len(lines) > MAX_AVERAGE_LINE):
        return "minified or generated (line length)"
    return None


def index_repo(
    repo: str | Path,
    db_path: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    start = time.perf_counter()
    catalog = list_files(repo, max_bytes)
    if db_path is None:
        exclude_from_git(Path(repo).resolve())  # REPO/.ds4 stays out of the user's `git status`
    with open_index(db_path or default_db_path(repo)) as db:
        report = IndexReport(files=len(catalog.files) + len(catalog.skipped))
        known = {
            row[0]: row[1:] for row in db.execute("SELECT path, id, size, mtime_ns, hash, skipped FROM files")
        }
        listed = {e.path for e in catalog.files} | set(catalog.skipped)
        gone = [known[p][0] for p in known if p not in listed]
        with db.conn:
            db.conn.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in gone])
        report.removed = len(gone)

        todo = [e for e in catalog.files if _changed(e, known.get(e.path))]
        report.unchanged = len(catalog.files) - len(todo)
        with db.conn:
            for path, reason in catalog.skipped.items():
                _replace_file(db, path, Entry(path, 0, 0), known.get(path), None, reason)
        with _analyzer(len(todo)) as analyze:
            for first in range(0, len(todo), BATCH):
                batch = todo[first : first + BATCH]
                analyses = analyze(partial(analyze_file, catalog.root), batch)
                with db.conn:
                    for entry, analysis in zip(batch, analyses, strict=True):
                        _write(db, entry, known.get(entry.path), analysis, report)
                if progress is not None:
                    progress(min(first + BATCH, len(todo)), len(todo))
        _summarize(db, report)
        report.seconds = time.perf_counter() - start
    return report


def _changed(entry: Entry, row) -> bool:
    return row is None or row[1] != entry.size or row[2] != entry.mtime_ns


@dataclass
class Analysis:
    """What one file contributes, computed without the database (in a worker process for big runs)."""

    digest: str | None = None
    skipped: str | None = None
    text: str | None = None
    definitions: list = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)  # name -> "line,line,..."
    syntax_errors: bool = False


def analyze_file(root: Path, entry: Entry) -> Analysis:
    try:
        data = (root / entry.path).read_bytes()
    except OSError as e:
        return Analysis(skipped=f"unreadable ({e.strerror})")
    out = Analysis(
        digest=hashlib.blake2b(data, digest_size=16).hexdigest(), skipped=content_skip_reason(data)
    )
    if out.skipped is not None:
        return out
    out.text = data.decode("utf-8", "replace")
    language = language_of(entry.path)
    if language is not None and has_tags(language):
        out.definitions, references, out.syntax_errors = extract(language, data)
        lines: dict[str, list[int]] = {}
        for r in references:
            seen = lines.setdefault(r.name, [])
            if not seen or seen[-1] != r.line:
                seen.append(r.line)
        out.references = {name: ",".join(map(str, ls)) for name, ls in lines.items()}
    return out


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: a worker whose indexer was killed (SIGKILL leaves no time to stop the pool)
    exits within a second instead of waiting on its task queue forever."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def _analyzer(num_files: int):
    """map() over files: in worker processes for big runs (parsing is CPU-bound), else in-process."""
    workers = min(os.cpu_count() or 1, 8)
    if num_files < PARALLEL_MIN_FILES or workers < 2:
        yield lambda fn, items: [fn(item) for item in items]
        return
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        yield lambda fn, items: list(pool.map(fn, items, chunksize=8))


def _write(db, entry: Entry, row, analysis: Analysis, report: IndexReport) -> None:
    if row is not None and analysis.digest is not None and row[3] == analysis.digest and row[4] is None:
        db.execute(
            "UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?", [entry.size, entry.mtime_ns, row[0]]
        )
        report.unchanged += 1  # touched, not changed
        return
    file_id = _replace_file(db, entry.path, entry, row, analysis.digest, analysis.skipped)
    if analysis.digest is None:
        return  # unreadable: listed with its reason
    report.parsed += 1
    report.parsed_paths.append(entry.path)
    if analysis.text is None:
        return
    db.execute("INSERT INTO contents (file_id, text) VALUES (?, ?)", [file_id, analysis.text])
    base = db.execute("SELECT COALESCE(MAX(id), 0) FROM definitions").fetchone()[0] + 1
    db.conn.executemany(
        "INSERT INTO definitions (id, file_id, name, kind, line, end_line, signature, doc, parent_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                base + i,
                file_id,
                d.name,
                d.kind,
                d.line,
                d.end_line,
                d.signature,
                d.doc,
                None if d.parent is None else base + d.parent,
            )
            for i, d in enumerate(analysis.definitions)
        ],
    )
    db.conn.executemany(
        "INSERT INTO refs (file_id, name, lines) VALUES (?, ?, ?)",
        [(file_id, name, lines) for name, lines in analysis.references.items()],
    )
    db.execute(
        "UPDATE files SET lines = ?, syntax_errors = ? WHERE id = ?",
        [analysis.text.count("\n") + 1, int(analysis.syntax_errors), file_id],
    )


def _replace_file(db, path: str, entry: Entry, row, digest: str | None, reason: str | None) -> int:
    if row is not None:
        db.execute("DELETE FROM files WHERE id = ?", [row[0]])
    cursor = db.execute(
        "INSERT INTO files (path, language, size, mtime_ns, hash, skipped) VALUES (?, ?, ?, ?, ?, ?)",
        [path, language_of(path), entry.size, entry.mtime_ns, digest or "", reason],
    )
    return cursor.lastrowid


def _summarize(db, report: IndexReport) -> None:
    report.definitions = db.execute("SELECT COUNT(*) FROM definitions").fetchone()[0]
    report.references = db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
    report.languages = dict(
        db.execute(
            "SELECT language, COUNT(*) FROM files WHERE skipped IS NULL AND language IS NOT NULL "
            "GROUP BY language ORDER BY 2 DESC"
        ).fetchall()
    )
    reasons = Counter(
        dict(
            db.execute(
                "SELECT skipped, COUNT(*) FROM files WHERE skipped IS NOT NULL GROUP BY skipped"
            ).fetchall()
        )
    )
    report.skipped = dict(reasons)
