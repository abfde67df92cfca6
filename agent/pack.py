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

from ds4.agent.budget import Sizer, allocate, steps
from ds4.agent.errors import InputError
from ds4.agent.index.languages import language_of
from ds4.agent.index.query import indexed_files
from ds4.agent.rank import Focus, body_matches, focus, is_secondary, rank
from ds4.agent.tokens import TokenCounter, token_counts
from ds4.agent.views import SKELETON, WHOLE, FileBlock, Part, View, from_manifest, mode_of

PROMPTS = Path(__file__).resolve().parent / "prompts"
SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY( BLOCK)?-----"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{32,}\b"),
}


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
    blocks: list[FileBlock]  # the files part as data: each placed file's block, in prompt order

    def manifest(self) -> dict:
        out = {k: getattr(self, k) for k in ("budget", "total_tokens", "repo_prefix_tokens", "secrets")}
        out["files"] = [asdict(f) for f in self.files]
        return out


# -- inputs -----------------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def stability_order(repo: Path, paths: list[str]) -> list[str]:
    """Oldest change first: last commit time (uncommitted edits count as now), else mtime; then path."""
    when: dict[str, float] = {}
    try:
        log = _git_output(repo, "log", "--format=%x00%ct", "--name-only", "--no-renames")
        stamp = 0.0
        for line in log.splitlines():
            if line.startswith("\0"):
                stamp = float(line[1:])
            elif line and line not in when:
                when[line] = stamp
        dirty = _git_output(repo, "status", "--porcelain", "-z", "--untracked-files=all")
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


def _git_output(repo: Path, *args: str) -> str:
    """The stdout of `git -C repo args`; raises CalledProcessError where git fails."""
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


# -- assembly ---------------------------------------------------------------------------------------


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
        for row in indexed_files(db)
        for fid, path, _, _ in [row]
    ]
    text_of = {path: text for _, path, _, text in files}
    order = stability_order(repo, list(text_of))
    plan = Plan(
        system=(PROMPTS / "system.md").read_text(),
        tree=tree_listing(order),
        issue=f"\n<issue>\n{issue.strip()}\n</issue>\n",
        feedback=f"\n<feedback>\n{feedback.strip()}\n</feedback>\n" if feedback.strip() else "",
        order=order,
        sizer=Sizer(db, text_of, token_counts(db, files, counter), counter),
        budget=budget,
    )
    _choose(plan, db, issue, previous, overlay)
    packed = _assemble(plan)
    while packed.total_tokens > budget:  # boundary merges can differ from per-file counts: trim, recount
        placed = [p for p in order if plan.shown[p] is not None]
        if previous is not None:  # keeping a selection: give way at the end, where the prefix is not hurt
            victim = placed[-1] if placed else None
        else:
            victim = min(placed, key=lambda p: (plan.scores[p][0], p), default=None)
        if victim is None:
            raise InputError(f"budget {budget} is below the {packed.total_tokens} tokens of the fixed parts")
        plan.shown[victim] = SKELETON if plan.shown[victim] == WHOLE and victim not in overlay else None
        packed = _assemble(plan)
    return packed


@dataclass
class Plan:
    """What a prompt is assembled from: its fixed parts, the files in prompt order (most stable first),
    what of each is shown, and why (rank scores and reasons, the bodies in focus)."""

    system: str
    tree: str
    issue: str  # the issue part, tagged
    feedback: str  # the feedback part, tagged; "" without feedback
    order: list[str]
    sizer: Sizer
    budget: int
    shown: dict[str, View] = field(default_factory=dict)
    scores: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    focuses: dict[str, Focus] = field(default_factory=dict)


def _choose(
    plan: Plan, db: sqlite_utils.Database, issue: str, previous: dict | None, overlay: dict[str, str]
) -> None:
    """What of each file to show: everything when it fits; else the earlier selection (new files listed);
    else ranked, unsaved buffers first, taken step by step while they fit."""
    order, sizer = plan.order, plan.sizer
    fixed = sizer.counter.count(plan.system + "\n" + plan.tree + plan.issue + plan.feedback)
    if fixed + sum(sizer.whole.values()) <= plan.budget:  # everything fits: no ranking needed
        plan.shown = {p: WHOLE for p in order}
        plan.scores = {p: (0.0, []) for p in order}
    elif previous is not None:  # keep the earlier selection; new files start listed
        plan.scores = rank(db, issue, order)
        kept = {f["path"]: from_manifest(f) for f in previous.get("files", [])}
        plan.shown = {p: kept.get(p) for p in order}
    else:
        bodies = body_matches(db, issue, order)
        scores = rank(db, issue, order, bodies)
        for path in overlay:
            if path in scores:
                scores[path] = (float("inf"), scores[path][1])
        plan.scores = scores
        plan.focuses = {p: f for p, f in focus(db, issue, scores, bodies).items() if p not in overlay}
        secondary = frozenset(p for p in order if is_secondary(p, issue))
        offers = steps(order, scores, plan.focuses, set(overlay), secondary)
        plan.shown = allocate(offers, plan.budget - fixed, sizer)


def _assemble(plan: Plan) -> Packed:
    blocks, entries = [], []
    for path in plan.order:
        shown = plan.shown[path]
        score, why = round(plan.scores[path][0], 4), list(plan.scores[path][1])
        bodies = sorted(shown.bodies) if isinstance(shown, Part) else []
        if path in plan.focuses:
            lines = plan.focuses[path].lines
            why += [f"body at line {line}: {w}" for line, w in lines.items() if line in bodies]
        if shown is not None:
            blocks.append(FileBlock(path, plan.sizer.text(path, shown)))
        entries.append(FileEntry(path, mode_of(shown), plan.sizer.tokens(path, shown), score, why, bodies))
    files_part = "".join(block.render() for block in blocks)
    repo_part = plan.system + "\n" + plan.tree + files_part
    prompt = repo_part + plan.issue + plan.feedback
    secrets = find_secrets({block.path: plan.sizer.text_of[block.path] for block in blocks})
    return Packed(
        prompt=prompt,
        budget=plan.budget,
        total_tokens=plan.sizer.counter.count(prompt),
        repo_prefix_tokens=plan.sizer.counter.count(repo_part),
        files=entries,
        secrets=secrets,
        parts={
            "system": plan.system,
            "tree": plan.tree,
            "files": files_part,
            "issue": plan.issue,
            "feedback": plan.feedback,
        },
        blocks=blocks,
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
        for block in packed.blocks:
            entry = modes[block.path]
            out.append(
                f'<file path={quoteattr(entry.path)} mode="{entry.mode}" tokens="{entry.tokens}">'
                f"{escape(block.body)}</file>"
            )
        issue = packed.parts["issue"].strip().removeprefix("<issue>").removesuffix("</issue>").strip()
        out += [f"<issue>{escape(issue)}</issue>", "</repository>"]
        return "\n".join(out) + "\n"
    if fmt == "markdown":
        out = ["# Repository", "", packed.parts["tree"], ""]
        for block in packed.blocks:
            path, body = block.path, block.body
            fence = "````" if "```" in body else "```"
            out += [f"## {path}", "", f"{fence}{language_of(path) or ''}", body.rstrip("\n"), fence, ""]
        out += [
            "# Issue",
            "",
            packed.parts["issue"].strip().removeprefix("<issue>").removesuffix("</issue>").strip(),
        ]
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {fmt!r}: prompt, markdown, xml or json")
