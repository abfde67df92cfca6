"""Where a model's edits may land and how they are written: only inside the working tree (never under
`.git/`, another VCS's folder or `.ds4`, nor through a symlink), and all or nothing (staged beside the
targets, renamed in, rolled back if one fails, no temporary file left). It does not parse or match
edits; patch.py does, and calls it."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from ds4.agent.errors import WriteRefused

# Version control and ds4's own data: what a model's edit may never write (git reads .git/config and runs
# its hooks and fsmonitor; .ds4 holds the index and the run folders).
PROTECTED_DIRS = frozenset({".git", ".hg", ".svn", ".jj", ".bzr", "_darcs", ".pijul", ".fslckout", ".ds4"})


def inside(root: Path, rel: str, block: int | None = None) -> Path:
    """The file `rel` names under `root`, refused when it is outside the tree, under a VCS's folder, or
    reached through a symlink (any part of it, the file included)."""
    where = f"block {block}: " if block is not None else ""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
        raise WriteRefused(f"{where}{rel} is outside the repository: give a path relative to its root")
    protected = next((p for p in parts if p.casefold() in PROTECTED_DIRS), None)
    if protected is not None:
        raise WriteRefused(f"{where}{rel} is inside {protected}/, which edits may not touch")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise WriteRefused(
                f"{where}{rel} goes through the symlink {path.relative_to(root)}: edit the real file"
            )
    if not path.resolve().is_relative_to(root):
        raise WriteRefused(f"{where}{rel} is outside the repository")
    return path


def write_all(root: Path, files: dict[str, str | None]) -> None:
    """All or nothing: every path is checked again (no symlink, no VCS folder), every new text staged
    in a temporary file beside its target, then each old file is kept under a backup name (a hard link)
    and replaced; if any step fails, the replaced files get their old text back. No temporary file or
    backup outlives the call."""
    made: list[Path] = []  # folders this call created, removed again on failure
    staged: list[tuple[Path | None, Path]] = []  # (new text, target); None: delete the target
    backups: list[Path] = []
    done: list[tuple[Path | None, Path]] = []  # (backup of the old file, target) already replaced
    try:
        for rel, text in files.items():
            path = inside(root, rel)
            if text is not None:
                made += _make_parents(root, path)
                staged.append((_stage(path, text), path))
            elif path.exists():
                staged.append((None, path))
        for tmp, path in staged:
            backup = _keep(path)
            backups += [backup] if backup is not None else []
            if tmp is None:
                path.unlink()
            else:
                os.replace(tmp, path)
            done.append((backup, path))
    except BaseException:
        _roll_back(done, [tmp for tmp, _ in staged if tmp is not None], made)
        raise
    finally:
        for leftover in [tmp for tmp, _ in staged if tmp is not None] + backups:
            leftover.unlink(missing_ok=True)


def _make_parents(root: Path, path: Path) -> list[Path]:
    missing = [p for p in path.relative_to(root).parents if p != Path(".") and not (root / p).exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return [root / p for p in missing]  # deepest first


def _stage(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ds4-", suffix=".tmp")
    with os.fdopen(fd, "w", errors="surrogateescape", newline="") as f:
        f.write(text)
    if path.is_file():
        os.chmod(tmp, path.stat().st_mode)
    return Path(tmp)


def _keep(path: Path) -> Path | None:
    """A second name (a hard link) beside an existing file: its old text, for a roll back."""
    if not path.is_file():
        return None  # a new file (or a folder in the way: replacing it fails, and rolls back)
    backup = path.with_name(f".ds4-{uuid.uuid4().hex[:12]}.bak")
    os.link(path, backup)
    return backup


def _roll_back(done: list[tuple[Path | None, Path]], staged: list[Path], made: list[Path]) -> None:
    """Puts the old files back, then removes the staged texts and the folders made for them."""
    for backup, path in reversed(done):
        if backup is not None:
            os.replace(backup, path)
        else:
            path.unlink(missing_ok=True)
    for tmp in staged:
        tmp.unlink(missing_ok=True)
    for folder in made:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
