"""Reading the index: ranked symbol search (FTS5 BM25 over names, signatures and docs; exact names
first, definitions in source above those in tests, docs and examples), the definitions of a file or
the whole repository, what ranking reads (who defines and uses a name, BM25 over contents and symbols,
the file graph) and what the packer reads (files with their texts, skeleton lines) and the token counts
it caches there."""

from __future__ import annotations

import re

import sqlite_utils

# Folders (and file name parts) of tests, docs and examples: ranked below the source they exercise.
SECONDARY = re.compile(r"(^|/)(tests?|testing|docs?|examples?|samples?|benchmarks?)(/|$)|(^|/)test_|_test\.")
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


# -- what the packer reads, and the token counts it caches -------------------------------------------


def indexed_files(db: sqlite_utils.Database) -> list[tuple[int, str, str, str]]:
    """(id, path, hash, text) of every indexed text file, by path."""
    return db.execute(
        "SELECT f.id, f.path, f.hash, c.text FROM files f JOIN contents c ON c.file_id = f.id "
        "WHERE f.skipped IS NULL ORDER BY f.path"
    ).fetchall()


def file_texts(db: sqlite_utils.Database, paths: list[str]) -> dict[str, str]:
    """path -> text of those of `paths` that are indexed text files."""
    return dict(
        db.execute(
            f"SELECT f.path, c.text FROM files f JOIN contents c ON c.file_id = f.id "
            f"WHERE f.path IN ({_marks(len(paths))})",
            paths,
        ).fetchall()
    )


def file_definitions(db: sqlite_utils.Database, path: str) -> list[tuple[str, int, int, str]]:
    """(kind, line, end line, doc) of a file's definitions, by line: what a skeleton keeps."""
    return db.execute(
        "SELECT d.kind, d.line, d.end_line, d.doc FROM definitions d JOIN files f "
        "ON f.id = d.file_id WHERE f.path = ? ORDER BY d.line",
        [path],
    ).fetchall()


def cached_token_counts(db: sqlite_utils.Database, tokenizer: str) -> dict[int, tuple[str, int]]:
    """file id -> (hash of the contents counted, count) for the tokenizer with this fingerprint."""
    rows = db.execute("SELECT file_id, hash, count FROM token_counts WHERE tokenizer = ?", [tokenizer])
    return {row[0]: (row[1], row[2]) for row in rows}


def save_token_counts(db: sqlite_utils.Database, tokenizer: str, counts: list[tuple[int, str, int]]) -> None:
    """Caches (file id, hash, count) rows for the tokenizer with this fingerprint, in one transaction."""
    with db.conn:
        db.conn.executemany(
            "INSERT OR REPLACE INTO token_counts (file_id, tokenizer, hash, count) VALUES (?, ?, ?, ?)",
            [(fid, tokenizer, h, n) for fid, h, n in counts],
        )


# -- what ranking reads -----------------------------------------------------------------------------


def _marks(n: int) -> str:
    return ",".join("?" * n)


def defining_files(db: sqlite_utils.Database, names: list[str]) -> list[tuple[str, str]]:
    """(path, name) of every definition of one of `names`."""
    return db.execute(
        f"SELECT f.path, d.name FROM definitions d JOIN files f ON f.id = d.file_id "
        f"WHERE d.name IN ({_marks(len(names))})",
        names,
    ).fetchall()


def definition_spans(db: sqlite_utils.Database) -> list[tuple[str, int, int, str, str]]:
    """(path, first line, last line, kind, name) of every definition, by path and line."""
    return db.execute(
        "SELECT f.path, d.line, d.end_line, d.kind, d.name FROM definitions d "
        "JOIN files f ON f.id = d.file_id ORDER BY f.path, d.line"
    ).fetchall()


def references_to(db: sqlite_utils.Database, names: list[str]) -> list[tuple[str, str, str]]:
    """(path, name, lines) of the uses of `names`; lines comma-separated, ascending."""
    return db.execute(
        f"SELECT f.path, r.name, r.lines FROM refs r JOIN files f ON f.id = r.file_id "
        f"WHERE r.name IN ({_marks(len(names))})",
        names,
    ).fetchall()


def bm25_matches(db: sqlite_utils.Database, match: str) -> list[list[tuple[str, float]]]:
    """(path, BM25 score, higher is better) of the files whose contents match the FTS5 query `match`,
    then of the files whose definitions (name, signature, doc) match it."""
    return [
        db.execute(sql, [match]).fetchall()
        for sql in (
            "SELECT f.path, -bm25(contents_fts) FROM contents_fts JOIN files f ON f.id = contents_fts.rowid "
            "WHERE contents_fts MATCH ?",
            "SELECT f.path, -bm25(definitions_fts) FROM definitions_fts "
            "JOIN definitions d ON d.id = definitions_fts.rowid JOIN files f ON f.id = d.file_id "
            "WHERE definitions_fts MATCH ?",
        )
    ]


def file_paths(db: sqlite_utils.Database) -> dict[int, str]:
    """file id -> path."""
    return dict(db.execute("SELECT id, path FROM files").fetchall())


def reference_edges(db: sqlite_utils.Database, max_defining_files: int) -> list[tuple[int, int, int]]:
    """(using file id, defining file id, uses) between different files, over names defined in at most
    `max_defining_files` files."""
    return db.execute(
        "WITH rare AS (SELECT name FROM definitions GROUP BY name HAVING COUNT(DISTINCT file_id) <= ?) "
        "SELECT r.file_id, d.file_id, COUNT(*) FROM refs r JOIN definitions d ON d.name = r.name "
        "WHERE r.name IN rare AND r.file_id != d.file_id GROUP BY r.file_id, d.file_id",
        [max_defining_files],
    ).fetchall()
