"""Reading the index: ranked symbol search (FTS5 BM25 over names, signatures and docs; exact names
first, definitions in source above those in tests, docs and examples) and the definitions of a file or
the whole repository."""

from __future__ import annotations

import re

import sqlite_utils

from ds4.agent.rank import SECONDARY

COLUMNS = ("path", "name", "kind", "line", "end_line", "signature", "doc")
_SELECT = (
    "SELECT f.path, d.name, d.kind, d.line, d.end_line, d.signature, d.doc "
    "FROM definitions d JOIN files f ON f.id = d.file_id"
)


def _fts_query(text: str) -> str:
    """User text as an FTS5 query: any of its words as a quoted prefix term (BM25 ranks symbols matching
    more words higher); quoting means user input never raises an FTS syntax error."""
    words = re.findall(r"[\w$]+", text)
    return " OR ".join(f'"{w}"*' for w in words)


def search(db: sqlite_utils.Database, text: str, kind: str | None = None, limit: int = 20) -> list[dict]:
    match = _fts_query(text)
    if not match:
        return []
    where, params = "", [match]
    if kind:
        where, params = " AND d.kind = ?", [match, kind]
    db.conn.create_function(
        "is_secondary", 1, lambda path: bool(SECONDARY.search(path.lower())), deterministic=True
    )
    rows = db.execute(
        f"{_SELECT} JOIN definitions_fts ON definitions_fts.rowid = d.id "
        f"WHERE definitions_fts MATCH ?{where} "
        "ORDER BY (d.name = ?) DESC, is_secondary(f.path), (lower(d.name) = lower(?)) DESC, "
        "bm25(definitions_fts), f.path, d.line "
        "LIMIT ?",
        params + [text.strip(), text.strip(), limit],
    ).fetchall()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def symbols(db: sqlite_utils.Database, path: str | None = None) -> list[dict]:
    where, params = ("WHERE f.path = ?", [path]) if path else ("", [])
    rows = db.execute(f"{_SELECT} {where} ORDER BY f.path, d.line, d.id", params).fetchall()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]
