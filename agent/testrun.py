"""Running a repository's tests: the command detected from its files (or given), a timeout that kills
the whole process group, captured output trimmed to what a model can use, and failing test ids where
the runner prints them (pytest, go test, cargo test, jest/vitest)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    command: str, cwd: str | Path, timeout: float = 600.0, cancel: threading.Event | None = None
) -> TestResult:
    """Runs the test command; killed (with its process group) at `timeout` or as soon as `cancel` is
    set, and then its exit code is None."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", CI="1")
    proc = subprocess.Popen(
        command,
        shell=True,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:  # retrying communicate() after its timeout loses no output
            wait = min(0.25, max(deadline - time.monotonic(), 0)) if cancel is not None else timeout
            out, _ = proc.communicate(timeout=wait)
            code = proc.returncode
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
                continue
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: test runners spawn workers
            out, _ = proc.communicate()
            code = None
            break
    text = out.decode("utf-8", "replace")
    failed = sorted({m for pattern in FAILED_PATTERNS for m in pattern.findall(text)})
    return TestResult(command, code, time.perf_counter() - start, text, failed)
