"""The example repositories hold real bugs: their tests fail as shipped and pass with the gold patch
(applied through ds4's own patcher), for Python, JavaScript and Rust."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ds4.agent.patch import apply
from ds4.agent.testrun import detect_test_command, run_tests
from tests.fakes import EXAMPLES, GOLD

NAMES = ["pricing-py", "slugify-js", "ringbuf-rs"]


def checkout(name: str, tmp_path: Path) -> Path:
    repo = tmp_path / name
    shutil.copytree(EXAMPLES / name, repo)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "base"],
    ):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    return repo


@pytest.mark.parametrize("name", NAMES)
def test_example_fails_as_shipped_and_passes_with_the_gold_patch(name, tmp_path):
    repo = checkout(name, tmp_path)
    assert (repo / "ISSUE.md").read_text().strip()
    command = detect_test_command(repo)
    assert command is not None
    before = run_tests(command, repo, timeout=600)
    assert before.exit_code not in (0, None), before.output[-2000:]
    apply((GOLD / f"{name}.diff").read_text(), repo)
    after = run_tests(command, repo, timeout=600)
    assert after.passed, after.output[-2000:]
