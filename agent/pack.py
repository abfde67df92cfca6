"""The context packer: a repository and an issue as one prompt, laid out for prefix reuse and ranked
when the repository does not fit.

Layout: [system][repository tree][files, most stable first][issue][feedback]. Files are ordered by
their last change (git history, uncommitted edits last, then path), so an edit invalidates only what
follows the edited file; `repo_prefix_tokens` says where the repository part ends. Over budget, files
and their definitions are ranked against the issue (rank.py); the bodies the issue is about go in
inside their file's skeleton, then whole files, then skeletons, then the listing (capped, folders
summarised, in huge repositories). The prompt never exceeds the budget: the final assembly is counted
with the model's tokenizer and trimmed until it fits.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import sqlite_utils

from ds4.agent.errors import InputError
from ds4.agent.index.languages import language_of
from ds4.agent.rank import focus, rank
from ds4.agent.views import SKELETON, WHOLE, Part, View, from_manifest, join, mode_of, skeleton

PROMPTS = Path(__file__).resolve().parent / "prompts"
SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY( BLOCK)?-----"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{32,}\b"),
}


class TokenCounter:
    """Token counts with a checkpoint's tokenizer.json (no torch), batched; its fingerprint keys caches."""

    def __init__(self, tokenizer_file: str | Path):
        from tokenizers import Tokenizer

        data = Path(tokenizer_file).read_bytes()
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self._tok = Tokenizer.from_str(data.decode())

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_batch(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


@dataclass
class FileEntry:
    path: str
    mode: str  # "whole" | "focused" (a skeleton with some bodies) | "skeleton" | "listed"
    tokens: int  # of its text as placed (0 when listed)
    score: float
    why: list[str] = field(default_factory=list)
    bodies: list[int] = field(default_factory=list)  # first lines of the definitions shown whole (focused)


@dataclass
class Packed:
    prompt: str
    budget: int
    total_tokens: int
    repo_prefix_tokens: int  # tokens of [system][tree][files]: the prefix to pin
    files: list[FileEntry]
    secrets: list[dict]
    parts: dict[str, str]  # system, tree, files, issue, feedback

    def manifest(self) -> dict:
        out = {k: getattr(self, k) for k in ("budget", "total_tokens", "repo_prefix_tokens", "secrets")}
        out["files"] = [asdict(f) for f in self.files]
        return out


# -- inputs -----------------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _indexed_files(db: sqlite_utils.Database) -> list[tuple[int, str, str, str]]:
    """(id, path, hash, text) of every indexed text file."""
    return db.execute(
        "SELECT f.id, f.path, f.hash, c.text FROM files f JOIN contents c ON c.file_id = f.id "
        "WHERE f.skipped IS NULL ORDER BY f.path"
    ).fetchall()


def token_counts(db: sqlite_utils.Database, files, counter: TokenCounter) -> dict[str, int]:
    """Each file's token count: cached in the index by content hash, else counted in batches."""
    cached = {
        row[0]: (row[1], row[2])
        for row in db.execute(
            "SELECT file_id, hash, count FROM token_counts WHERE tokenizer = ?", [counter.fingerprint]
        )
    }
    todo = [(fid, path, h, text) for fid, path, h, text in files if cached.get(fid, (None,))[0] != h]
    counts = {path: cached[fid][1] for fid, path, h, _ in files if cached.get(fid, (None,))[0] == h}
    for first in range(0, len(todo), 256):
        chunk = todo[first : first + 256]
        numbers = counter.count_batch([_wrap(path, text) for _, path, _, text in chunk])
        counts.update({path: n for (_, path, _, _), n in zip(chunk, numbers, strict=True)})
        try:
            with db.conn:
                db.conn.executemany(
                    "INSERT OR REPLACE INTO token_counts (file_id, tokenizer, hash, count) "
                    "VALUES (?, ?, ?, ?)",
                    [
                        (fid, counter.fingerprint, h, n)
                        for (fid, _, h, _), n in zip(chunk, numbers, strict=True)
                    ],
                )
        except Exception as e:  # a read-only index still packs; the counts are just not cached
            if "readonly" not in str(e):
                raise
    return counts


def stability_order(repo: Path, paths: list[str]) -> list[str]:
    """Oldest change first: last commit time (uncommitted edits count as now), else mtime; then path."""
    when: dict[str, float] = {}
    try:
        log = subprocess.run(
            ["git", "-C", str(repo), "log", "--format=%x00%ct", "--name-only", "--no-renames"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        stamp = 0.0
        for line in log.splitlines():
            if line.startswith("\0"):
                stamp = float(line[1:])
            elif line and line not in when:
                when[line] = stamp
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "-z", "--untracked-files=all"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        for item in dirty.split("\0"):
            if len(item) > 3:
                when.pop(item[3:], None)  # fall through to mtime, newer than any commit
    except (subprocess.CalledProcessError, FileNotFoundError):
        pass

    def key(path: str):
        if path in when:
            return (0, when[path], path)
        try:
            return (1, (repo / path).stat().st_mtime, path)
        except OSError:
            return (1, 0.0, path)

    return sorted(paths, key=key)


# -- assembly ---------------------------------------------------------------------------------------


def _wrap(path: str, text: str) -> str:
    return f'<file path="{path}">\n{text}{"" if text.endswith(chr(10)) else chr(10)}</file>\n'


MAX_TREE_LINES = 2000  # past this many files the listing summarises folders


def tree_listing(paths: list[str], max_lines: int = MAX_TREE_LINES) -> str:
    """Every file by path; past `max_lines` files, folders below the deepest level that fits are one line
    each with their file count. It changes only when files are added, removed or renamed."""
    depth = max((p.count("/") + 1 for p in paths), default=1)
    lines = _listing_at(paths, depth)
    while len(lines) > max_lines and depth > 1:
        depth -= 1
        lines = _listing_at(paths, depth)
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... and {len(lines) - max_lines:,} more entries"]
    note = (
        f" ({len(paths):,} files; folders summarised)"
        if depth < max((p.count("/") + 1 for p in paths), default=1)
        else ""
    )
    return f"Repository files{note}:\n" + "".join(f"  {line}\n" for line in lines)


def _listing_at(paths: list[str], depth: int) -> list[str]:
    files, folders = [], Counter()
    for path in paths:
        parts = path.split("/")
        if len(parts) <= depth:
            files.append(path)
        else:
            folders["/".join(parts[:depth]) + "/"] += 1
    return sorted(files + [f"{folder} ({n:,} files)" for folder, n in folders.items()])


class _Sizer:
    """Texts and token counts of files as shown, counted once each."""

    def __init__(self, db, text_of: dict[str, str], whole: dict[str, int], counter):
        self.db, self.text_of, self.whole, self.counter = db, text_of, whole, counter
        self._defs: dict[str, list] = {}
        self._tokens: dict[tuple[str, View], int] = {}

    def text(self, path: str, shown: View) -> str:
        if shown == WHOLE:
            return self.text_of[path]
        if path not in self._defs:
            self._defs[path] = _definitions_of(self.db, path)
        return skeleton(self.text_of[path], self._defs[path], shown)

    def tokens(self, path: str, shown: View) -> int:
        if shown is None:
            return 0
        if shown == WHOLE:
            return self.whole[path]
        if (path, shown) not in self._tokens:
            self._tokens[path, shown] = self.counter.count(_wrap(path, self.text(path, shown)))
        return self._tokens[path, shown]

    def worth(self, path: str, shown: View, current: View, room: int) -> bool:
        """Whether counting `shown` exactly is worth it: shorter than the whole file, and by a character
        estimate not far past the room left beside what `current` already takes."""
        if shown == WHOLE or shown is None:
            return True
        text, full = self.text(path, shown), self.text_of[path]
        estimate = self.whole[path] * len(text) / max(len(full), 1)
        return len(text) < len(full) and estimate <= 1.2 * room + self.tokens(path, current)


def pack(
    db: sqlite_utils.Database,
    repo: str | Path,
    issue: str,
    budget: int,
    counter: TokenCounter,
    feedback: str = "",
    previous: dict | None = None,
    overlay: dict[str, str] | None = None,
) -> Packed:
    """Over budget, what goes in is chosen step by step, each taken when it fits the room left: the
    bodies of the definitions the issue is about inside their file's skeleton (named or in a traceback,
    then their callers, then bodies sharing its words; highest-ranked file first), then whole files,
    then skeletons; the rest is listed. So more budget never shows less of an earlier step.
    `previous`: an earlier pack's manifest for the same repository and issue. Its selection is kept
    while it fits, so that an edit changes only the edited file's block (the rest of the prefix, which
    the engine has cached, stays byte-identical); over budget, the lowest-ranked files give way.
    `overlay`: an editor's unsaved buffers (relative path -> text), packed instead of the indexed text;
    they are what the user is working on, so they rank first, and whole or not at all (the index's
    skeleton lines would not match them)."""
    repo = Path(repo).resolve()
    overlay = overlay or {}
    files = [
        (fid, path, "buffer:" + _digest(overlay[path]), overlay[path]) if path in overlay else row
        for row in _indexed_files(db)
        for fid, path, _, _ in [row]
    ]
    text_of = {path: text for _, path, _, text in files}
    order = stability_order(repo, list(text_of))
    system = (PROMPTS / "system.md").read_text()
    tree = tree_listing(order)
    issue_part = f"\n<issue>\n{issue.strip()}\n</issue>\n"
    feedback_part = f"\n<feedback>\n{feedback.strip()}\n</feedback>\n" if feedback.strip() else ""
    sizer = _Sizer(db, text_of, token_counts(db, files, counter), counter)
    fixed = counter.count(system + "\n" + tree + issue_part + feedback_part)
    focuses = {}
    if fixed + sum(sizer.whole.values()) <= budget:  # everything fits: no ranking needed
        shown: dict[str, View] = {p: WHOLE for p in order}
        scores = {p: (0.0, []) for p in order}
    elif previous is not None:  # keep the earlier selection; new files start listed
        scores = rank(db, issue, order)
        kept = {f["path"]: from_manifest(f) for f in previous.get("files", [])}
        shown = {p: kept.get(p) for p in order}
    else:
        scores = rank(db, issue, order)
        for path in overlay:
            if path in scores:
                scores[path] = (float("inf"), scores[path][1])
        focuses = {p: f for p, f in focus(db, issue, scores, text_of).items() if p not in overlay}
        steps = _steps(order, scores, focuses, set(overlay))
        shown = _allocate(steps, budget - fixed, sizer)
    parts = (system, tree, issue_part, feedback_part)
    packed = _assemble(order, shown, scores, focuses, sizer, parts, budget)
    while packed.total_tokens > budget:  # boundary merges can differ from per-file counts: trim, recount
        placed = [p for p in order if shown[p] is not None]
        if previous is not None:  # keeping a selection: give way at the end, where the prefix is not hurt
            victim = placed[-1] if placed else None
        else:
            victim = min(placed, key=lambda p: (scores[p][0], p), default=None)
        if victim is None:
            raise InputError(f"budget {budget} is below the {packed.total_tokens} tokens of the fixed parts")
        shown[victim] = SKELETON if shown[victim] == WHOLE and victim not in overlay else None
        packed = _assemble(order, shown, scores, focuses, sizer, parts, budget)
    return packed


def _definitions_of(db, path: str) -> list[tuple[str, int, int, str]]:
    return db.execute(
        "SELECT d.kind, d.line, d.end_line, d.doc FROM definitions d JOIN files f "
        "ON f.id = d.file_id WHERE f.path = ? ORDER BY d.line",
        [path],
    ).fetchall()


def _steps(order, scores, focuses, whole_only: set[str]) -> list[tuple[str, View]]:
    """The order in which content is offered: focused bodies by priority (named or traceback, callers,
    shared words) and file rank, then whole files by rank, then skeletons by rank."""
    by_rank = sorted(order, key=lambda p: (-scores[p][0], p))
    steps: list[tuple[str, View]] = []
    for level in range(len(FOCUS_LEVELS)):
        for path in (p for p in by_rank if p in focuses):
            lines = [line for line, why in focuses[path].lines.items() if _level(why) == level]
            if lines:
                steps.append((path, Part(frozenset(lines), outline=False)))
    steps += [(p, WHOLE) for p in by_rank]
    steps += [(p, SKELETON) for p in by_rank if p not in whole_only]
    return steps


FOCUS_LEVELS = (("named", "traceback"), ("calls",), ("shares",))


def _level(why: str) -> int:
    return next(i for i, starts in enumerate(FOCUS_LEVELS) if why.startswith(starts))


def _allocate(steps: list[tuple[str, View]], room: int, sizer: _Sizer) -> dict[str, View]:
    """Each step taken when it shows more of its file than before and the extra tokens fit the room."""
    shown: dict[str, View] = {path: None for path in sizer.text_of}
    for path, offer in steps:
        current, target = shown[path], join(shown[path], offer)
        if target == current or not sizer.worth(path, target, current, room):
            continue
        extra = sizer.tokens(path, target) - sizer.tokens(path, current)
        if extra <= room:
            shown[path], room = target, room - extra
    return shown


def _assemble(order, shown, scores, focuses, sizer: _Sizer, parts, budget) -> Packed:
    system, tree, issue_part, feedback_part = parts
    blocks, entries = [], []
    for path in order:
        score, why = round(scores[path][0], 4), list(scores[path][1])
        bodies = sorted(shown[path].bodies) if isinstance(shown[path], Part) else []
        if path in focuses:
            why += [f"body at line {line}: {w}" for line, w in focuses[path].lines.items() if line in bodies]
        if shown[path] is not None:
            blocks.append(_wrap(path, sizer.text(path, shown[path])))
        entries.append(
            FileEntry(path, mode_of(shown[path]), sizer.tokens(path, shown[path]), score, why, bodies)
        )
    files_part = "".join(blocks)
    repo_part = system + "\n" + tree + files_part
    prompt = repo_part + issue_part + feedback_part
    secrets = find_secrets({p: sizer.text_of[p] for p in order if shown[p] is not None})
    return Packed(
        prompt=prompt,
        budget=budget,
        total_tokens=sizer.counter.count(prompt),
        repo_prefix_tokens=sizer.counter.count(repo_part),
        files=entries,
        secrets=secrets,
        parts={
            "system": system,
            "tree": tree,
            "files": files_part,
            "issue": issue_part,
            "feedback": feedback_part,
        },
    )


def find_secrets(texts: dict[str, str]) -> list[dict]:
    found = []
    for path, text in texts.items():
        for kind, pattern in SECRET_PATTERNS.items():
            for m in pattern.finditer(text):
                found.append({"path": path, "line": text.count("\n", 0, m.start()) + 1, "kind": kind})
    return found


def render(packed: Packed, fmt: str) -> str:
    """The prompt as the model sees it ("prompt"), or for people and tools: markdown, xml, json."""
    if fmt == "prompt":
        return packed.prompt
    if fmt == "json":
        return json.dumps(
            {"prompt": packed.prompt, "parts": packed.parts, "manifest": packed.manifest()}, indent=2
        )
    if fmt == "xml":  # a well-formed document: contents escaped, modes and token counts as attributes
        modes = {f.path: f for f in packed.files}
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<repository budget="{packed.budget}" '
            f'total_tokens="{packed.total_tokens}" repo_prefix_tokens="{packed.repo_prefix_tokens}">',
            f"<tree>{escape(packed.parts['tree'])}</tree>",
        ]
        for match in re.finditer(r'<file path="([^"]+)">\n(.*?)</file>\n', packed.parts["files"], re.S):
            entry = modes[match.group(1)]
            out.append(
                f'<file path={quoteattr(entry.path)} mode="{entry.mode}" tokens="{entry.tokens}">'
                f"{escape(match.group(2))}</file>"
            )
        issue = packed.parts["issue"].strip().removeprefix("<issue>").removesuffix("</issue>").strip()
        out += [f"<issue>{escape(issue)}</issue>", "</repository>"]
        return "\n".join(out) + "\n"
    if fmt == "markdown":
        out = ["# Repository", "", packed.parts["tree"], ""]
        for match in re.finditer(r'<file path="([^"]+)">\n(.*?)</file>\n', packed.parts["files"], re.S):
            path, body = match.group(1), match.group(2)
            fence = "````" if "```" in body else "```"
            out += [f"## {path}", "", f"{fence}{language_of(path) or ''}", body.rstrip("\n"), fence, ""]
        out += [
            "# Issue",
            "",
            packed.parts["issue"].strip().removeprefix("<issue>").removesuffix("</issue>").strip(),
        ]
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {fmt!r}: prompt, markdown, xml or json")
