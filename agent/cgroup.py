"""A per-run child cgroup that bounds a test run's processes (pids.max) and, on cgroup v2, its memory
(memory.max): the process rlimit does nothing for root, and CI runs as root. cgroup v2 first, else the
v1 pids hierarchy; where neither is writable a run keeps its rlimits and a note says so once. This
module owns the group's folder: made before a run, its processes killed and the folder removed after."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")
PREFIX = "ds4-run-"
# Where a cgroup v2 tree is mounted: alone, or beside v1 hierarchies ("hybrid").
V2_MOUNTS = (CGROUP_FS, CGROUP_FS / "unified")
V1_PIDS = CGROUP_FS / "pids"


@dataclass(frozen=True)
class RunCgroup:
    """One run's group: `wrap` makes a command enter it before it starts anything."""

    path: Path
    version: int

    def wrap(self, argv: list[str]) -> list[str]:
        """argv started by a shell that moves itself into the group first, so every child is inside."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []  # already removed

    def kill(self, seconds: float = 10.0) -> None:
        """SIGKILL to every process in the group until it is empty (children forked meanwhile too)."""
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + seconds
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # it ended between the read and the kill
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self) -> None:
        """Kills what is left and removes the folder (retried while the last exits are reaped)."""
        self.kill()
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: a process was still being reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def own_group(version: int, proc_cgroup: str) -> str | None:
    """This process's group path in the v2 tree (version 2) or the v1 pids hierarchy (version 1)."""
    for line in proc_cgroup.splitlines():
        number, controllers, path = line.split(":", 2)
        if version == 2 and number == "0" and controllers == "":
            return path
        if version == 1 and "pids" in controllers.split(","):
            return path
    return None


def _v2_parent(mounts: tuple[Path, ...], proc_cgroup: str) -> Path | None:
    """The v2 group new run groups go under, with pids enabled for its children, or None."""
    own = own_group(2, proc_cgroup)
    for mount in mounts:
        parent = mount / (own or "/").lstrip("/")
        if own is None or not (parent / "cgroup.controllers").is_file():
            continue
        if "pids" not in (parent / "cgroup.controllers").read_text().split():
            continue
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        for controller in ("pids", "memory"):
            if controller not in enabled:
                with contextlib.suppress(OSError):  # memory is optional; pids is checked below
                    (parent / "cgroup.subtree_control").write_text(f"+{controller}")
        if "pids" in (parent / "cgroup.subtree_control").read_text().split():
            return parent
    return None


def _v1_parent(pids_root: Path, proc_cgroup: str) -> Path | None:
    own = own_group(1, proc_cgroup)
    parent = pids_root / (own or "/").lstrip("/")
    return parent if own is not None and (parent / "cgroup.procs").is_file() else None


def create(
    processes: int,
    memory_bytes: int,
    v2_mounts: tuple[Path, ...] = V2_MOUNTS,
    v1_pids: Path = V1_PIDS,
    proc_cgroup: str | None = None,
) -> RunCgroup | None:
    """A new run group with its limits set, or None where no cgroup can be made here."""
    if proc_cgroup is None:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if (parent := _v2_parent(v2_mounts, proc_cgroup)) is not None:
            group = _made(parent / name, 2)
            (group.path / "pids.max").write_text(str(processes))
            if (group.path / "memory.max").exists():
                (group.path / "memory.max").write_text(str(memory_bytes))
            return group
        if (parent := _v1_parent(v1_pids, proc_cgroup)) is not None:
            group = _made(parent / name, 1)
            (group.path / "pids.max").write_text(str(processes))
            return group
    except PermissionError:
        return None  # a read-only cgroup fs (a container): the rlimits stay
    return None


def _made(path: Path, version: int) -> RunCgroup:
    _remove_stale(path.parent)
    path.mkdir()
    return RunCgroup(path, version)


def _remove_stale(parent: Path) -> None:
    """Groups a killed runner left (its pid is gone); their processes died with the sandbox."""
    for stale in parent.glob(f"{PREFIX}*"):
        pid = stale.name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            RunCgroup(stale, 0).remove()


@functools.cache
def _note_once(message: str) -> None:
    print(f"ds4-agent: note: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def confined(processes: int, memory_bytes: int, note=_note_once, **where) -> Iterator[RunCgroup | None]:
    """A run group for the duration of a run when ds4 runs as root (else None: the rlimit applies);
    everything in it is killed and the group removed on exit. Where root has no writable cgroup, None
    and a note said once."""
    if os.geteuid() != 0:
        yield None
        return
    group = create(processes, memory_bytes, **where)
    if group is None:
        note(
            "running as root, where the kernel ignores the process limit, and no writable cgroup "
            "(v2, or v1 pids) is here: test runs are not bounded in processes"
        )
    try:
        yield group
    finally:
        if group is not None:
            group.remove()
