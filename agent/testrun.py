"""Running a repository's tests: the command detected from its files (or given), run in a sandbox
(sandbox.py), a timeout or cancel that kills the whole process group, captured output bounded and
trimmed to what a model can use, and failing test ids where the runner prints them (pytest, go test,
cargo test, jest/vitest)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ds4.agent.cgroup import confined
from ds4.agent.sandbox import Sandbox, choose

FAILED_PATTERNS = [
    re.compile(r"^FAILED (\S+)", re.M),  # pytest -rf
    re.compile(r"^ERROR (\S+)", re.M),  # pytest collection/setup errors
    re.compile(r"^--- FAIL: (\S+)", re.M),  # go test
    re.compile(r"^test (\S+) \.\.\. FAILED", re.M),  # cargo test
    re.compile(r"^\s+✕ (.+?)(?: \(\d+ ?ms\))?$", re.M),  # jest
]
TAIL_LINES, HEAD_LINES = 120, 20


@dataclass
class TestResult:
    command: str
    exit_code: int | None  # None: timed out
    seconds: float
    output: str
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None

    def feedback(self) -> str:
        """The output a model should read: the head, the tail, the failing tests."""
        lines = self.output.splitlines()
        if len(lines) > HEAD_LINES + TAIL_LINES:
            skipped = len(lines) - HEAD_LINES - TAIL_LINES
            lines = (
                lines[:HEAD_LINES] + [f"... ({skipped} lines of output skipped) ..."] + lines[-TAIL_LINES:]
            )
        status = "timed out" if self.timed_out else f"exited with {self.exit_code}"
        failed = f"\nFailing tests: {', '.join(self.failed[:30])}" if self.failed else ""
        return f"$ {self.command}  ({status} after {self.seconds:.1f}s){failed}\n" + "\n".join(lines)


def detect_test_command(repo: str | Path) -> str | None:
    repo = Path(repo)
    if (repo / "package.json").is_file():
        scripts = json.loads((repo / "package.json").read_text() or "{}").get("scripts", {})
        if "test" in scripts:
            return "npm test --silent"
    if (repo / "go.mod").is_file():
        return "go test ./..."
    if (repo / "Cargo.toml").is_file():
        return "cargo test"
    python_markers = ("pyproject.toml", "setup.py", "setup.cfg", "pytest.ini", "tox.ini", "conftest.py")
    if (
        any((repo / m).exists() for m in python_markers)
        or (repo / "tests").is_dir()
        or list(repo.glob("test_*.py"))
    ):
        return "python -m pytest -q -rf"
    return None


def run_tests(
    command: str,
    cwd: str | Path,
    timeout: float = 600.0,
    cancel: threading.Event | None = None,
    sandbox: Sandbox | None = None,
) -> TestResult:
    """Runs the test command in `sandbox` (default: bubblewrap where it works). Its whole process
    group is killed when it ends, at `timeout`, as soon as `cancel` is set, or if this call is
    interrupted; a timed-out or cancelled run has exit code None. As root, the run's processes are
    bounded by a cgroup of their own where one can be made (cgroup.py)."""
    sandbox = sandbox or choose()
    start = time.perf_counter()
    limits = sandbox.limits
    with (
        tempfile.TemporaryDirectory(prefix="ds4-test-", ignore_cleanup_errors=True) as scratch,
        confined(limits.processes, limits.memory_bytes) as group,
    ):
        argv, env = sandbox.prepare(command, Path(cwd).resolve(), Path(scratch))
        argv = group.wrap(argv) if group is not None else argv  # root: the rlimit on processes is void
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        output = Output(sandbox.limits.output_bytes)
        reader = threading.Thread(target=output.drain, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            code = _wait(proc, timeout, cancel)
        finally:
            _kill_group(proc)  # nothing of a run outlives it: workers, daemons, an interrupted run
            reader.join(timeout=10)
    text = output.text()
    failed = sorted({m for pattern in FAILED_PATTERNS for m in pattern.findall(text)})
    return TestResult(command, code, time.perf_counter() - start, text, failed)


def _wait(proc: subprocess.Popen, timeout: float, cancel: threading.Event | None) -> int | None:
    """The exit code, or None when the deadline passed or `cancel` was set first."""
    deadline = time.monotonic() + timeout
    while not (cancel is not None and cancel.is_set()):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return proc.wait(timeout=min(0.25, left))
        except subprocess.TimeoutExpired:
            continue
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: test runners spawn workers
    except ProcessLookupError:
        pass  # the group is already gone
    proc.wait()


class Output:
    """A run's output, bounded: the first and the last `max_bytes / 2` bytes, and how much was dropped."""

    def __init__(self, max_bytes: int):
        self.half, self.head, self.tail, self.dropped = max_bytes // 2, bytearray(), bytearray(), 0

    def drain(self, stream) -> None:
        while chunk := stream.read1(65536):
            self.feed(chunk)
        stream.close()

    def feed(self, chunk: bytes) -> None:
        room = self.half - len(self.head)
        self.head += chunk[:room]
        self.tail += chunk[room:]
        if len(self.tail) > self.half:
            self.dropped += len(self.tail) - self.half
            del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        gap = f"\n... ({self.dropped} bytes of output dropped) ...\n" if self.dropped else ""
        return (bytes(self.head) + gap.encode() + bytes(self.tail)).decode("utf-8", "replace")
