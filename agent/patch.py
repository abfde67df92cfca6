"""Edits from a model's answer (parsed in answer.py: SEARCH/REPLACE blocks or unified diffs),
matched against the real files by a ladder of pure matchers, checked by a lint gate, and written all
or nothing, only inside the working tree (writes.py: never under `.git/` nor through a symlink,
checked again at write time).
A refusal says which block failed, shows the closest real lines and which blocks applied.

Ladder, strictest first: exact; trailing whitespace ignored; uniform re-indent; blank lines trimmed;
`...` elision. A match must be unique; a diff hunk's line number only breaks ties between equal matches.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ds4.agent.answer import ELLIPSIS, Edit, parse
from ds4.agent.errors import PatchError
from ds4.agent.writes import WriteRefused, inside, write_all


@dataclass
class Result:
    files: dict[str, str | None] = field(default_factory=dict)  # path -> new text (None: deleted)
    applied: list[int] = field(default_factory=list)
    how: dict[int, str] = field(default_factory=dict)  # block -> the matcher that placed it


# -- matching ---------------------------------------------------------------------------------------


def _spans(hay: list[str], needle: list[str], key) -> list[int]:
    keyed_hay, keyed = [key(x) for x in hay], [key(x) for x in needle]
    n = len(keyed)
    return [s for s in range(len(hay) - n + 1) if keyed_hay[s : s + n] == keyed]


def _choose(starts: list[int], hint: int | None, edit: Edit, what: str) -> int | None:
    if len(starts) == 1:
        return starts[0]
    if len(starts) > 1 and hint is not None:
        best = sorted(starts, key=lambda s: abs(s + 1 - hint))
        if abs(best[0] + 1 - hint) < abs(best[1] + 1 - hint):
            return best[0]
    if len(starts) > 1:
        lines = ", ".join(str(s + 1) for s in starts[:6])
        raise PatchError(
            f"block {edit.index} ({edit.path}): the SEARCH text {what} matches {len(starts)} places "
            f"(lines {lines}); include more surrounding lines so it matches exactly one"
        )
    return None


def _lines(text: str) -> list[str]:
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def place(content: str, edit: Edit) -> tuple[str, str]:
    """The file's new text after one edit, and the name of the matcher that placed it."""
    if "\r\n" in content:  # match on LF, give the file back its CRLF endings
        text, how = place(content.replace("\r\n", "\n"), edit)
        return text.replace("\n", "\r\n"), how
    if edit.search == "":
        if content.strip():
            raise PatchError(
                f"block {edit.index} ({edit.path}): an empty SEARCH creates a file, but the file "
                "already has content; quote the lines to change"
            )
        return edit.replace, "create"
    hay, old, new = _lines(content), _lines(edit.search), _lines(edit.replace)
    tail = "\n" if content.endswith("\n") or not content else ""
    for name, matcher in MATCHERS:
        result = matcher(hay, old, new, edit)
        if result is not None:
            return "\n".join(result) + (tail if result else ""), name
    raise PatchError(_no_match(content, edit))


def _exact(hay, old, new, edit):
    start = _choose(_spans(hay, old, lambda x: x), edit.line_hint, edit, "")
    return None if start is None else hay[:start] + new + hay[start + len(old) :]


def _trailing_space(hay, old, new, edit):
    start = _choose(_spans(hay, old, str.rstrip), edit.line_hint, edit, "(ignoring trailing spaces)")
    return None if start is None else hay[:start] + new + hay[start + len(old) :]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _reindent(hay, old, new, edit):
    """The SEARCH lines indented uniformly more or less than the file: shift the REPLACE lines alike."""
    first = next((l for l in old if l.strip()), None)
    if first is None:
        return None
    starts = _spans(hay, old, str.strip)
    fits = []
    for s in starts:
        real = next(h for h, o in zip(hay[s:], old, strict=False) if o.strip())
        delta = len(_indent(real)) - len(_indent(first))
        if all(not o.strip() or _shift(o, delta) == h.rstrip() for o, h in zip(old, hay[s:], strict=False)):
            fits.append((s, delta))
    start = _choose([s for s, _ in fits], edit.line_hint, edit, "(re-indented)")
    if start is None:
        return None
    delta = dict(fits)[start]
    return hay[:start] + [_shift(l, delta) if l.strip() else l for l in new] + hay[start + len(old) :]


def _shift(line: str, delta: int) -> str:
    line = line.rstrip()
    if delta >= 0:
        return " " * delta + line
    return line[min(-delta, len(_indent(line))) :]


def _trimmed(hay, old, new, edit):
    def trim(lines):
        while lines and not lines[0].strip():
            lines = lines[1:]
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        return lines

    t_old, t_new = trim(old), trim(new)
    if not t_old or t_old == old:
        return None
    for matcher in (_exact, _trailing_space, _reindent):
        result = matcher(hay, t_old, t_new, edit)
        if result is not None:
            return result
    return None


def _elided(hay, old, new, edit):
    """`...` lines in SEARCH stand for lines kept as they are; REPLACE must elide at the same places."""
    if not any(ELLIPSIS.match(l) for l in old):
        return None
    old_parts, new_parts = _split(old), _split(new)
    if len(old_parts) != len(new_parts):
        raise PatchError(
            f"block {edit.index} ({edit.path}): SEARCH and REPLACE must use `...` the same number of times"
        )
    out, pos = [], 0
    starts = []
    for part in old_parts:
        found = [s for s in _spans(hay, part, str.rstrip) if s >= pos]
        if not found:
            return None
        starts.append(found[0])
        pos = found[0] + len(part)
    pos = 0
    for part, repl, start in zip(old_parts, new_parts, starts, strict=True):
        out += hay[pos:start] + repl
        pos = start + len(part)
    return out + hay[pos:]


def _split(lines: list[str]) -> list[list[str]]:
    parts, cur = [], []
    for l in lines:
        if ELLIPSIS.match(l):
            parts.append(cur)
            cur = []
        else:
            cur.append(l)
    return [p for p in parts + [cur]]


MATCHERS = [
    ("exact", _exact),
    ("trailing whitespace", _trailing_space),
    ("re-indent", _reindent),
    ("blank lines trimmed", _trimmed),
    ("... elision", _elided),
]


def _no_match(content: str, edit: Edit) -> str:
    hay, old = _lines(content), _lines(edit.search)
    size = max(len(old), 1)
    best, best_start = 0.0, 0
    target = "\n".join(l.strip() for l in old)
    for s in range(0, max(len(hay) - size + 1, 1)):
        ratio = difflib.SequenceMatcher(None, target, "\n".join(l.strip() for l in hay[s : s + size])).ratio()
        if ratio > best:
            best, best_start = ratio, s
    shown = "\n".join(
        f"{best_start + k + 1:>5} | {l}" for k, l in enumerate(hay[best_start : best_start + size])
    )
    return (
        f"block {edit.index} ({edit.path}): the SEARCH lines are not in the file. "
        f"The closest lines ({best:.0%} similar) are:\n{shown}"
    )


# -- applying ---------------------------------------------------------------------------------------


def apply(
    answer: str | list[Edit],
    root: str | Path,
    write: bool = True,
    lint: bool = True,
    base: dict[str, str] | None = None,
) -> Result:
    """Applies every edit or none: PatchError (nothing written) unless all place, and lint when asked.
    `base`: texts to edit instead of the files on disk (an editor's unsaved buffers), by relative path."""
    root = Path(root).resolve()
    edits = parse(answer) if isinstance(answer, str) else answer
    result, state = Result(), {}
    for edit in edits:
        try:
            _read_target(root, edit, state, base)
            _apply_one(state, edit, result, root)
        except (PatchError, WriteRefused, OSError) as e:
            done = ", ".join(map(str, result.applied)) or "none"
            raise PatchError(
                f"{_reason(e)}\n(blocks applied before it: {done}; nothing was written)"
            ) from None
    try:
        changed = {p: t for p, t in state.items() if t is not None or (root / p).exists()}
        if lint:
            _lint_gate(root, changed)
        result.files = changed
        if write:
            write_all(root, changed)
    except (
        WriteRefused,
        OSError,
    ) as e:  # a name too long, a folder where a file goes: feedback, the tree as it was
        raise PatchError(f"{_reason(e)}; nothing was written") from None
    return result


def _reason(error: PatchError | WriteRefused | OSError) -> str:
    if isinstance(error, (PatchError, WriteRefused)):
        return str(error)
    name = Path(error.filename).name if error.filename else "a file"
    return f"cannot write {name[:80]}: {error.strerror or error}"


def _read_target(root: Path, edit: Edit, state: dict, base: dict[str, str] | None) -> None:
    """Checks the edit's path and loads the file's current text into `state` once."""
    edit.path = _existing(root, edit.path)
    path = inside(root, edit.path, edit.index)
    if base and edit.path in base and edit.path not in state:
        state[edit.path] = base[edit.path]
    if edit.path not in state:  # bytes, not text mode: CRLF endings must survive
        state[edit.path] = path.read_bytes().decode("utf-8", "surrogateescape") if path.is_file() else None


def _existing(root: Path, rel: str) -> str:
    """The path as given, or without a stray diff prefix (a/, b/) or leading ./ when only that exists."""
    rel = rel.strip().removeprefix("./")
    if not (root / rel).exists():
        for prefix in ("a/", "b/"):
            if rel.startswith(prefix) and (root / rel[2:]).exists():
                return rel[2:]
    return rel


def _apply_one(state: dict, edit: Edit, result: Result, root: Path) -> None:
    if edit.new_path is not None:  # rename
        inside(root, edit.new_path, edit.index)
        if state.get(edit.path) is None:
            raise PatchError(f"block {edit.index}: cannot rename {edit.path}, it does not exist")
        state[edit.new_path], state[edit.path] = state[edit.path], None
        how = "rename"
    elif edit.delete:
        if state.get(edit.path) is None:
            raise PatchError(f"block {edit.index}: cannot delete {edit.path}, it does not exist")
        state[edit.path], how = None, "delete"
    else:
        current = state.get(edit.path)
        if current is None and edit.search:
            raise PatchError(
                f"block {edit.index}: {edit.path} does not exist; to create it, leave SEARCH empty"
            )
        state[edit.path], how = place(current or "", edit)
    result.applied.append(edit.index)
    result.how[edit.index] = how


def _lint_gate(root: Path, files: dict[str, str | None]) -> None:
    from ds4.agent.index.languages import language_of
    from ds4.agent.index.tags import has_tags
    from ds4.agent.index.tags import parse as ts_parse

    for rel, text in files.items():
        if text is None:
            continue
        if rel.endswith(".py"):
            try:
                compile(text, rel, "exec", dont_inherit=True)
            except SyntaxError as e:
                raise PatchError(
                    f"{rel}: the edit leaves a syntax error at line {e.lineno}: {e.msg}; nothing was written"
                ) from None
            continue
        language = language_of(rel)
        if language is None or not has_tags(language):
            continue
        before = (root / rel).read_bytes() if (root / rel).is_file() else b""
        if ts_parse(language, text.encode()).root_node.has_error and not (
            before and ts_parse(language, before).root_node.has_error
        ):
            raise PatchError(
                f"{rel}: the edit leaves code that does not parse as {language}; nothing was written"
            )
