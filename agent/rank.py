"""Ranking a repository against an issue: files (paths and tracebacks the issue names, definitions of the
names it uses, BM25 over contents and symbols, personalized PageRank over the definition/reference
graph; source above tests and docs unless the issue is about them) and, inside files, the definitions
whose bodies the model must see (named ones, the lines of a traceback, their callers, the bodies that
share the issue's rarest words). It reads the index through index/query.py; budget.py decides what fits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import sqlite_utils

from ds4.agent.index.query import (
    SECONDARY,
    bm25_matches,
    defining_files,
    definition_spans,
    file_paths,
    reference_edges,
    references_to,
)
from ds4.agent.views import BODY_KINDS

MAX_DEFINING_FILES = 8
FRAME = re.compile(r"""(?:File "([^"]+)", line (\d+))|(?:([\w./-]+\.\w+):(\d+))""")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
MANIFESTS = {
    "README.md", "README.rst", "README", "pyproject.toml", "setup.py", "package.json", "Cargo.toml",
    "go.mod", "pom.xml", "build.gradle", "Gemfile", "composer.json", "Makefile", "CMakeLists.txt",
}  # fmt: skip
SECONDARY_WEIGHT = 0.5
MAX_CALLERS = 6  # per named definition: callers beyond these say little more
MAX_WORD_FILES, MAX_WORD_BODIES = 6, 3  # bodies found by the issue's words, in the top files


@dataclass
class Focus:
    """Definitions of one file to show in full, each with why, in the order they were chosen."""

    lines: dict[int, str] = field(default_factory=dict)  # definition's first line (1-based) -> why

    def add(self, line: int, why: str) -> None:
        self.lines.setdefault(line, why)


def is_secondary(path: str, issue: str) -> bool:
    """A test, doc or example file, unless the issue is about tests or docs."""
    if not SECONDARY.search(path.lower()):
        return False
    about = issue.lower()
    return not any(word in about for word in ("test", "doc", "example", "readme"))


def rank(db: sqlite_utils.Database, issue: str, paths: list[str]) -> dict[str, tuple[float, list[str]]]:
    """score and reasons per path: BM25 (contents and symbols), PageRank from what the issue names, boosts."""
    reasons: dict[str, list[str]] = {p: [] for p in paths}
    seeds: dict[str, float] = {}
    for p in _framed(issue, paths):
        seeds[p] = seeds.get(p, 0) + 3.0
        reasons[p].append("named in a traceback or path")
    words = sorted(set(IDENT.findall(issue)))
    for name, where in sorted(_defining(db, words).items()):
        for path in sorted(where & reasons.keys()):
            seeds[path] = seeds.get(path, 0) + 2.0 / len(where)
            reasons[path].append(f"defines {name}")
    bm25 = _bm25(db, words)
    for p, s in bm25.items():
        if p in reasons:
            reasons[p].append(f"matches the issue's words ({s:.2f})")
    pagerank = _pagerank(db, paths, seeds)
    scores = {}
    for p in paths:
        boost = 0.5 if p in MANIFESTS else 0.0  # the repository's own, not every example's README
        if boost:
            reasons[p].append("README or manifest")
        score = seeds.get(p, 0.0) + bm25.get(p, 0.0) + 4.0 * pagerank.get(p, 0.0) + boost
        if is_secondary(p, issue):
            score *= SECONDARY_WEIGHT
            reasons[p].append("test, doc or example")
        scores[p] = (score, reasons[p])
    return scores


def _framed(issue: str, paths: list[str]) -> list[str]:
    """Paths a traceback frame or a `path:line` in the issue names."""
    found = []
    for m in FRAME.finditer(issue):
        named = (m.group(1) or m.group(3) or "").lstrip("./")
        found += [
            p for p in paths if named and (p == named or p.endswith("/" + named) or named.endswith("/" + p))
        ]
    return found


def _defining(db, words: list[str]) -> dict[str, set[str]]:
    """The issue's words that name definitions, and the files defining each; names defined in many
    files ("run", "call") say little and are left out."""
    if not words:
        return {}
    defining: dict[str, set[str]] = {}
    for path, name in defining_files(db, words):
        defining.setdefault(name, set()).add(path)
    return {name: where for name, where in defining.items() if len(where) <= MAX_DEFINING_FILES}


def focus(
    db: sqlite_utils.Database, issue: str, scores: dict[str, tuple[float, list[str]]], text_of: dict[str, str]
) -> dict[str, Focus]:
    """Per file, the definitions to show in full: named in the issue, holding a traceback's line, calling
    a named one, or (in the top files) sharing the most of the issue's rare words."""
    spans = _spans(db)
    out: dict[str, Focus] = {}

    def add(path: str, line: int, why: str) -> None:
        if path in scores:
            out.setdefault(path, Focus()).add(line, why)

    words = sorted(set(IDENT.findall(issue)))
    named = _defining(db, words)
    for name, where in sorted(named.items()):
        for path in where:
            for first, _, kind, def_name in spans.get(path, []):
                if def_name == name and kind in BODY_KINDS:
                    add(path, first, f"named: {name}")
    for m in FRAME.finditer(issue):
        line = int(m.group(2) or m.group(4))
        for path in _framed(m.group(0), list(scores)):
            if (inner := _innermost(spans.get(path, []), line)) is not None:
                add(path, inner, f"traceback line {line}")
    for path, line in _callers(db, spans, named, scores):
        add(path, line, "calls a named definition")
    for path, line in _by_words(spans, words, scores, text_of):
        add(path, line, "shares the issue's words")
    return out


def _spans(db) -> dict[str, list[tuple[int, int, str, str]]]:
    """(first line, last line, kind, name) of every definition, by file."""
    spans: dict[str, list[tuple[int, int, str, str]]] = {}
    for path, line, end, kind, name in definition_spans(db):
        spans.setdefault(path, []).append((line, end, kind, name))
    return spans


def _innermost(spans: list[tuple[int, int, str, str]], line: int) -> int | None:
    """The first line of the smallest function or method around `line`."""
    around = [
        (end - first, first) for first, end, kind, _ in spans if kind in BODY_KINDS and first <= line <= end
    ]
    return min(around)[1] if around else None


def _callers(db, spans, named: dict[str, set[str]], scores) -> list[tuple[str, int]]:
    """(path, first line) of the functions that use a named definition, highest-ranked files first."""
    if not named:
        return []
    rows = references_to(db, sorted(named))
    found: dict[str, list[tuple[str, int]]] = {}
    for path, name, lines in sorted(rows, key=lambda r: (-scores.get(r[0], (0.0,))[0], r[0])):
        for line in (int(x) for x in lines.split(",") if x):
            inner = _innermost(spans.get(path, []), line)
            chosen = found.setdefault(name, [])
            if inner is not None and (path, inner) not in chosen and len(chosen) < MAX_CALLERS:
                chosen.append((path, inner))
    return [item for name in sorted(found) for item in found[name]]


def _by_words(spans, words: list[str], scores, text_of: dict[str, str]) -> list[tuple[str, int]]:
    """In the top files, the bodies holding the most distinct issue words (at least two, rare ones:
    a word in most bodies of the file is noise)."""
    lowered = {w.lower() for w in words}
    top = sorted(scores, key=lambda p: (-scores[p][0], p))[:MAX_WORD_FILES]
    found = []
    for path in top:
        lines = text_of.get(path, "").split("\n")
        bodies = [
            (first, {w.lower() for w in IDENT.findall("\n".join(lines[first - 1 : end]))} & lowered)
            for first, end, kind, _ in spans.get(path, [])
            if kind in BODY_KINDS
        ]
        common = {w for w in lowered if sum(w in hits for _, hits in bodies) > max(2, len(bodies) // 2)}
        ranked = sorted(((len(hits - common), first) for first, hits in bodies), key=lambda x: (-x[0], x[1]))
        found += [(path, first) for n, first in ranked[:MAX_WORD_BODIES] if n >= 2]
    return found


def _bm25(db, words: list[str]) -> dict[str, float]:
    """Normalized (0..1) BM25 of contents and of symbols against the issue's words."""
    if not words:
        return {}
    query = " OR ".join(f'"{w}"' for w in words[:64])
    out: dict[str, float] = {}
    for rows in bm25_matches(db, query):
        top = max((s for _, s in rows), default=0.0) or 1.0
        for path, s in rows:
            out[path] = max(out.get(path, 0.0), s / top)
    return out


def _pagerank(db, paths: list[str], seeds: dict[str, float], iterations: int = 30) -> dict[str, float]:
    """Personalized PageRank over files: a file links to the files defining names it uses (names defined
    in many files carry no signal and are left out)."""
    if not seeds:
        return {}
    ids = file_paths(db)
    index = {p: i for i, p in enumerate(paths)}
    rows = reference_edges(db, MAX_DEFINING_FILES * 4)
    edges = np.array(
        [(index[ids[s]], index[ids[d]], n) for s, d, n in rows if ids[s] in index and ids[d] in index],
        dtype=np.float64,
    ).reshape(-1, 3)
    src, dst, weight = edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64), edges[:, 2]
    out_weight = np.bincount(src, weights=weight, minlength=len(paths))
    teleport = np.zeros(len(paths))
    for path, w in seeds.items():
        teleport[index[path]] = w
    teleport /= teleport.sum()
    rank_ = teleport.copy()
    dangling = out_weight == 0
    share = np.divide(weight, out_weight[src], out=np.zeros_like(weight), where=out_weight[src] > 0)
    for _ in range(iterations):
        flow = np.bincount(dst, weights=rank_[src] * share, minlength=len(paths))
        rank_ = 0.15 * teleport + 0.85 * (flow + rank_[dangling].sum() * teleport)
    top = rank_.max() or 1.0
    return {paths[i]: float(rank_[i] / top) for i in np.flatnonzero(rank_)}
