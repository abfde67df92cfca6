"""What of a file a prompt shows (a view): whole, a part (the bodies of some definitions, with or without
the skeleton of the rest: signatures and docstrings, bodies elided), or only its path in the listing;
the text of a view and the block a prompt wraps it in, and how views combine (more of a file is the join
of two views). It knows nothing of ranking or budgets."""

from __future__ import annotations

import re
from dataclasses import dataclass

BODY_KINDS = ("function", "method")
ELISION = "... ({n} lines elided)"
WHOLE = "whole"


@dataclass(frozen=True)
class Part:
    """The definitions starting on `bodies` (1-based lines) in full; with `outline`, the rest of the file
    as a skeleton, else elided."""

    bodies: frozenset = frozenset()
    outline: bool = True

    def covers(self, other: Part) -> bool:
        return self.bodies >= other.bodies and self.outline >= other.outline


View = Part | str | None  # None: listed only; WHOLE: the whole text
SKELETON = Part()


@dataclass(frozen=True)
class FileBlock:
    """A file as a prompt shows it: its path and the text of its view."""

    path: str
    text: str

    @property
    def body(self) -> str:
        """The text, ending in a newline."""
        return self.text if self.text.endswith("\n") else self.text + "\n"

    def render(self) -> str:
        return f'<file path="{self.path}">\n{self.body}</file>\n'


def join(a: View, b: View) -> View:
    """The least view showing everything `a` and `b` show."""
    if a is None or b is None:
        return b if a is None else a
    if WHOLE in (a, b):
        return WHOLE
    return Part(a.bodies | b.bodies, a.outline or b.outline)


def covers(a: View, b: View) -> bool:
    """Whether `a` shows everything `b` shows."""
    return join(a, b) == a


def mode_of(view: View) -> str:
    if view is None or view == WHOLE:
        return "listed" if view is None else "whole"
    if not view.outline:
        return "bodies"
    return "focused" if view.bodies else "skeleton"


def from_manifest(entry: dict) -> View:
    mode, bodies = entry["mode"], frozenset(entry.get("bodies", []))
    if mode in ("whole", "listed"):
        return WHOLE if mode == "whole" else None
    return Part(bodies, mode != "bodies")


def skeleton(text: str, definitions: list[tuple[str, int, int, str]], part: Part = SKELETON) -> str:
    """Signature and docstring lines of each function and method kept, bodies replaced by a marker;
    the definitions starting on a line in `part.bodies` stay whole (the ones the issue is about).
    Without `part.outline`, only those definitions (and the headers of what encloses them) remain."""
    lines = text.split("\n")
    drop: set[int] = set() if part.outline else set(range(len(lines)))
    for kind, line, end_line, doc in definitions if part.outline else ():
        if kind not in BODY_KINDS or end_line <= line or line in part.bodies:
            continue
        has_doc_below = bool(doc) and line < len(lines) and doc[:20] in lines[line]  # a Python docstring
        keep_to = line + (1 if has_doc_below else 0)  # the signature line, and the doc line after it
        drop.update(range(keep_to, end_line))  # 0-based indices of lines keep_to+1 .. end_line
    for _, line, end_line, _ in definitions:
        if line in part.bodies:  # whole even when it sits inside an elided body
            drop.difference_update(range(line - 1, end_line))
            drop.difference_update(_enclosing(definitions, line))
    out, run = [], 0
    for i, text_line in enumerate(lines):
        if i in drop:
            run += 1
            continue
        if run:
            out.append(_elision(lines, i - run, run))
            run = 0
        out.append(text_line)
    if run:
        out.append(_elision(lines, len(lines) - run, run))
    return "\n".join(out)


def _enclosing(definitions, line: int) -> list[int]:
    """0-based header lines of the definitions around the one starting on `line` (its class)."""
    return [first - 1 for _, first, end, _ in definitions if first < line <= end]


def _elision(lines: list[str], first: int, n: int) -> str:
    indent = re.match(r"\s*", lines[first]).group(0)
    return indent + ELISION.format(n=n)
