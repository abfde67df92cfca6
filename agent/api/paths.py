"""Repository paths a client may name: only under the operator's allowed roots, checked on the real
path (symlinks resolved), with `..` refused outright rather than normalized away; checked again at
every use, since a folder can be swapped for a symlink after it was registered. The server's own data
for a repository (its index, its run folders) live under the server's data directory, never inside
the repository."""

from __future__ import annotations

import os
from pathlib import Path

from ds4.agent.errors import PathRefused


def confine(path: str, roots: list[str | Path]) -> Path:
    if not roots:
        raise PathRefused("this server has no repository roots: start it with --repo-root DIR")
    if not path or "\x00" in path:
        raise PathRefused("the path is empty or has a NUL byte")
    if ".." in Path(path).parts:
        raise PathRefused(f"{path}: '..' is not allowed in repository paths")
    if not os.path.isabs(path):
        raise PathRefused(f"{path}: give an absolute path under one of the repository roots")
    real = Path(os.path.realpath(path))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            if not real.is_dir():
                raise PathRefused(f"{path} is not a folder")
            return real
    raise PathRefused(f"{path} is outside the repository roots this server allows")


def recheck(registered: str, roots: list[str | Path]) -> Path:
    """A registered repository, confined again now: still under the roots and still the same real
    folder (not swapped, or a parent of it swapped, for a symlink since it was registered)."""
    real = confine(registered, roots)
    if real != Path(registered):
        raise PathRefused(f"{registered} now resolves to {real}: it changed since it was registered")
    return real


def repo_data_dir(jobs_db: str | Path, repo_id: str) -> Path:
    """Where the server keeps a repository's index and run folders: beside its jobs database."""
    assert repo_id.isalnum(), repo_id
    return Path(jobs_db).resolve().parent / "repos" / repo_id
