"""Test commands run in the sandbox: no network, no writes outside the worktree, no secrets in the
environment or under the server's data, limits on memory, CPU, processes and output, and no process of
a run left alive when it times out, is cancelled, its server stops or its runner is killed. Real
bubblewrap, real processes (/proc is the witness); skipped only where bubblewrap cannot run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ds4.agent.loop import fix
from ds4.agent.sandbox import Bubblewrap, Limits, Unsandboxed, bubblewrap_problem, choose
from ds4.agent.testrun import run_tests
from tests.fakes import BUGGY, RIGHT, ScriptedBackend, fix_config, make_repo
from tests.servers import processes_with, wait_for

HERE = Path(__file__).resolve().parent


@pytest.fixture()
def bwrap() -> Bubblewrap:
    problem = bubblewrap_problem()
    if problem is not None:
        pytest.skip(f"no sandbox on this machine: {problem}")
    return Bubblewrap()


@pytest.fixture()
def tree(tmp_path) -> Path:
    path = tmp_path / "tree"
    path.mkdir()
    return path


def test_a_test_command_cannot_reach_the_network(bwrap, tree):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    probe = (
        "import socket\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5); print('CONNECTED')\n"
        "except OSError as e:\n    print('refused', e)\n"
        "print('interfaces', sorted(name for _, name in socket.if_nameindex()))\n"
    )
    (tree / "probe.py").write_text(probe)
    result = run_tests(f"{sys.executable} probe.py", tree, timeout=60, sandbox=bwrap)
    assert "refused" in result.output and "CONNECTED" not in result.output, result.output
    assert "interfaces ['lo']" in result.output, result.output
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing reached the host's loopback
    listener.close()


def test_a_test_command_cannot_write_outside_its_worktree(bwrap, tree):
    # the home folder, not this checkout: a checkout under /tmp is hidden by the private /tmp instead
    outside = Path.home() / f".ds4-sandbox-probe-{uuid.uuid4().hex[:8]}"
    command = f"echo inside > written.txt; echo out > {outside}; echo etc > /etc/ds4-probe; true"
    try:
        result = run_tests(command, tree, timeout=60, sandbox=bwrap)
        assert (tree / "written.txt").read_text() == "inside\n"
        assert not outside.exists() and not Path("/etc/ds4-probe").exists()
        assert result.output.count("Read-only file system") == 2, result.output
    finally:
        outside.unlink(missing_ok=True)


def test_a_test_command_in_the_loop_cannot_touch_the_users_tree(bwrap, tmp_path):
    repo = make_repo(tmp_path / "repo", BUGGY)
    hook = repo / ".git" / "hooks" / "pre-commit"
    attack = f"echo 'def add(a, b): return 5' > {repo}/calc.py; echo owned > {hook}; python -m pytest -q -rf"
    result = fix(fix_config(repo, test_cmd=attack, sandbox=bwrap), ScriptedBackend([RIGHT]))
    assert result.status == "resolved"
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"] and not hook.exists()


def test_a_test_command_cannot_read_api_keys_or_the_servers_data(bwrap, tree, tmp_path, monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    for name in ("DS4_API_KEY", "DS4_API_KEYS", "OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, secret)
    data = tmp_path / "server-data"
    data.mkdir()
    (data / "jobs.db").write_text(secret)
    command = f"env; cat /proc/*/environ; cat {data}/jobs.db; ls -a {data}; true"
    result = run_tests(command, tree, timeout=60, sandbox=Bubblewrap(hidden=(data,)))
    assert "HOME=/tmp/home" in result.output  # the command ran, with its private home
    assert secret not in result.output and "DS4_API_KEY" not in result.output


def test_the_unsandboxed_variant_still_drops_the_keys(tree, monkeypatch):
    monkeypatch.setenv("DS4_API_KEY", "sk-unsandboxed")
    result = run_tests("env", tree, timeout=60, sandbox=Unsandboxed())
    assert "sk-unsandboxed" not in result.output and "PATH=" in result.output


def test_limits_on_memory_cpu_processes_and_files_apply_inside(bwrap, tree):
    limits = Limits(cpu_seconds=7, memory_bytes=1 << 30, processes=321, file_bytes=1 << 20)
    sandbox = Bubblewrap(limits=limits)
    probe = (
        "import resource\n"
        "names = ('CPU', 'AS', 'NPROC', 'FSIZE')\n"
        "print([resource.getrlimit(getattr(resource, 'RLIMIT_' + n))[0] for n in names])\n"
        "try:\n    b = bytearray(2 << 30); print('ALLOCATED')\nexcept MemoryError:\n    print('no memory')\n"
    )
    (tree / "probe.py").write_text(probe)
    result = run_tests(f"{sys.executable} probe.py", tree, timeout=60, sandbox=sandbox)
    assert f"[7, {1 << 30}, 321, {1 << 20}]" in result.output and "no memory" in result.output, result.output


def test_output_is_bounded_to_its_head_and_tail(bwrap, tree):
    sandbox = Bubblewrap(limits=Limits(output_bytes=64 * 1024))
    result = run_tests(
        "echo FIRST; head -c 50000000 /dev/zero | tr '\\0' x; echo; echo LAST", tree, 60, None, sandbox
    )
    assert result.passed and len(result.output) < 70 * 1024
    assert result.output.startswith("FIRST") and result.output.rstrip().endswith("LAST")
    assert "bytes of output dropped" in result.output


@pytest.mark.parametrize("variant", ["bubblewrap", "none"])
def test_a_timeout_kills_the_whole_tree(variant, tree, request):
    sandbox = request.getfixturevalue("bwrap") if variant == "bubblewrap" else Unsandboxed()
    marker = f"{31000 + os.getpid() % 1000}.{uuid.uuid4().int % 1000}"
    result = run_tests(f"sleep {marker} & sleep {marker} & sleep {marker}", tree, timeout=2, sandbox=sandbox)
    assert result.timed_out
    assert wait_for(lambda: not processes_with(f"sleep {marker}"), 10), processes_with(f"sleep {marker}")


def test_a_cancel_kills_the_whole_tree_at_once(bwrap, tree):
    marker = f"{32000 + os.getpid() % 1000}.{uuid.uuid4().int % 1000}"
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    start = time.monotonic()
    result = run_tests(
        f"(sleep {marker} &) ; sleep {marker}", tree, timeout=600, cancel=cancel, sandbox=bwrap
    )
    assert result.exit_code is None and time.monotonic() - start < 30
    assert wait_for(lambda: not processes_with(f"sleep {marker}"), 10)


def test_no_process_survives_when_its_runner_is_killed(bwrap, tree):
    marker = f"{33000 + os.getpid() % 1000}.{uuid.uuid4().int % 1000}"
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from ds4.agent.testrun import run_tests; run_tests(sys.argv[1], sys.argv[2], 600)",
            f"setsid sleep {marker} & (sleep {marker} &) ; sleep {marker}",
            str(tree),
        ]
    )
    try:
        # the three sleeps themselves running (bwrap's own processes carry the command in their argv
        # while they set the sandbox up, before they arm --die-with-parent)
        assert wait_for(lambda: len(processes_with(f"sleep {marker}", starting=True)) >= 3, 60)
        runner.send_signal(signal.SIGKILL)  # like `kill -9` of a server: no clean-up code runs
        runner.wait()
        assert wait_for(lambda: not processes_with(f"sleep {marker}"), 10), processes_with(f"sleep {marker}")
    finally:
        for pid in processes_with(f"sleep {marker}"):
            with contextlib.suppress(ProcessLookupError):  # it may end between the listing and the kill
                os.kill(pid, signal.SIGKILL)


def test_without_bubblewrap_a_server_refuses_and_the_cli_warns(tmp_path):
    script = (
        "from ds4.agent.sandbox import choose, SandboxError\n"
        "print(choose(allow_unsandboxed=True).name)\n"
        "try:\n    choose(allow_unsandboxed=False)\nexcept SandboxError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert done.stdout.splitlines()[0] == "none"
    assert "refused: no sandbox for test commands: bubblewrap (bwrap) is not installed" in done.stdout
    assert done.stderr.count("they run unsandboxed") == 1


def test_no_sandbox_is_a_loud_choice(capsys):
    assert choose(no_sandbox=True, warn=print).name == "none"
    assert "WITHOUT a sandbox" in capsys.readouterr().out
