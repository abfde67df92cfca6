"""Run folders of the fix loop: the data folder a run keeps its index, prompts, logs and worktrees in
(REPO/.ds4, or a folder the caller owns such as a server's data directory), a lock held while a run
lives, and the removal of worktrees that a killed process left behind. It never reads or writes a
data folder that is reached through a symlink."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from ds4.agent.errors import RunFolderError

LOCK = ".lock"
# What ds4 writes in a data folder; a committed symlink at any of them would send the writes elsewhere.
WRITTEN = ("runs", "index.db", "index.db-wal", "index.db-shm")
EXCLUDED = "/.ds4/"


def data_folder(repo: Path, data_dir: Path | None) -> Path:
    """`data_dir` when given; else REPO/.ds4, refused when it is a symlink (a committed `.ds4 -> ...`
    would send the index, the prompts and the worktrees elsewhere) or not a folder."""
    folder = checked(Path(data_dir) if data_dir is not None else repo / ".ds4")
    if data_dir is None:
        exclude_from_git(repo)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    return folder


def exclude_from_git(repo: Path) -> None:
    """Adds /.ds4/ to the repository's .git/info/exclude (not its .gitignore: that is the user's file),
    so the index and run folders never show in `git status`. Outside git it does nothing."""
    done = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--path-format=absolute", "--git-common-dir"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return  # not a git repository
    exclude = Path(done.stdout.strip()) / "info" / "exclude"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if EXCLUDED not in lines and not exclude.is_symlink():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as f:
            f.write(("\n" if lines and not exclude.read_text().endswith("\n") else "") + EXCLUDED + "\n")


def checked(folder: Path) -> Path:
    """`folder`, unless it or a file ds4 writes in it is a symlink, or it is not a folder."""
    for path in (folder, *(folder / name for name in WRITTEN)):
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symlink: ds4 keeps its data only in real files; remove it")
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is not a folder: ds4 keeps its index and runs there; remove it")
    return folder


def new_run(folder: Path) -> tuple[Path, int]:
    """A fresh run folder and the descriptor of its lock (held until closed: the run is alive)."""
    run_dir = folder / "runs" / (time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return run_dir, fd


def _is_alive(run_dir: Path) -> bool:
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False  # made before runs were locked
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def prune_stale(repo: Path, folder: Path) -> list[Path]:
    """Removes the worktrees of runs whose process is gone (their logs stay), then git's records of
    worktrees that no longer exist. Returns the worktrees removed."""
    removed = []
    runs = folder / "runs"
    for run_dir in sorted(runs.iterdir()) if runs.is_dir() and not runs.is_symlink() else []:
        if not run_dir.is_dir() or run_dir.is_symlink() or _is_alive(run_dir):
            continue
        for tree in (p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            if (tree / ".git").is_file():  # a worktree's .git is a file naming its gitdir
                subprocess.run(
                    ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True
                )
                shutil.rmtree(tree, ignore_errors=True)
                removed.append(tree)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
    return removed
