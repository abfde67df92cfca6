"""The index database: SQLite through sqlite-utils, WAL mode (readers work while a writer runs), FTS5
over definitions and file contents. The schema is one string with a version; a database of another
version is rebuilt, and a foreign file is moved aside, never overwritten or crashed on."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from ds4.agent.errors import AgentError

log = logging.getLogger("ds4.agent.index")

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,          -- relative to the repository, "/" separated
    language TEXT,                      -- tree-sitter-language-pack name, NULL for plain text
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,                 -- blake2b of the contents
    lines INTEGER NOT NULL DEFAULT 0,
    skipped TEXT,                       -- why the contents are not indexed (binary, minified), else NULL
    syntax_errors INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS token_counts (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    tokenizer TEXT NOT NULL,            -- the tokenizer's fingerprint
    hash TEXT NOT NULL,                 -- contents the count belongs to
    count INTEGER NOT NULL,
    PRIMARY KEY (file_id, tokenizer)
);
CREATE TABLE IF NOT EXISTS definitions (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    line INTEGER NOT NULL,
    end_line INTEGER NOT NULL,
    signature TEXT NOT NULL,
    doc TEXT NOT NULL,
    parent_id INTEGER REFERENCES definitions(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS definitions_file ON definitions(file_id);
CREATE INDEX IF NOT EXISTS definitions_name ON definitions(name);
CREATE TABLE IF NOT EXISTS refs (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    lines TEXT NOT NULL                 -- the lines it is used on, comma-separated, ascending
);
CREATE INDEX IF NOT EXISTS refs_name ON refs(name);
CREATE INDEX IF NOT EXISTS refs_file ON refs(file_id);
CREATE TABLE IF NOT EXISTS contents (
    file_id INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
    text TEXT
);
"""


class IndexDatabaseError(AgentError):
    """The index database cannot be opened or written (permissions, disk full)."""


def open_index(path: str | Path, write: bool = True) -> sqlite_utils.Database:
    """Opens the index database at `path`: for writing (creating or rebuilding it as needed), or for
    reading only, which never waits on a writer and never changes the file. Use it as a context
    manager, `with open_index(path) as db:`, which closes the connection however the block ends."""
    path = Path(path)
    if not write:
        return _open_reader(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db, problem = _open_checked(path)
        if problem:
            if db is not None:
                db.conn.close()
            moved = _set_aside(path, problem)
            log.warning("index database %s %s; rebuilding it%s", path, problem, moved)
            db = _open(path)
        _create(db)
        return db
    except sqlite3.DatabaseError as e:
        raise IndexDatabaseError(f"cannot use the index database {path}: {e}") from e


def _open_reader(path: Path) -> sqlite_utils.Database:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        problem = _version_problem(db) or (None if db.table_names() else "is empty")
    except sqlite3.DatabaseError as e:
        raise IndexDatabaseError(f"cannot read the index database {path}: {e}") from e
    if problem:
        raise IndexDatabaseError(f"the index database {path} {problem}: run `ds4-agent index` to rebuild it")
    return db


def _open_checked(path: Path) -> tuple[sqlite_utils.Database | None, str | None]:
    """The database for writing and what is wrong with it (None: usable); a file that is not SQLite at
    all (corrupted, overwritten) cannot even be opened."""
    try:
        db = _open(path)
    except sqlite3.DatabaseError:
        return None, "is not an SQLite database"
    return db, _version_problem(db)


def _open(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _version_problem(db: sqlite_utils.Database) -> str | None:
    try:
        tables = set(db.table_names())
    except sqlite3.DatabaseError:
        return "is not an SQLite database"
    if not tables:
        return None
    if "meta" not in tables:
        return "is not a ds4 index"
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or row[0] != str(SCHEMA_VERSION):
        return f"has schema version {row[0] if row else None}, this ds4 writes {SCHEMA_VERSION}"
    return None


def _set_aside(path: Path, problem: str) -> str:
    """Older ds4 indexes are deleted (they are derived data); anything else is renamed, not lost."""
    if problem.startswith("has schema version"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return ""
    aside = path.with_name(f"{path.name}.foreign-{int(time.time())}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f" (the old file is kept as {aside.name})"


def _create(db: sqlite_utils.Database) -> None:
    db.conn.executescript(SCHEMA)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    if not db["definitions"].detect_fts():
        db["definitions"].enable_fts(["name", "signature", "doc"], fts_version="FTS5", create_triggers=True)
    if not db["contents"].detect_fts():
        db["contents"].enable_fts(["text"], fts_version="FTS5", create_triggers=True)
    db.conn.commit()
