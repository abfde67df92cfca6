"""Symbols and locations the server answers with, from the index and from open buffers: workspace and
document symbols (an unsaved buffer's own definitions stand in for its indexed file's), a buffer's
definitions, and the repository files a model's answer names. Pure over its inputs; no LSP state."""

from __future__ import annotations

import re
from pathlib import Path

from lsprotocol import types
from pygls.uris import from_fs_path

from ds4.agent.index.indexer import default_db_path
from ds4.agent.index.languages import language_of
from ds4.agent.index.query import search, symbols
from ds4.agent.index.store import open_index
from ds4.agent.index.tags import Definition, extract

KINDS = {
    "function": types.SymbolKind.Function,
    "method": types.SymbolKind.Method,
    "class": types.SymbolKind.Class,
    "interface": types.SymbolKind.Interface,
    "struct": types.SymbolKind.Struct,
    "enum": types.SymbolKind.Enum,
    "module": types.SymbolKind.Module,
    "constant": types.SymbolKind.Constant,
    "variable": types.SymbolKind.Variable,
    "field": types.SymbolKind.Field,
    "property": types.SymbolKind.Property,
    "type": types.SymbolKind.TypeParameter,
    "macro": types.SymbolKind.Function,
    "trait": types.SymbolKind.Interface,
    "implementation": types.SymbolKind.Class,
}
MAX_SYMBOLS = 200


def buffer_definitions(rel: str, source: str) -> list[Definition]:
    """The definitions in a document's text as the editor has it (none in a language without tags)."""
    language = language_of(rel)
    return extract(language, source.encode("utf-8", "surrogateescape"))[0] if language else []


def workspace_symbols(
    query: str, unsaved_by_root: dict[Path, dict[str, list[Definition]]]
) -> list[types.SymbolInformation]:
    """Symbols matching `query` (every symbol when it has no words) in each workspace root's index, with
    the unsaved buffers' definitions (by root, then relative path) instead of their files' indexed ones;
    exact names first."""
    found: list[tuple[tuple, types.SymbolInformation]] = []
    words = [w.lower() for w in re.findall(r"[\w$]+", query)]
    for root, unsaved in unsaved_by_root.items():
        db_path = default_db_path(root)
        rows = []
        if db_path.exists():
            with open_index(db_path, write=False) as db:
                rows = search(db, query, limit=MAX_SYMBOLS) if words else symbols(db)[:MAX_SYMBOLS]
        for order, row in enumerate(rows):
            if row["path"] in unsaved:
                continue  # the buffer's own symbols stand in for the file's
            path = row["path"]
            info = _symbol(row["name"], row["kind"], root / path, row["line"], row["end_line"], path)
            found.append((_rank(row["name"], query, order), info))
        for rel, definitions in unsaved.items():
            for d in definitions:
                if words and not any(w in d.name.lower() for w in words):
                    continue
                info = _symbol(d.name, d.kind, root / rel, d.line, d.end_line, rel)
                found.append((_rank(d.name, query, -1), info))
    found.sort(key=lambda pair: pair[0])
    return [info for _, info in found[:MAX_SYMBOLS]]


def document_symbols(
    root: Path, rel: str, definitions: list[Definition] | None
) -> list[types.SymbolInformation]:
    """A document's outline: `definitions` of its open buffer, or (None) its indexed file's."""
    if definitions is not None:
        defs = [(d.name, d.kind, d.line, d.end_line) for d in definitions]
    else:
        db_path = default_db_path(root)
        if not db_path.exists():
            return []
        with open_index(db_path, write=False) as db:
            defs = [(r["name"], r["kind"], r["line"], r["end_line"]) for r in symbols(db, rel)]
    return [_symbol(name, kind, root / rel, line, end, rel) for name, kind, line, end in defs]


def references(root: Path, text: str) -> list[dict]:
    """The repository files an answer names (path or path:line), as LSP locations."""
    found, seen = [], set()
    for match in re.finditer(r"([\w./-]+\.\w+)(?::(\d+))?", text):
        rel, line = match.group(1).lstrip("./"), int(match.group(2) or 1)
        path = (root / rel).resolve()
        if (rel, line) in seen or not path.is_file() or not path.is_relative_to(root):
            continue
        seen.add((rel, line))
        position = {"line": max(line - 1, 0), "character": 0}
        found.append({"uri": from_fs_path(str(path)), "range": {"start": position, "end": position}})
    return found


def _symbol(name: str, kind: str, path: Path, line: int, end_line: int, container: str):
    return types.SymbolInformation(
        name=name,
        kind=KINDS.get(kind, types.SymbolKind.Variable),
        location=types.Location(
            uri=from_fs_path(str(path)),
            range=types.Range(types.Position(line - 1, 0), types.Position(max(end_line - 1, line - 1), 0)),
        ),
        container_name=container,
    )


def _rank(name: str, query: str, order: int) -> tuple:
    query = query.strip()
    return (name != query, name.lower() != query.lower(), not name.lower().startswith(query.lower()), order)
