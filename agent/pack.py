"""The context packer: a repository and an issue as one prompt, laid out for prefix reuse and ranked
when the repository does not fit.

Layout: [system][repository tree][files, most stable first][issue][feedback]. Files are ordered by
their last change (git history, uncommitted edits last, then path), so an edit invalidates only what
follows the edited file; `repo_prefix_tokens` says where the repository part ends. Over budget, files
are ranked against the issue (BM25 over contents and symbols, personalized PageRank over the
definition/reference graph seeded by what the issue names, boosts for READMEs and manifests): the top
go in whole, the next as skeletons, the rest as tree lines. The prompt never exceeds the budget: the
final assembly is counted with the model's tokenizer and trimmed until it fits.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import sqlite_utils

from ds4.agent.index.languages import language_of

PROMPTS = Path(__file__).resolve().parent / "prompts"
MANIFESTS = {
    "README.md",
    "README.rst",
    "README",
    "pyproject.toml",
    "setup.py",
    "package.json",
    "Cargo.toml",
    "go.mod",
    "pom.xml",
    "build.gradle",
    "Gemfile",
    "composer.json",
    "Makefile",
    "CMakeLists.txt",
}
SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY( BLOCK)?-----"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{32,}\b"),
}
ELISION = "... ({n} lines elided)"


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
    mode: str  # "whole" | "skeleton" | "listed"
    tokens: int  # of its text as placed (0 when listed)
    score: float
    why: list[str] = field(default_factory=list)


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


# -- ranking ----------------------------------------------------------------------------------------


MAX_DEFINING_FILES = 8
FRAME = re.compile(r"""(?:File "([^"]+)", line (\d+))|(?:([\w./-]+\.\w+):(\d+))""")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


def rank(db: sqlite_utils.Database, issue: str, paths: list[str]) -> dict[str, tuple[float, list[str]]]:
    """score and reasons per path: BM25 (contents and symbols), PageRank from what the issue names, boosts."""
    reasons: dict[str, list[str]] = {p: [] for p in paths}
    seeds: dict[str, float] = {}
    for m in FRAME.finditer(issue):
        named = (m.group(1) or m.group(3) or "").lstrip("./")
        for p in paths:
            if named and (p == named or p.endswith("/" + named) or named.endswith("/" + p)):
                seeds[p] = seeds.get(p, 0) + 3.0
                reasons[p].append("named in a traceback or path")
    words = sorted(set(IDENT.findall(issue)))
    if words:
        marks = ",".join("?" * len(words))
        defining: dict[str, set[str]] = {}
        for path, name in db.execute(
            f"SELECT f.path, d.name FROM definitions d JOIN files f ON f.id = d.file_id "
            f"WHERE d.name IN ({marks})",
            words,
        ):
            defining.setdefault(name, set()).add(path)
        for name, where in sorted(defining.items()):
            if len(where) > MAX_DEFINING_FILES:  # a name defined everywhere ("run", "call") says little
                continue
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
        boost = 0.5 if Path(p).name in MANIFESTS else 0.0
        if boost:
            reasons[p].append("README or manifest")
        scores[p] = (seeds.get(p, 0.0) + bm25.get(p, 0.0) + 4.0 * pagerank.get(p, 0.0) + boost, reasons[p])
    return scores


def _bm25(db, words: list[str]) -> dict[str, float]:
    """Normalized (0..1) BM25 of contents and of symbols against the issue's words."""
    if not words:
        return {}
    query = " OR ".join(f'"{w}"' for w in words[:64])
    out: dict[str, float] = {}
    for sql in (
        "SELECT f.path, -bm25(contents_fts) FROM contents_fts JOIN files f ON f.id = contents_fts.rowid "
        "WHERE contents_fts MATCH ?",
        "SELECT f.path, -bm25(definitions_fts) FROM definitions_fts "
        "JOIN definitions d ON d.id = definitions_fts.rowid JOIN files f ON f.id = d.file_id "
        "WHERE definitions_fts MATCH ?",
    ):
        rows = db.execute(sql, [query]).fetchall()
        top = max((s for _, s in rows), default=0.0) or 1.0
        for path, s in rows:
            out[path] = max(out.get(path, 0.0), s / top)
    return out


def _pagerank(db, paths: list[str], seeds: dict[str, float], iterations: int = 30) -> dict[str, float]:
    """Personalized PageRank over files: a file links to the files defining names it uses (names defined
    in many files carry no signal and are left out)."""
    if not seeds:
        return {}
    ids = dict(db.execute("SELECT id, path FROM files").fetchall())
    index = {p: i for i, p in enumerate(paths)}
    rows = db.execute(
        "WITH rare AS (SELECT name FROM definitions GROUP BY name HAVING COUNT(DISTINCT file_id) <= ?) "
        "SELECT r.file_id, d.file_id, COUNT(*) FROM refs r JOIN definitions d ON d.name = r.name "
        "WHERE r.name IN rare AND r.file_id != d.file_id GROUP BY r.file_id, d.file_id",
        [MAX_DEFINING_FILES * 4],
    ).fetchall()
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


# -- assembly ---------------------------------------------------------------------------------------


def _wrap(path: str, text: str) -> str:
    return f'<file path="{path}">\n{text}{"" if text.endswith(chr(10)) else chr(10)}</file>\n'


def skeleton(text: str, definitions: list[tuple[str, int, int, str]]) -> str:
    """Signature and docstring lines of each function and method kept, bodies replaced by a marker."""
    lines = text.split("\n")
    drop: set[int] = set()
    for kind, line, end_line, doc in definitions:
        if kind not in ("function", "method") or end_line <= line:
            continue
        has_doc_below = bool(doc) and line < len(lines) and doc[:20] in lines[line]  # a Python docstring
        keep_to = line + (1 if has_doc_below else 0)  # the signature line, and the doc line after it
        drop.update(range(keep_to, end_line))  # 0-based indices of lines keep_to+1 .. end_line
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


def _elision(lines: list[str], first: int, n: int) -> str:
    indent = re.match(r"\s*", lines[first]).group(0)
    return indent + ELISION.format(n=n)


def tree_listing(paths: list[str]) -> str:
    """Every file, by path: it changes only when files are added, removed or renamed, never on edits."""
    return "Repository files:\n" + "".join(f"  {p}\n" for p in sorted(paths))


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
    """`previous`: an earlier pack's manifest for the same repository and issue. Its selection is kept
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
    whole = token_counts(db, files, counter)
    fixed = counter.count(system + "\n" + tree + issue_part + feedback_part)

    if fixed + sum(whole.values()) <= budget:  # everything fits: no ranking needed
        modes = {p: "whole" for p in order}
        scores = {p: (0.0, []) for p in order}
    elif previous is not None:  # keep the earlier selection; new files start listed
        scores = rank(db, issue, order)
        kept = {f["path"]: f["mode"] for f in previous.get("files", [])}
        modes = {p: kept.get(p, "listed") for p in order}
    else:
        scores = rank(db, issue, order)
        for path in overlay:
            if path in scores:
                scores[path] = (float("inf"), scores[path][1])
        modes = _allocate(db, order, scores, whole, budget - fixed, text_of, counter, set(overlay))
    args = (
        order,
        modes,
        scores,
        text_of,
        whole,
        db,
        system,
        tree,
        issue_part,
        feedback_part,
        budget,
        counter,
    )
    packed = _assemble(*args)
    while packed.total_tokens > budget:  # boundary merges can differ from per-file counts: trim, recount
        placed = [p for p in order if modes[p] != "listed"]
        if previous is not None:  # keeping a selection: give way at the end, where the prefix is not hurt
            victim = placed[-1] if placed else None
        else:
            victim = min(placed, key=lambda p: (scores[p][0], p), default=None)
        if victim is None:
            raise ValueError(f"budget {budget} is below the {packed.total_tokens} tokens of the fixed parts")
        modes[victim] = "skeleton" if modes[victim] == "whole" and victim not in overlay else "listed"
        packed = _assemble(*args)
    return packed


def _definitions_of(db, path: str) -> list[tuple[str, int, int, str]]:
    return db.execute(
        "SELECT d.kind, d.line, d.end_line, d.doc FROM definitions d JOIN files f "
        "ON f.id = d.file_id WHERE f.path = ? ORDER BY d.line",
        [path],
    ).fetchall()


def _allocate(
    db, order, scores, whole, room: int, text_of, counter, whole_only=frozenset()
) -> dict[str, str]:
    """Highest score first: whole if it fits the room left, else a skeleton if that fits, else listed."""
    modes = {p: "listed" for p in order}
    for path in sorted(order, key=lambda p: (-scores[p][0], p)):
        if whole[path] <= room:
            modes[path], room = "whole", room - whole[path]
            continue
        if path in whole_only:
            continue
        skeleton_text = skeleton(text_of[path], _definitions_of(db, path))
        estimate = whole[path] * len(skeleton_text) / max(len(text_of[path]), 1)
        if estimate > 1.2 * room or len(skeleton_text) >= len(text_of[path]):
            continue  # cannot fit (or saves nothing): not worth counting exactly
        tokens = counter.count(_wrap(path, skeleton_text))
        if tokens <= room:
            modes[path], room = "skeleton", room - tokens
    return modes


def _assemble(
    order, modes, scores, text_of, whole, db, system, tree, issue_part, feedback_part, budget, counter
) -> Packed:
    blocks, entries = [], []
    for path in order:
        mode = modes[path]
        if mode == "listed":
            entries.append(FileEntry(path, mode, 0, round(scores[path][0], 4), scores[path][1]))
            continue
        text = text_of[path] if mode == "whole" else skeleton(text_of[path], _definitions_of(db, path))
        block = _wrap(path, text)
        blocks.append(block)
        tokens = whole[path] if mode == "whole" else counter.count(block)
        entries.append(FileEntry(path, mode, tokens, round(scores[path][0], 4), scores[path][1]))
    files_part = "".join(blocks)
    repo_part = system + "\n" + tree + files_part
    prompt = repo_part + issue_part + feedback_part
    secrets = find_secrets({p: text_of[p] for p in order if modes[p] != "listed"})
    return Packed(
        prompt=prompt,
        budget=budget,
        total_tokens=counter.count(prompt),
        repo_prefix_tokens=counter.count(repo_part),
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
