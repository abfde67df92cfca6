"""Which files of a repository are indexed: git's own view (tracked + untracked, minus ignored), or
.gitignore rules outside git, minus .ds4ignore; symlinks, unreadable and oversized files are set aside
with their reason. Reads no file contents."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

DEFAULT_MAX_BYTES = 1 << 20  # files over 1 MB are skipped (configurable)
ALWAYS_IGNORED = (".git/", ".ds4/")


@dataclass
class Entry:
    path: str  # relative to the repository, with "/" separators
    size: int
    mtime_ns: int


@dataclass
class Catalog:
    root: Path
    files: list[Entry] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    in_git: bool = False


def _ds4ignore(root: Path) -> pathspec.PathSpec | None:
    file = root / ".ds4ignore"
    if not file.is_file():
        return None
    return pathspec.GitIgnoreSpec.from_lines(file.read_text(errors="replace").splitlines())


def _git_files(root: Path) -> list[str] | None:
    """git ls-files -co --exclude-standard, or None when `root` is not in a work tree."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return sorted({p for p in out.decode("utf-8", "surrogateescape").split("\0") if p})


def _walk_files(root: Path) -> list[str]:
    """All files under `root` honouring every .gitignore on the way (nested ones apply below them)."""
    found: list[str] = []
    specs: list[tuple[str, pathspec.PathSpec]] = []  # (directory prefix, its .gitignore)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        specs = [(p, s) for p, s in specs if prefix.startswith(p)]
        gitignore = Path(dirpath) / ".gitignore"
        if gitignore.is_file():
            specs.append(
                (
                    prefix,
                    pathspec.GitIgnoreSpec.from_lines(gitignore.read_text(errors="replace").splitlines()),
                )
            )

        dirnames[:] = sorted(d for d in dirnames if not _ignored(prefix + d + "/", specs))
        found += [prefix + f for f in sorted(filenames) if not _ignored(prefix + f, specs)]
    return found


def _ignored(rel: str, specs: list[tuple[str, pathspec.PathSpec]]) -> bool:
    """Whether a path (directories end in "/") is ignored by a .gitignore above it."""
    return rel.startswith(ALWAYS_IGNORED) or any(
        spec.match_file(rel[len(prefix) :]) for prefix, spec in specs if rel.startswith(prefix)
    )


def list_files(root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Catalog:
    root = Path(root).resolve()
    paths = _git_files(root)
    catalog = Catalog(root, in_git=paths is not None)
    if paths is None:
        paths = _walk_files(root)
    extra = _ds4ignore(root)
    for rel in paths:
        if rel.startswith(ALWAYS_IGNORED) or (extra is not None and extra.match_file(rel)):
            continue
        full = root / rel
        try:
            st = full.lstat()
        except OSError:
            continue  # listed by git but gone (deleted, not yet staged)
        if full.is_symlink():
            catalog.skipped[rel] = "symlink"
        elif not full.is_file():
            continue
        elif st.st_size > max_bytes:
            catalog.skipped[rel] = f"over {max_bytes} bytes"
        elif not os.access(full, os.R_OK):
            catalog.skipped[rel] = "unreadable"
        else:
            catalog.files.append(Entry(rel, st.st_size, st.st_mtime_ns))
    return catalog
