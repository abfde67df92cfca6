"""SWE-bench in and out: predictions in the official harness's format, and a local evaluation for
repositories whose environment is already installed.

An instance is a JSON line with `instance_id`, `repo` ("owner/name"), `base_commit`,
`problem_statement`, `test_patch`, `FAIL_TO_PASS` and `PASS_TO_PASS` (lists, or JSON strings of lists).
Repositories are looked up under --repos-dir as owner__name, name, or owner/name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ds4.agent.backends import Backend
from ds4.agent.errors import SweBenchError
from ds4.agent.loop import FixConfig, fix
from ds4.agent.sandbox import Sandbox
from ds4.agent.testrun import detect_test_command, run_tests


def load_jsonl(path: str | Path) -> list[dict]:
    if not Path(path).is_file():
        raise SweBenchError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SweBenchError(f"{path}:{number}: not JSON ({e})") from None
    return rows


def _tests(instance: dict, key: str) -> list[str]:
    value = instance.get(key) or []
    return json.loads(value) if isinstance(value, str) else list(value)


def repo_dir(repos_dir: str | Path, repo: str) -> Path:
    root = Path(repos_dir)
    owner, _, name = repo.partition("/")
    for candidate in (root / f"{owner}__{name}", root / (name or owner), root / repo):
        if (candidate / ".git").exists():
            return candidate
    raise SweBenchError(f"repository {repo} is not under {root} (as {owner}__{name}, {name} or {repo})")


class _Checkout:
    """A detached worktree of `repo` at `commit`, removed on exit."""

    def __init__(self, repo: Path, commit: str):
        self.repo, self.commit = repo, commit
        self.path = Path(tempfile.mkdtemp(prefix="ds4-swebench-")) / "tree"

    def __enter__(self) -> Path:
        done = subprocess.run(
            [
                "git",
                "-C",
                str(self.repo),
                "worktree",
                "add",
                "--detach",
                "--quiet",
                str(self.path),
                self.commit,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SweBenchError(f"cannot check out {self.commit} of {self.repo}: {done.stderr.strip()}")
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(
            ["git", "-C", str(self.repo), "worktree", "remove", "--force", str(self.path)],
            capture_output=True,
        )
        shutil.rmtree(self.path.parent, ignore_errors=True)


def predict(
    instances: list[dict],
    repos_dir: str | Path,
    backend: Backend,
    out: str | Path,
    make_config=None,
) -> list[dict]:
    """Runs the fix loop on each instance at its base commit; writes one prediction per line."""
    predictions = []
    with open(out, "w") as f:
        for instance in instances:
            repo = repo_dir(repos_dir, instance["repo"])
            with _Checkout(repo, instance["base_commit"]) as tree:
                issue = instance["problem_statement"]
                config = make_config(tree, issue) if make_config else FixConfig(repo=tree, issue=issue)
                result = fix(config, backend)
            prediction = {
                "instance_id": instance["instance_id"],
                "model_name_or_path": f"ds4/{backend.name}",
                "model_patch": result.diff,
            }
            f.write(json.dumps(prediction) + "\n")
            f.flush()
            predictions.append(prediction)
    return predictions


@dataclass
class Evaluation:
    instance_id: str
    status: str  # resolved | partial | failed
    fail_to_pass: dict[str, bool] = field(default_factory=dict)
    pass_to_pass: dict[str, bool] = field(default_factory=dict)
    reason: str = ""


def evaluate(
    instances: list[dict],
    predictions: list[dict],
    repos_dir: str | Path,
    test_cmd: str | None = None,
    timeout: float = 1800.0,
    sandbox: Sandbox | None = None,
) -> list[Evaluation]:
    """Each prediction's FAIL_TO_PASS and PASS_TO_PASS tests, run in `sandbox` (default: bubblewrap)."""
    by_id = {p["instance_id"]: p for p in predictions}
    results = []
    for instance in instances:
        prediction = by_id.get(instance["instance_id"])
        if prediction is None:
            results.append(Evaluation(instance["instance_id"], "failed", reason="no prediction"))
            continue
        results.append(
            _evaluate_one(
                instance, prediction.get("model_patch") or "", repos_dir, test_cmd, timeout, sandbox
            )
        )
    return results


def _evaluate_one(instance: dict, patch: str, repos_dir, test_cmd, timeout, sandbox) -> Evaluation:
    result = Evaluation(instance["instance_id"], "failed")
    repo = repo_dir(repos_dir, instance["repo"])
    with _Checkout(repo, instance["base_commit"]) as tree:
        for name, diff in (("test_patch", instance.get("test_patch") or ""), ("model_patch", patch)):
            if diff.strip() and not _git_apply(tree, diff):
                result.reason = f"{name} does not apply"
                return result
        f2p, p2p = _tests(instance, "FAIL_TO_PASS"), _tests(instance, "PASS_TO_PASS")
        command = test_cmd or detect_test_command(tree)
        if command is None:
            result.reason = "no test command found"
            return result
        if command.startswith("python -m pytest"):
            command = " ".join([command, *(f"'{t}'" for t in f2p + p2p)])
        run = run_tests(command, tree, timeout, sandbox=sandbox)
    failed = set(run.failed)
    collected_error = run.exit_code not in (0, 1) and not failed  # pytest could not run the tests at all

    def ok(t):
        return t not in failed and not collected_error and not run.timed_out

    result.fail_to_pass = {t: ok(t) for t in f2p}
    result.pass_to_pass = {t: ok(t) for t in p2p}
    if all(result.fail_to_pass.values()) and all(result.pass_to_pass.values()):
        result.status = "resolved"
    elif any(result.fail_to_pass.values()) and all(result.pass_to_pass.values()):
        result.status = "partial"
    result.reason = "timed out" if run.timed_out else ""
    return result


def _git_apply(tree: Path, diff: str) -> bool:
    for extra in ([], ["--3way"]):
        done = subprocess.run(
            ["git", "-C", str(tree), "apply", "--whitespace=nowarn", *extra, "-"],
            input=diff,
            text=True,
            capture_output=True,
        )
        if done.returncode == 0:
            return True
    return False
