"""A run's own cgroup bounds its processes where the rlimit does not (root): a fork bomb stops at the
limit, the run ends cleanly and the group is gone afterwards; without a writable cgroup a note says so
once. Real cgroups and real processes; the bounded cases are skipped where ds4 is not root or no
cgroup can be made."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from ds4.agent import cgroup
from ds4.agent.sandbox import Bubblewrap, Limits, Unsandboxed, bubblewrap_problem
from ds4.agent.testrun import run_tests
from tests.servers import processes_with, wait_for

FORKS = (
    "import subprocess, sys\n"
    "children = []\n"
    "for _ in range(200):\n"
    "    try:\n        children.append(subprocess.Popen(['sleep', sys.argv[1]]))\n"
    "    except OSError as e:\n        print('refused:', e.strerror); break\n"
    "print('started', len(children))\n"
)


@pytest.fixture()
def can_confine() -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: RLIMIT_NPROC bounds the processes")
    group = cgroup.create(10, 1 << 30)
    if group is None:
        pytest.skip("no writable cgroup on this machine")
    group.remove()


def groups_now() -> set[Path]:
    mounts = (*cgroup.V2_MOUNTS, cgroup.V1_PIDS)
    return {p for m in mounts if m.is_dir() for p in m.rglob(f"{cgroup.PREFIX}{os.getpid()}-*")}


@pytest.mark.parametrize("variant", ["bubblewrap", "none"])
def test_a_fork_bomb_stops_at_the_limit_and_the_run_ends_cleanly(can_confine, variant, tmp_path):
    if variant == "bubblewrap" and bubblewrap_problem() is not None:
        pytest.skip(bubblewrap_problem())
    limits = Limits(processes=24)
    sandbox = Bubblewrap(limits=limits) if variant == "bubblewrap" else Unsandboxed(limits=limits)
    marker = f"{34000 + os.getpid() % 1000}.{uuid.uuid4().int % 1000}"
    (tmp_path / "forks.py").write_text(FORKS)
    result = run_tests(f"{sys.executable} forks.py {marker}", tmp_path, timeout=60, sandbox=sandbox)
    assert result.passed and "refused: Resource temporarily unavailable" in result.output, result.output
    started = int(result.output.split("started ")[1].split()[0])
    assert 5 < started < 24, result.output
    assert wait_for(lambda: not processes_with(f"sleep {marker}"), 10), processes_with(f"sleep {marker}")
    assert groups_now() == set()


def test_a_shell_loop_past_the_limit_is_refused_and_a_timeout_leaves_no_group(can_confine, tmp_path):
    sandbox = Unsandboxed(limits=Limits(processes=16))
    marker = f"{35000 + os.getpid() % 1000}.{uuid.uuid4().int % 1000}"
    result = run_tests(f"while true; do sleep {marker} & done", tmp_path, timeout=60, sandbox=sandbox)
    assert result.exit_code not in (0, None) and "fork" in result.output.lower(), result.output
    result = run_tests(f"sleep {marker} & sleep {marker}", tmp_path, timeout=1, sandbox=sandbox)
    assert result.timed_out and groups_now() == set()
    assert wait_for(lambda: not processes_with(f"sleep {marker}"), 10)


def test_a_group_left_by_a_killed_runner_is_removed_by_the_next(can_confine):
    group = cgroup.create(10, 1 << 30)
    dead = max(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) + 100_000
    stale = group.path.parent / f"{cgroup.PREFIX}{dead}-deadbeef"
    stale.mkdir()
    group.remove()
    cgroup.create(10, 1 << 30).remove()
    assert not stale.exists()


def test_without_a_writable_cgroup_root_is_told_once(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    notes = []
    where = {"v2_mounts": (tmp_path / "none",), "v1_pids": tmp_path / "none", "proc_cgroup": "0::/\n"}
    with cgroup.confined(64, 1 << 30, note=notes.append, **where) as group:
        assert group is None
    assert len(notes) == 1 and "not bounded in processes" in notes[0]


def test_own_group_reads_v2_and_v1_lines():
    text = "9:name=systemd:/\n8:pids:/ci/job\n4:memory:/a/b\n0::/user.slice/x\n"
    assert cgroup.own_group(2, text) == "/user.slice/x"
    assert cgroup.own_group(1, text) == "/ci/job"
    assert cgroup.own_group(1, "0::/only-v2\n") is None
