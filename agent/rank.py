"""Ranking a repository against an issue: files (paths, tracebacks and modules the issue names, definitions
of the names it writes as code, BM25 over contents, symbols and function bodies, personalized PageRank
over the definition/reference graph; source above tests and docs, prose and changelogs counted as docs,
unless the issue is about them) and, inside files, the definitions whose bodies the model must see (named
ones, the lines of a traceback, their callers, the bodies that match the issue's words best). It reads the
index through index/query.py; budget.py decides what fits."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import sqlite_utils

from ds4.agent.bm25 import bm25, code_words
from ds4.agent.index.query import (
    SECONDARY,
    bm25_matches,
    defining_files,
    definition_spans,
    file_paths,
    file_texts,
    reference_edges,
    references_to,
)
from ds4.agent.views import BODY_KINDS

MAX_DEFINING_FILES = 8
FRAME = re.compile(r"""(?:File "([^"]+)", line (\d+))|(?:([\w./-]+\.\w+):(\d+))""")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
BACKTICKED = re.compile(r"`([^`\n]+)`")
CAMEL = re.compile(r"[a-z][A-Z]")
DOTTED = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
MANIFESTS = {
    "README.md", "README.rst", "README", "pyproject.toml", "setup.py", "package.json", "Cargo.toml",
    "go.mod", "pom.xml", "build.gradle", "Gemfile", "composer.json", "Makefile", "CMakeLists.txt",
}  # fmt: skip
PROSE = re.compile(r"\.(md|markdown|rst|adoc)$|(^|/)(changes|changelog|history|news)(\.\w+)?$")
SECONDARY_WEIGHT = 0.5
PLAIN_WORD_WEIGHT = 0.5  # a definition's name written as a plain word, against 2.0 written as code
PAGERANK_WEIGHT = 4.0
MAX_CALLERS = 6  # per named definition: callers beyond these say little more
MAX_BODY_FILES = 200  # files whose bodies are scored: the ones full-text search ranks best
MIN_BODY_WORDS = 2  # distinct issue words a body must hold to be matched at all
MAX_MATCHED_BODIES = 8  # bodies shown for matching the issue's words, best first


@dataclass
class Focus:
    """Definitions of one file to show in full, each with why, in the order they were chosen."""

    lines: dict[int, str] = field(default_factory=dict)  # definition's first line (1-based) -> why

    def add(self, line: int, why: str) -> None:
        self.lines.setdefault(line, why)


def is_secondary(path: str, issue: str) -> bool:
    """A test, doc or example file (prose and changelogs are docs wherever they sit), unless the issue
    is about tests or docs."""
    lowered = path.lower()
    if not (SECONDARY.search(lowered) or PROSE.search(lowered)):
        return False
    about = issue.lower()
    return not any(word in about for word in ("test", "doc", "example", "readme", "changelog"))


Bodies = dict[str, dict[int, float]]  # path -> first line of a function or method -> its BM25


def rank(
    db: sqlite_utils.Database, issue: str, paths: list[str], bodies: Bodies | None = None
) -> dict[str, tuple[float, list[str]]]:
    """score and reasons per path: BM25 (contents, symbols, and the best-matching function body),
    PageRank from what the issue names, boosts. `bodies`: body_matches(), when already computed."""
    reasons: dict[str, list[str]] = {p: [] for p in paths}
    seeds: dict[str, float] = {}
    for p in _framed(issue, paths):
        seeds[p] = seeds.get(p, 0) + 3.0
        reasons[p].append("named in a traceback or path")
    code = code_names(issue)
    for name, where in sorted(_modules(issue, paths).items()):
        weight = 3.0 if "." in name or name in code else PLAIN_WORD_WEIGHT  # "in the parser": parser.py
        for p in where:
            seeds[p] = seeds.get(p, 0) + weight / len(where)
            reasons[p].append(f"its module is named: {name}")
    words = sorted(set(IDENT.findall(issue)))
    for name, where in sorted(_defining(db, words).items()):
        weight = 2.0 if name in code else PLAIN_WORD_WEIGHT  # "output" in prose may not mean output()
        for path in sorted(where & reasons.keys()):
            seeds[path] = seeds.get(path, 0) + weight / len(where)
            reasons[path].append(f"defines {name}" + ("" if name in code else " (a plain word)"))
    bm25 = _bm25(db, words)
    for p, s in bm25.items():
        if p in reasons:
            reasons[p].append(f"matches the issue's words ({s:.2f})")
    best = _best_bodies(body_matches(db, issue, paths) if bodies is None else bodies)
    for p, s in best.items():
        reasons[p].append(f"a body matches the issue's words ({s:.2f})")
    pagerank = _pagerank(db, paths, seeds)
    # the graph spreads what the seeds say, no more: full weight from a name written as code or a path
    graph_weight = PAGERANK_WEIGHT * min(1.0, max(seeds.values(), default=0.0) / 2.0)
    scores = {}
    for p in paths:
        boost = 0.5 if p in MANIFESTS else 0.0  # the repository's own, not every example's README
        if boost:
            reasons[p].append("README or manifest")
        graph = graph_weight * pagerank.get(p, 0.0)
        score = seeds.get(p, 0.0) + bm25.get(p, 0.0) + best.get(p, 0.0) + graph + boost
        if is_secondary(p, issue):
            score *= SECONDARY_WEIGHT
            reasons[p].append("test, doc or example")
        scores[p] = (score, reasons[p])
    return scores


def body_matches(db: sqlite_utils.Database, issue: str, paths: list[str]) -> Bodies:
    """BM25 of every function and method body, against the issue's code words, in the files that the
    index's full-text search matches (the best MAX_BODY_FILES of them)."""
    query = set(code_words(issue))
    matched = _bm25(db, sorted(set(IDENT.findall(issue))))
    candidates = sorted((p for p in paths if p in matched), key=lambda p: (-matched[p], p))[:MAX_BODY_FILES]
    lines = {path: text.split("\n") for path, text in file_texts(db, candidates).items()}
    docs = {}
    for path, first, end, kind, _ in definition_spans(db):
        if path in lines and kind in BODY_KINDS:
            docs[path, first] = Counter(code_words("\n".join(lines[path][first - 1 : end])))
    out: Bodies = {}
    for (path, first), score in bm25(docs, query).items():
        if len(query & docs[path, first].keys()) >= MIN_BODY_WORDS:
            out.setdefault(path, {})[first] = score
    return out


def _best_bodies(bodies: Bodies) -> dict[str, float]:
    """Per file, its best body's score over the best of all (0..1)."""
    best = {path: max(scores.values()) for path, scores in bodies.items()}
    top = max(best.values(), default=0.0) or 1.0
    return {path: s / top for path, s in best.items()}


def _framed(issue: str, paths: list[str]) -> list[str]:
    """Paths a traceback frame or a `path:line` in the issue names."""
    found = []
    for m in FRAME.finditer(issue):
        named = (m.group(1) or m.group(3) or "").lstrip("./")
        found += [
            p for p in paths if named and (p == named or p.endswith("/" + named) or named.endswith("/" + p))
        ]
    return found


def code_names(issue: str) -> set[str]:
    """The identifiers the issue writes as code: in backticks, called, dotted, snake_case or CamelCase."""
    names = {w for quoted in BACKTICKED.findall(issue) for w in IDENT.findall(quoted)}
    names |= {part for dotted in DOTTED.findall(issue) for part in dotted.split(".")}
    for m in IDENT.finditer(issue):
        word = m.group(0)
        if issue.startswith("(", m.end()) or "_" in word.strip("_") or CAMEL.search(word):
            names.add(word)
    return names


def _modules(issue: str, paths: list[str]) -> dict[str, list[str]]:
    """Dotted names and words in the issue whose leading parts name a module (`pkg.module.func`,
    `_impl.open()`, "parser"): the longest leading part that a file's path (without its extension) ends
    with, and those files."""
    stems: dict[str, list[str]] = {}
    for p in paths:
        stems.setdefault(p.rsplit(".", 1)[0] if "." in p.rsplit("/", 1)[-1] else p, []).append(p)
    found: dict[str, list[str]] = {}
    for dotted in sorted(set(DOTTED.findall(issue)) | set(IDENT.findall(issue))):
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            tail = "/".join(parts[:k])
            where = [p for stem, ps in stems.items() if stem == tail or stem.endswith("/" + tail) for p in ps]
            if where and len(parts[k - 1]) >= 3:
                found[".".join(parts[:k])] = sorted(where)
                break
    return {name: where for name, where in found.items() if len(where) <= MAX_DEFINING_FILES}


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
    db: sqlite_utils.Database,
    issue: str,
    scores: dict[str, tuple[float, list[str]]],
    bodies: Bodies | None = None,
) -> dict[str, Focus]:
    """Per file, the definitions to show in full: named in the issue (written as code), holding a
    traceback's line, calling a named one, or among the bodies that match the issue's words best
    (BM25). `bodies`: body_matches(), when already computed."""
    spans = _spans(db)
    out: dict[str, Focus] = {}

    def add(path: str, line: int, why: str) -> None:
        if path in scores:
            out.setdefault(path, Focus()).add(line, why)

    words = sorted(set(IDENT.findall(issue)))
    code = code_names(issue)
    named = {name: where for name, where in _defining(db, words).items() if name in code}
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
    bodies = body_matches(db, issue, list(scores)) if bodies is None else bodies
    matched = sorted(((s, path, line) for path, b in bodies.items() for line, s in b.items()), reverse=True)
    for s, path, line in matched[:MAX_MATCHED_BODIES]:
        add(path, line, f"shares the issue's words ({s:.1f})")
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
    for path, name, lines in sorted(rows, key=lambda r: (-scores.get(r[0], (0.0,))[0], r[0], r[1])):
        for line in sorted(int(x) for x in lines.split(",") if x):  # stored in capture order
            inner = _innermost(spans.get(path, []), line)
            chosen = found.setdefault(name, [])
            if inner is not None and (path, inner) not in chosen and len(chosen) < MAX_CALLERS:
                chosen.append((path, inner))
    return [item for name in sorted(found) for item in found[name]]


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
