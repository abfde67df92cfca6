"""A model's answer read as edits: SEARCH/REPLACE blocks or unified diffs, with the usual noise (code
fences, a path on the line before a block or inside its fence, CRLF line ends, `a/` and `b/` prefixes,
bare blank context lines). Matching them against the files is patch.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ds4.agent.errors import PatchError

SEARCH, DIVIDER, REPLACE = (
    re.compile(r"^<{5,9} ?SEARCH\s*$"),
    re.compile(r"^={5,9}\s*$"),
    re.compile(r"^>{5,9} ?REPLACE\s*$"),
)
FENCE = re.compile(r"^\s*(```|~~~)")
ELLIPSIS = re.compile(r"^\s*(\.\.\.|#\s*\.\.\.|//\s*\.\.\.|/\*\s*\.\.\.\s*\*/)\s*$")
HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


@dataclass
class Edit:
    path: str
    search: str  # "" creates the file (or fills an empty one)
    replace: str
    index: int  # 1-based block number in the answer
    line_hint: int | None = None  # a diff hunk's old start line, for ties only
    delete: bool = False
    new_path: str | None = None  # rename (diff headers)


# -- parsing ----------------------------------------------------------------------------------------


def parse(answer: str) -> list[Edit]:
    """Every edit in an answer, SEARCH/REPLACE blocks and unified diffs alike, in answer order."""
    text = answer.replace("\r\n", "\n").replace("\r", "\n")
    edits = _parse_search_replace(text) if any(SEARCH.match(line) for line in text.split("\n")) else []
    if not edits:
        edits = _parse_diff(text)
    if not edits:
        raise PatchError(
            "no edits found: answer with SEARCH/REPLACE blocks (a path line, then <<<<<<< SEARCH, "
            "the current lines, =======, the new lines, >>>>>>> REPLACE) or a unified diff"
        )
    return edits


def _clean_path(line: str) -> str:
    line = line.strip().strip("`*").strip()
    return re.sub(r"^(#+\s*|file:\s*|path:\s*)", "", line, flags=re.I).strip().rstrip(":").strip("`'\"")


def _parse_search_replace(text: str) -> list[Edit]:
    lines, edits, path, i = text.split("\n"), [], None, 0
    while i < len(lines):
        if not SEARCH.match(lines[i]):
            i += 1
            continue
        path = _path_before(lines, i) or path
        if path is None:
            raise PatchError(
                f"block {len(edits) + 1} has no file path: put the path on the line before <<<<<<< SEARCH"
            )
        search, i = _collect(lines, i + 1, DIVIDER, len(edits) + 1, "=======")
        replace, i = _collect(lines, i + 1, REPLACE, len(edits) + 1, ">>>>>>> REPLACE")
        edits.append(Edit(path, search, replace, len(edits) + 1))
        i += 1
    return edits


def _path_before(lines: list[str], i: int) -> str | None:
    j = i - 1
    while j >= 0 and (not lines[j].strip() or FENCE.match(lines[j])):
        j -= 1
    if j < 0 or REPLACE.match(lines[j]):
        return None  # another block in the same file follows right after the previous one
    candidate = _clean_path(lines[j])
    return (
        candidate if candidate and " " not in candidate and ("/" in candidate or "." in candidate) else None
    )


def _collect(lines: list[str], i: int, end: re.Pattern, block: int, marker: str) -> tuple[str, int]:
    start = i
    while i < len(lines) and not end.match(lines[i]):
        i += 1
    if i == len(lines):
        raise PatchError(f"block {block} is not closed: expected a {marker} line")
    body = lines[start:i]
    return ("\n".join(body) + "\n") if body else "", i


def _parse_diff(text: str) -> list[Edit]:
    lines, edits, i = text.split("\n"), [], 0
    old = new = None
    rename_from = rename_to = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git"):
            old = new = rename_from = rename_to = None
        elif line.startswith("rename from "):
            rename_from = line[len("rename from ") :].strip()
        elif line.startswith("rename to "):
            rename_to = line[len("rename to ") :].strip()
            edits.append(Edit(rename_from, "", "", len(edits) + 1, new_path=rename_to))
        elif line.startswith("--- "):
            old = _diff_path(line[4:])
        elif line.startswith("+++ "):
            new = _diff_path(line[4:])
            if new is None and old is not None:
                edits.append(Edit(old, "", "", len(edits) + 1, delete=True))
        elif HUNK.match(line) and (new or old):
            body, i = _hunk_body(lines, i + 1)
            if new is None:  # the hunk of a deleted file: the deletion says it all
                continue
            search = "".join(line[1:] + "\n" for line in body if line[:1] in (" ", "-"))
            replace = "".join(line[1:] + "\n" for line in body if line[:1] in (" ", "+"))
            target = new or old
            if rename_to and target == rename_to and rename_from:
                target = rename_to
            edits.append(
                Edit(
                    target,
                    "" if old is None else search,
                    replace,
                    len(edits) + 1,
                    line_hint=int(HUNK.match(line).group(1)),
                )
            )
            continue
        i += 1
    for number, edit in enumerate(edits, start=1):
        edit.index = number
    return edits


def _diff_path(raw: str) -> str | None:
    raw = raw.split("\t")[0].strip()
    if raw == "/dev/null":
        return None
    return raw[2:] if raw[:2] in ("a/", "b/") else raw


def _hunk_body(lines: list[str], i: int) -> tuple[list[str], int]:
    body = []
    while i < len(lines) and not HUNK.match(lines[i]) and not lines[i].startswith(("--- ", "diff --git")):
        line = lines[i]
        if line.startswith(("```", "~~~")):  # the end of a fenced diff (a context line would start with " ")
            break
        if line == "" and (i + 1 == len(lines) or lines[i + 1][:1] not in (" ", "-", "+", "")):
            break
        body.append(line if line[:1] in (" ", "-", "+", "\\") else " " + line)  # a bare blank context line
        i += 1
    return [b for b in body if not b.startswith("\\")], i
