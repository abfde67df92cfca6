"""Inline completion's inputs: the text around the cursor, and repository context ahead of it (the
definitions of names used near the cursor that live in other files, from the index)."""

from __future__ import annotations

import re
from pathlib import Path

from ds4.agent.index.indexer import default_db_path
from ds4.agent.index.query import search
from ds4.agent.index.store import open_index

MAX_PREFIX_CHARS, MAX_SUFFIX_CHARS = 6000, 2000
MAX_CONTEXT_CHARS = 2000  # a few hundred tokens of related definitions


def infill_inputs(root: Path, rel: str, source: str, offset: int) -> tuple[str, str]:
    """(prefix, suffix) for a fill-in-the-middle request at `offset` of `source`: the context block and
    the text before the cursor, and the text after it, each cut to a window."""
    prefix, suffix = source[:offset], source[offset:]
    return context(root, rel, prefix) + prefix[-MAX_PREFIX_CHARS:], suffix[:MAX_SUFFIX_CHARS]


def context(root: Path, rel: str, prefix: str) -> str:
    """Repository context ahead of the file: the definitions (signature and doc) of names used near
    the cursor that live in other files, as comment-free path-tagged blocks, a few hundred tokens."""
    db_path = default_db_path(root)
    if not db_path.exists():
        return ""
    names = list(dict.fromkeys(re.findall(r"[A-Za-z_]\w{2,}", prefix[-1500:])))[-30:]
    lines, size = [], 0
    with open_index(db_path, write=False) as db:
        for name in reversed(names):
            for row in search(db, name, limit=3):
                if row["name"] != name or row["path"] == rel:
                    continue
                line = f"{row['path']}:{row['line']}: {row['signature']}"
                if size + len(line) > MAX_CONTEXT_CHARS:
                    break
                lines.append(line)
                size += len(line)
    if not lines:
        return ""
    header = "# Related definitions elsewhere in the repository:\n"
    return header + "".join(f"# {x}\n" for x in lines) + f"# {rel}\n"
