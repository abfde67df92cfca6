"""Brings the index database up to date with the repository, touching only what changed.

A file is re-read when its size or mtime changed, and re-parsed only when its content hash changed;
files gone from the catalog are removed (with their rows). Work is committed in batches, so a killed
run leaves a consistent database and the next run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ds4.agent.index.catalog import DEFAULT_MAX_BYTES, Entry, list_files
from ds4.agent.index.languages import language_of
from ds4.agent.index.store import open_index
from ds4.agent.index.tags import extract, has_tags

BATCH = 200  # files per transaction
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
    return Path(repo).resolve() / ".ds4" / "index.db"


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
    db = open_index(db_path or default_db_path(repo))
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
    for first in range(0, len(todo), BATCH):
        with db.conn:
            for entry in todo[first : first + BATCH]:
                _index_file(db, catalog.root, entry, known.get(entry.path), report)
        if progress is not None:
            progress(min(first + BATCH, len(todo)), len(todo))
    _summarize(db, report)
    report.seconds = time.perf_counter() - start
    db.conn.close()
    return report


def _changed(entry: Entry, row) -> bool:
    return row is None or row[1] != entry.size or row[2] != entry.mtime_ns


def _index_file(db, root: Path, entry: Entry, row, report: IndexReport) -> None:
    try:
        data = (root / entry.path).read_bytes()
    except OSError as e:
        _replace_file(db, entry.path, entry, row, None, f"unreadable ({e.strerror})")
        return
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if row is not None and row[3] == digest and row[4] is None:  # touched, not changed
        db.execute(
            "UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?", [entry.size, entry.mtime_ns, row[0]]
        )
        report.unchanged += 1
        return
    reason = content_skip_reason(data)
    file_id = _replace_file(db, entry.path, entry, row, digest, reason)
    report.parsed += 1
    report.parsed_paths.append(entry.path)
    if reason is None:
        _store_contents(db, file_id, entry.path, data)


def _replace_file(db, path: str, entry: Entry, row, digest: str | None, reason: str | None) -> int:
    if row is not None:
        db.execute("DELETE FROM files WHERE id = ?", [row[0]])
    cursor = db.execute(
        "INSERT INTO files (path, language, size, mtime_ns, hash, skipped) VALUES (?, ?, ?, ?, ?, ?)",
        [path, language_of(path), entry.size, entry.mtime_ns, digest or "", reason],
    )
    return cursor.lastrowid


def _store_contents(db, file_id: int, path: str, data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    db.execute("INSERT INTO contents (file_id, text) VALUES (?, ?)", [file_id, text])
    language = language_of(path)
    errors = False
    if language is not None and has_tags(language):
        definitions, references, errors = extract(language, data)
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
                for i, d in enumerate(definitions)
            ],
        )
        db.conn.executemany(
            "INSERT INTO refs (file_id, name, line) VALUES (?, ?, ?)",
            [(file_id, r.name, r.line) for r in references],
        )
    db.execute(
        "UPDATE files SET lines = ?, syntax_errors = ? WHERE id = ?",
        [text.count("\n") + 1, int(errors), file_id],
    )


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
