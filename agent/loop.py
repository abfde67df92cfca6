"""The fix loop: an issue in, a tested patch out.

Each candidate works in its own git worktree (the user's tree is read, never written, unless asked):
pack the repository and the issue, ask the model for edits, apply them (all or nothing, lint-gated,
inside the worktree only), run the tests in a sandbox, and feed failures or refusals back for another
round. After `samples` candidates the
one to keep is chosen: tests pass, then the fewest failing tests beyond the baseline's, then the
patch most candidates agree on. Everything goes into a run folder: prompts, answers, patches, test
logs, timings, token and cache counts. Control flow uses exceptions; the trajectory is saved in
`finally`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ds4.agent.backends import Backend, BackendError, GenerationParams
from ds4.agent.config import FixConfig
from ds4.agent.errors import FixError
from ds4.agent.events import Kind
from ds4.agent.fit import budget_for, check_first, fit, message_tokens
from ds4.agent.index.indexer import index_repo
from ds4.agent.index.store import open_index
from ds4.agent.pack import pack
from ds4.agent.patch import PatchError, apply
from ds4.agent.runs import RunFolderError, data_folder, new_run, prune_stale
from ds4.agent.sandbox import Sandbox, SandboxError, choose
from ds4.agent.testrun import TestResult, detect_test_command, run_tests
from ds4.agent.tokens import ApproxCounter, TokenCounter

PROMPTS = Path(__file__).resolve().parent / "prompts"
UNCONFIRMED = (
    "The tests passed before any change, so they cannot confirm this fix: add a test that fails on the "
    "issue (or pass --test-cmd with one) and run again."
)


@dataclass
class Candidate:
    sample: int
    rounds: int = 0
    diff: str = ""
    tests: dict | None = None
    failed: list[str] = field(default_factory=list)
    passed: bool = False
    error: str | None = None


@dataclass
class FixResult:
    status: str  # resolved | unresolved | error
    diff: str
    rounds: int
    tests: dict | None
    run_dir: str
    candidates: list[Candidate]
    applied: bool = False
    message: str = ""

    def as_json(self) -> dict:
        return {**asdict(self), "candidates": [asdict(c) for c in self.candidates]}


def git(repo: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise FixError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()}")
    return done.stdout


def fix(config: FixConfig, backend: Backend, on_event: Callable[[dict], None] | None = None) -> FixResult:
    emit = on_event or (lambda event: None)
    repo = config.repo.resolve()
    check_repository(repo)
    try:
        folder = data_folder(repo, config.data_dir)
        sandbox = config.sandbox or choose()
    except (RunFolderError, SandboxError) as e:
        raise FixError(str(e)) from None
    prune_stale(repo, folder)
    run_dir, lock = new_run(folder)
    trajectory: dict = {"issue": config.issue, "backend": backend.name, "events": []}

    def event(kind: Kind, **data) -> None:
        record = {"event": kind.value, "t": round(time.time(), 3), **data}
        trajectory["events"].append(record)
        emit(record)

    worktrees: list[Path] = []
    try:
        command = config.test_cmd or detect_test_command(repo)
        if command is None:
            raise FixError("no test command found (pytest, npm test, go test, cargo test): pass --test-cmd")
        user_changes = git(repo, "diff", "HEAD", "--binary")
        event(Kind.INDEX)
        index_repo(repo, folder / "index.db")
        counter = TokenCounter(backend.tokenizer_file) if backend.tokenizer_file else ApproxCounter()
        instructions = (PROMPTS / "fix.md").read_text()
        context, max_tokens = backend.max_model_len, config.generation.max_tokens
        budget = config.budget
        if budget is None:  # what the model's context leaves, else DEFAULT_BUDGET
            budget = budget_for(
                context, max_tokens, counter.count(instructions), config.rounds, config.setting_names
            )
        with open_index(folder / "index.db") as db:
            packed = pack(db, repo, config.issue, budget, counter, overlay=config.overlay)
        first = [{"role": "system", "content": instructions}, {"role": "user", "content": packed.prompt}]
        # before the baseline: minutes on a real repository
        check_first(first, context, max_tokens, counter, config.setting_names)
        (run_dir / "prompt.txt").write_text(packed.prompt)
        (run_dir / "manifest.json").write_text(json.dumps(packed.manifest(), indent=2))
        if packed.secrets:
            event(Kind.SECRETS, found=packed.secrets)

        baseline_tree = _worktree(repo, run_dir / "baseline", user_changes, worktrees, config.overlay)
        event(Kind.BASELINE, command=command, sandbox=sandbox.name)
        baseline = run_tests(command, baseline_tree, config.test_timeout, config.cancel, sandbox)
        (run_dir / "baseline-tests.log").write_text(baseline.output)
        event(Kind.BASELINE_DONE, exit_code=baseline.exit_code, failed=baseline.failed)

        samples = range(1, config.samples + 1)
        trees = [
            _worktree(repo, run_dir / f"sample-{s}", user_changes, worktrees, config.overlay) for s in samples
        ]

        def attempt(sample: int, tree: Path) -> Candidate:
            return _attempt(
                config, backend, first, counter, tree, command, sandbox, baseline, sample, run_dir, event
            )

        if backend.can_run_concurrently and config.samples > 1:  # each sample in its own thread and worktree
            with ThreadPoolExecutor(config.samples) as pool:
                candidates = list(pool.map(attempt, samples, trees))
        else:
            candidates = [attempt(sample, tree) for sample, tree in zip(samples, trees, strict=True)]
        best = select(candidates, baseline)
        result = FixResult(
            "resolved" if best and best.passed else "unresolved",
            best.diff if best else "",
            best.rounds if best else 0,
            best.tests if best else None,
            str(run_dir),
            candidates,
        )
        if config.apply and best and best.passed:
            result.applied, result.message = _apply_to_user_tree(repo, best.diff)
        if baseline.passed:
            result.message = " ".join(filter(None, [result.message, UNCONFIRMED]))
        (run_dir / "result.json").write_text(json.dumps(result.as_json(), indent=2))
        event(Kind.DONE, status=result.status)
        return result
    except (FixError, BackendError) as e:
        event(Kind.ERROR, message=str(e))
        return FixResult("error", "", 0, None, str(run_dir), [], message=str(e))
    finally:
        (run_dir / "trajectory.json").write_text(json.dumps(trajectory, indent=2, default=str))
        for tree in worktrees:
            git(repo, "worktree", "remove", "--force", str(tree), check=False)
            shutil.rmtree(tree, ignore_errors=True)
        os.close(lock)


def check_repository(repo: Path) -> None:
    """A FixError unless `repo` is a git repository with a commit: its worktrees start from HEAD."""
    if not git(repo, "rev-parse", "--is-inside-work-tree", check=False).strip() == "true":
        raise FixError(
            f"{repo} is not a git repository: ds4 works in git worktrees; choose a repository, "
            "or run `git init` there and commit"
        )
    if not git(repo, "rev-parse", "--verify", "--quiet", "HEAD", check=False).strip():
        raise FixError(
            f"{repo} has no commits yet: ds4 starts from your last commit; commit first "
            "(git add -A && git commit -m start)"
        )


def _worktree(
    repo: Path, path: Path, user_changes: str, made: list[Path], overlay: dict[str, str] | None = None
) -> Path:
    """A detached worktree at HEAD plus the user's uncommitted changes and unsaved buffers: the state
    the user sees. Each layer is committed, so a candidate's `git diff HEAD` is its own change only."""
    git(repo, "worktree", "add", "--detach", "--quiet", str(path), "HEAD")
    made.append(path)
    if user_changes.strip():
        subprocess.run(
            ["git", "-C", str(path), "apply", "--whitespace=nowarn"],
            input=user_changes,
            text=True,
            check=True,
            capture_output=True,
        )
        _commit_all(path, "user changes")
    if overlay:
        for rel, text in overlay.items():
            target = (path / rel).resolve()
            if not target.is_relative_to(path.resolve()):
                raise FixError(f"an unsaved buffer's path {rel!r} is outside the repository")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode("utf-8", "surrogateescape"))
        _commit_all(path, "unsaved buffers")
    return path


def _commit_all(tree: Path, message: str) -> None:
    git(tree, "add", "-A")
    who = ("-c", "user.email=ds4@localhost", "-c", "user.name=ds4")
    git(tree, *who, "commit", "-q", "--allow-empty", "-m", message)


def _attempt(
    config: FixConfig,
    backend: Backend,
    first: list[dict],
    counter: TokenCounter,
    tree: Path,
    command: str,
    sandbox: Sandbox,
    baseline: TestResult,
    sample: int,
    run_dir: Path,
    event,
) -> Candidate:
    candidate = Candidate(sample)
    messages = list(first)
    params = (
        config.generation
        if sample == 1
        else GenerationParams(
            config.generation.max_tokens,
            max(config.generation.temperature, 0.7),
            (config.generation.seed or 0) + sample,
        )
    )
    for round_ in range(1, config.rounds + 1):
        candidate.rounds = round_
        tag = f"sample-{sample}-round-{round_}"
        sent = _fitted(messages, backend.max_model_len, params.max_tokens, counter)
        if sent != messages:
            event(Kind.TRIMMED, sample=sample, round=round_, tokens=message_tokens(sent, counter))
        event(Kind.ASK, sample=sample, round=round_)
        try:
            completion = backend.complete(sent, params)
        except BackendError as e:
            if round_ == 1 and sample == 1:
                raise  # the model cannot be used at all
            event(Kind.BACKEND_ERROR, sample=sample, round=round_, message=str(e))  # e.g. the context is full
            candidate.error = str(e)
            break
        (run_dir / f"{tag}-answer.md").write_text(completion.text)
        event(
            Kind.ANSWER,
            sample=sample,
            round=round_,
            tokens=completion.completion_tokens,
            prompt_tokens=completion.prompt_tokens,
            cached_tokens=completion.cached_tokens,
            seconds=round(completion.seconds, 2),
        )
        messages.append({"role": "assistant", "content": completion.text})
        try:
            applied = apply(completion.text, tree)
        except PatchError as e:
            event(Kind.REFUSED, sample=sample, round=round_, reason=str(e).splitlines()[0])
            candidate.error = str(e)
            messages.append({"role": "user", "content": _feedback("refused", str(e))})
            continue
        candidate.diff = git(tree, "diff", "HEAD")
        (run_dir / f"{tag}.diff").write_text(candidate.diff)
        event(Kind.APPLIED, sample=sample, round=round_, blocks=applied.applied)
        tests = run_tests(command, tree, config.test_timeout, config.cancel, sandbox)
        (run_dir / f"{tag}-tests.log").write_text(tests.output)
        candidate.tests = {
            "command": tests.command,
            "exit_code": tests.exit_code,
            "seconds": round(tests.seconds, 2),
            "failed": tests.failed,
            "timed_out": tests.timed_out,
        }
        candidate.failed, candidate.passed, candidate.error = tests.failed, tests.passed, None
        event(
            Kind.TESTED,
            sample=sample,
            round=round_,
            passed=tests.passed,
            failed=tests.failed[:20],
            timed_out=tests.timed_out,
        )
        if tests.passed:
            break
        messages.append({"role": "user", "content": _feedback("tests", tests.feedback())})
    return candidate


def _fitted(messages: list[dict], context: int | None, max_tokens: int, counter: TokenCounter) -> list[dict]:
    """The messages as sent: fitted to the context beside the answer when the backend says its context."""
    return messages if context is None else fit(messages, context - max_tokens, counter)


def _feedback(kind: str, detail: str) -> str:
    if kind == "refused":
        return (
            "Your edits were not applied (nothing was changed):\n\n"
            + detail
            + "\n\nAnswer again with corrected SEARCH/REPLACE blocks that quote the current file exactly."
        )
    return (
        "Your edits were applied, but the tests fail:\n\n"
        + detail
        + "\n\nAnswer with further SEARCH/REPLACE blocks against the files as they are now."
    )


def normalized(diff: str) -> str:
    """A patch without its line numbers and index lines, for comparing candidates."""
    keep = [
        line.rstrip()
        for line in diff.splitlines()
        if line[:1] in "+- " and not line.startswith(("+++", "---"))
    ]
    return "\n".join(keep)


def select(candidates: list[Candidate], baseline: TestResult) -> Candidate | None:
    """Tests pass, then the fewest failing tests the baseline did not have, then the most agreed-on patch."""
    usable = [c for c in candidates if c.diff]
    if not usable:
        return candidates[0] if candidates else None
    agreement = Counter(normalized(c.diff) for c in usable)
    already = set(baseline.failed)

    def key(c: Candidate):
        regressions = len(set(c.failed) - already) if c.tests else 10**6
        return (not c.passed, regressions, -agreement[normalized(c.diff)], c.sample)

    return min(usable, key=key)


def _apply_to_user_tree(repo: Path, diff: str) -> tuple[bool, str]:
    """Writes the patch into the user's tree only if it applies cleanly there."""
    check = subprocess.run(
        ["git", "-C", str(repo), "apply", "--check", "-"], input=diff, text=True, capture_output=True
    )
    if check.returncode != 0:
        return False, f"not applied: the patch does not apply cleanly to your tree ({check.stderr.strip()})"
    subprocess.run(
        ["git", "-C", str(repo), "apply", "-"], input=diff, text=True, check=True, capture_output=True
    )
    return True, "applied to your working tree"
