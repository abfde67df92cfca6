"""`ds4-agent bench pack --recall`: over a repository's recent small fixes, with each commit's message as
the issue, how often the pack shows every line the fix changed, next to a whole-file BM25 baseline.
Each parent is exported with `git archive` into a temporary folder and indexed there; the user's
repository, work tree and index are never touched.

Selection, newest first along `git log --no-merges` from HEAD: a commit with one parent that modifies 1 to
3 files which existed before (none added, deleted, renamed, binary, a link or a submodule), at least one
of them source (a language with a tag query, outside tests, docs and examples), with at most 60 lines
added plus removed over all its files.

Coverage: a commit is covered at a budget when every hunk of `git diff -U0 PARENT COMMIT` in its source
files shows its pre-image verbatim, adjacent and in order, inside that file's block of the prompt: the
removed lines; for a hunk that only adds, the line before and the line after the insertion point. Blank
lines say nothing of where an edit goes: a pre-image of blank lines only is widened a line at a time
on both sides until it holds a non-blank one, and blank lines at either end are left out.
The report also counts the commits covered with the hunks of their test and doc files required too.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ds4.agent.bm25 import bm25
from ds4.agent.errors import InputError
from ds4.agent.index.indexer import index_repo
from ds4.agent.index.languages import language_of
from ds4.agent.index.query import SECONDARY, indexed_files
from ds4.agent.index.store import open_index
from ds4.agent.index.tags import has_tags
from ds4.agent.pack import pack
from ds4.agent.tokens import TokenCounter, token_counts

MAX_FILES, MAX_CHANGED_LINES = 3, 60
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@", re.MULTILINE)
WORD = re.compile(r"\w+")
NOT_FILES = ("120000", "160000")  # git modes of symbolic links and submodules


@dataclass(frozen=True)
class Hunk:
    """The pre-image lines of one edited hunk that a prompt must show, adjacent and in order."""

    path: str
    lines: tuple[str, ...]
    is_source: bool


@dataclass
class Fix:
    """A commit the selection rule keeps: its id, its parent's, its subject and the files it modifies."""

    sha: str
    parent: str
    subject: str
    paths: list[str]


def is_source(path: str) -> bool:
    """Code the index parses into definitions, outside tests, docs and examples."""
    language = language_of(path)
    return language is not None and has_tags(language) and not SECONDARY.search(path.lower())


# -- which commits ----------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "core.quotePath=false", *args], capture_output=True, check=True
    ).stdout


def small_fixes(repo: Path, num_commits: int) -> list[Fix]:
    """The `num_commits` newest commits that match the selection rule (fewer when history has fewer)."""
    found: list[Fix] = []
    log = subprocess.Popen(
        ["git", "-C", str(repo), "-c", "core.quotePath=false", "log", "--no-merges", "--no-renames"]
        + ["--format=%x00%H %P%x00%s", "--raw", "--numstat"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        errors="replace",
    )
    try:
        commit: list[str] = []
        for line in log.stdout:
            if line.startswith("\0"):
                if (fix := _matching(commit)) is not None:
                    found.append(fix)
                    if len(found) == num_commits:
                        return found
                commit = []
            commit.append(line.rstrip("\n"))
        if (fix := _matching(commit)) is not None:
            found.append(fix)
        return found
    finally:
        log.kill()
        log.wait()


def _matching(commit: list[str]) -> Fix | None:
    """A Fix when one commit's `git log --raw --numstat` lines match the selection rule."""
    if not commit:
        return None
    shas, subject = commit[0][1:].split("\0", 1)
    ids = shas.split()
    statuses, changed = {}, 0
    for line in commit[1:]:
        if line.startswith(":"):  # :old_mode new_mode old new STATUS\tpath
            meta, path = line[1:].split("\t", 1)
            statuses[path] = (meta.split()[-1], meta.split()[1])
        elif line:  # added\tremoved\tpath; "-" for binary files
            added, removed, _ = line.split("\t", 2)
            if "-" in (added, removed):
                return None
            changed += int(added) + int(removed)
    paths = sorted(statuses)
    if (
        len(ids) != 2
        or not 1 <= len(paths) <= MAX_FILES
        or changed > MAX_CHANGED_LINES
        or any(status != "M" or mode in NOT_FILES for status, mode in statuses.values())
        or not any(is_source(p) for p in paths)
    ):
        return None
    return Fix(ids[0], ids[1], subject, paths)


def hunks(repo: Path, fix: Fix, tree: Path) -> list[Hunk]:
    """The pre-image each hunk of the fix must show, read from `tree` (the parent, exported)."""
    diff = _git(repo, "diff", "-U0", "--no-renames", "--no-color", "--no-ext-diff", fix.parent, fix.sha)
    out = []
    for part in diff.decode("utf-8", "replace").split("\ndiff --git "):
        path = next((line[6:] for line in part.splitlines() if line.startswith("--- a/")), None)
        if path is None or path not in fix.paths:
            continue
        old = (tree / path).read_bytes().decode("utf-8", "replace").split("\n")
        for m in HUNK.finditer(part):
            start, count = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
            out.append(Hunk(path, pre_image(old, start, count), is_source(path)))
    return out


def pre_image(old: list[str], start: int, count: int) -> tuple[str, ...]:
    """Lines `start`..`start + count - 1` (1-based) of `old`; for an insertion after line `start`
    (count 0), that line and the next; widened while all of them are blank, then blank lines trimmed
    from both ends (a blank line says nothing of where the edit goes)."""
    lo, hi = (start - 1, start - 1 + count) if count else (max(start - 1, 0), min(start + 1, len(old)))
    while not any(line.strip() for line in old[lo:hi]) and (lo > 0 or hi < len(old)):
        lo, hi = max(lo - 1, 0), min(hi + 1, len(old))
    while hi > lo and not old[hi - 1].strip():
        hi -= 1
    while lo < hi and not old[lo].strip():
        lo += 1
    return tuple(old[lo:hi])


def shows(text: str, lines: tuple[str, ...]) -> bool:
    """Whether `lines` are whole, adjacent lines of `text`."""
    return "\n" + "\n".join(lines) + "\n" in "\n" + text + "\n"


def export(repo: Path, commit: str, tree: Path) -> None:
    """The commit's files in `tree` (a fresh git repository with nothing committed, so that a temporary
    folder inside another repository is not read as part of it); every file's mtime now, so the
    index re-reads each (its content hash decides what is parsed again)."""
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_git(repo, "archive", "--format=tar", commit))) as archive:
        archive.extractall(tree, filter="data")
    subprocess.run(["git", "init", "-q", str(tree)], check=True, capture_output=True)
    now = time.time_ns()
    for folder, _, names in os.walk(tree):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.utime(path, ns=(now, now))


# -- the baseline -----------------------------------------------------------------------------------


def bm25_order(texts: dict[str, str], issue: str) -> list[str]:
    """Paths by plain Okapi BM25 of their whole text (lowercased \\w+ words) against the issue's words,
    best first; ties by path."""
    docs = {path: Counter(w.lower() for w in WORD.findall(text)) for path, text in texts.items()}
    scores = bm25(docs, {w.lower() for w in WORD.findall(issue)})
    return sorted(texts, key=lambda p: (-scores.get(p, 0.0), p))


def bm25_pack(texts: dict[str, str], tokens: dict[str, int], issue: str, room: int) -> dict[str, str]:
    """Whole files in BM25 order, each taken when it fits the room left (no skeletons): path -> text."""
    chosen = {}
    for path in bm25_order(texts, issue):
        if tokens[path] <= room:
            chosen[path], room = texts[path], room - tokens[path]
    return chosen


# -- the measurement --------------------------------------------------------------------------------


def covered(shown: dict[str, str], required: list[Hunk], source_only: bool) -> bool:
    return all(
        h.path in shown and shows(shown[h.path], h.lines) for h in required if h.is_source or not source_only
    )


def bench_recall(
    repo: str | Path,
    tokenizer_file: str | Path,
    num_commits: int = 30,
    budgets: tuple[int, ...] = (32_000, 128_000),
    progress: Callable[[int, int, Fix], None] | None = None,
) -> dict:
    """Per commit and budget, whether ds4's pack and the BM25 baseline show the fix's pre-image."""
    repo = Path(repo).resolve()
    try:
        head = _git(repo, "rev-parse", "HEAD").decode().strip()
    except subprocess.CalledProcessError:
        raise InputError(f"{repo} is not a git repository with commits; --recall reads its history") from None
    fixes = small_fixes(repo, num_commits)
    if not fixes:
        raise InputError(f"{repo}: no commit matches the selection rule (see `ds4-agent bench pack --help`)")
    counter = TokenCounter(tokenizer_file)
    commits = []
    with tempfile.TemporaryDirectory(prefix="ds4-recall-") as tmp:
        tree, db_path = Path(tmp) / "tree", Path(tmp) / "index.db"
        for i, fix in enumerate(fixes):
            if progress is not None:
                progress(i, len(fixes), fix)
            export(repo, fix.parent, tree)
            index_repo(tree, db_path)
            commits.append(_measure(repo, fix, tree, db_path, counter, budgets))
    return {
        "repo": str(repo),
        "head": head,
        "asked": num_commits,
        "tokenizer": str(tokenizer_file),
        "budgets": list(budgets),
        "commits": commits,
        "covered": {
            str(b): {
                key: sum(c["budgets"][str(b)][key] for c in commits)
                for key in ("ds4", "bm25", "ds4_all_hunks", "bm25_all_hunks")
            }
            for b in budgets
        },
    }


def _measure(repo: Path, fix: Fix, tree: Path, db_path: Path, counter, budgets) -> dict:
    required = hunks(repo, fix, tree)
    issue = _git(repo, "log", "-1", "--format=%B", fix.sha).decode("utf-8", "replace").strip()
    out = {"sha": fix.sha, "subject": fix.subject, "paths": fix.paths, "hunks": len(required), "budgets": {}}
    with open_index(db_path) as db:
        files = indexed_files(db)
        texts = {path: text for _, path, _, text in files}
        tokens = token_counts(db, files, counter)
        for budget in budgets:
            packed = pack(db, tree, issue, budget, counter)
            ds4 = {block.path: block.text for block in packed.blocks}
            fixed = counter.count(
                packed.parts["system"] + "\n" + packed.parts["tree"] + packed.parts["issue"]
            )
            bm25 = bm25_pack(texts, tokens, issue, budget - fixed)
            modes = {f.path: f.mode for f in packed.files}
            out["budgets"][str(budget)] = {
                "ds4": covered(ds4, required, source_only=True),
                "bm25": covered(bm25, required, source_only=True),
                "ds4_all_hunks": covered(ds4, required, source_only=False),
                "bm25_all_hunks": covered(bm25, required, source_only=False),
                "ds4_modes": {p: modes.get(p, "not indexed") for p in fix.paths},
                "bm25_files": len(bm25),
            }
    return out


def format_recall_report(r: dict) -> str:
    n = len(r["commits"])
    lines = [
        f"repo {r['repo']} at {r['head'][:12]}; {n} small fixes (commit message as the issue)",
        f"{'budget':>9}  {'ds4':>7}  {'BM25':>7}   with test and doc hunks too: {'ds4':>7}  {'BM25':>7}",
    ]
    for budget in r["budgets"]:
        c = {key: f"{k}/{n}" for key, k in r["covered"][str(budget)].items()}
        lines.append(
            f"{budget:>9,}  {c['ds4']:>7}  {c['bm25']:>7}   {'':>27}  {c['ds4_all_hunks']:>7}  "
            f"{c['bm25_all_hunks']:>7}"
        )
    return "\n".join(lines)
