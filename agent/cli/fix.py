"""`ds4-agent fix` and `ds4-agent swebench` (predict, evaluate): the fix loop from the command line, over
one issue or over SWE-bench instances, with the backend, budget and sandbox flags they share."""

from __future__ import annotations

import json
import sys
import time

from ds4.agent.backends import GenerationParams
from ds4.agent.cli import DONE, NOT_RESOLVED, USAGE
from ds4.agent.cli.flags import add_backend_flags, add_sandbox_flag, backend, sandbox
from ds4.agent.cli.inputs import read_issue, require_dir
from ds4.agent.config import DEFAULTS, FixConfig, merge_args
from ds4.agent.errors import InputError
from ds4.agent.events import describe
from ds4.agent.fit import DEFAULT_BUDGET

SETTINGS_HELP = (
    "Unset flags come from REPO/.ds4.toml, then ~/.config/ds4/config.toml (same names, e.g. rounds); "
    "model, endpoint, model_name and sandbox only from the latter."
)


def add_parser(sub) -> None:
    _add_fix(sub)
    swe = sub.add_parser("swebench")
    swe_sub = swe.add_subparsers(dest="swebench_command", required=True)
    _add_predict(swe_sub)
    _add_evaluate(swe_sub)


def run(args) -> int:
    if args.command == "fix":
        return _fix(args)
    return {"predict": _predict, "evaluate": _evaluate}[args.swebench_command](args)


def _add_fix(sub) -> None:
    fix = sub.add_parser("fix", epilog=SETTINGS_HELP)
    fix.add_argument(
        "issue",
        nargs="?",
        default=None,
        help="the issue: a file, - for standard input, or a GitHub issue URL",
    )
    fix.add_argument("--issue-text", default=None, help="the issue's text itself (instead of ISSUE)")
    fix.add_argument("--repo", default=".")
    add_backend_flags(fix)
    _add_fix_knobs(fix)
    add_sandbox_flag(fix)
    fix.add_argument(
        "--apply", action="store_true", help="write the selected patch to your tree if it applies"
    )
    fix.add_argument("--json", action="store_true")


def _add_fix_knobs(parser) -> None:
    """The flags of one fix, shared by `fix` and `swebench predict`; unset ones come from the settings."""
    parser.add_argument(
        "--tokenizer", default=None, help="with --endpoint: a tokenizer.json for exact budgets"
    )
    parser.add_argument(
        "--test-cmd", default=None, help="default: detected (pytest, npm test, go test, cargo test)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"feedback rounds (default {DEFAULTS['rounds']})"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"candidates (default {DEFAULTS['samples']}; against an endpoint they run at once)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="prompt tokens for the repository and issue (default: what the model's context leaves beside "
        f"the answer and later rounds' feedback; {DEFAULT_BUDGET} where the context is not known)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help=f"tokens per answer (default {DEFAULTS['max_tokens']})"
    )
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=None,
        help=f"seconds per test run (default {DEFAULTS['test_timeout']:g})",
    )


def _fix(args) -> int:
    from pathlib import Path

    from ds4.agent.loop import check_repository, fix
    from ds4.agent.runs import checked

    require_dir(args.repo)
    check_repository(Path(args.repo).resolve())  # before the model loads or the endpoint is asked
    checked(Path(args.repo) / ".ds4")  # a committed .ds4 symlink is refused before anything else too
    filled = merge_args(args, args.repo)
    issue = read_issue(args.issue or "", args.issue_text)
    if not issue.strip():
        raise InputError(
            "the issue is empty: give its text, a file, - for standard input, or a GitHub issue URL", "issue"
        )
    model = backend(args)  # probed now: a server that cannot be used ends the run before any test runs
    config = _fix_config(args, Path(args.repo), issue, apply=args.apply, sandbox=sandbox(args))
    if filled.get("test_cmd", Path()).name == ".ds4.toml":
        _show_repo_test_cmd(filled["test_cmd"], args.test_cmd, config.sandbox)
    progress = None if args.json else ProgressView(sys.stderr)
    result = fix(config, model, progress)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    elif result.status == "error":  # the loop could not run: one line, as every error that stops a command
        print(f"ds4-agent: error: {result.message} (run folder {result.run_dir})", file=sys.stderr)
    else:
        if result.diff:
            print(result.diff)
        verdict = {
            "resolved": "resolved: the tests pass",
            "unresolved": "unresolved: no candidate passed the tests",
        }[result.status]
        applied = f"; {result.message}" if result.status == "resolved" and result.message else ""
        print(f"{verdict} ({result.rounds} round(s); run folder {result.run_dir}){applied}")
    return {"resolved": DONE, "unresolved": NOT_RESOLVED, "error": USAGE}[result.status]


def _fix_config(args, repo, issue: str, **more) -> FixConfig:
    """The fix the flags ask for, once merge_args has filled the unset ones from the settings."""
    return FixConfig(
        repo=repo,
        issue=issue,
        test_cmd=args.test_cmd,
        rounds=args.rounds,
        samples=args.samples,
        budget=args.budget,
        test_timeout=args.test_timeout,
        generation=GenerationParams(max_tokens=args.max_tokens),
        **more,
    )


class ProgressView:
    """Prints each loop event as `  12.3s  what happened` to a stream (standard error)."""

    def __init__(self, stream):
        self.stream, self.start = stream, time.monotonic()

    def __call__(self, event: dict) -> None:
        print(f"{time.monotonic() - self.start:7.1f}s  {describe(event)}", file=self.stream, flush=True)


def _show_repo_test_cmd(path, command: str, runs_in) -> None:
    """A repository's file chose code to run: say what, and where (the Sandbox `runs_in`), before it runs."""
    where = "in the bubblewrap sandbox" if runs_in.name == "bubblewrap" else "WITHOUT a sandbox"
    print(f"ds4-agent: {path} sets the test command; it runs {where}:\n  {command}", file=sys.stderr)


def _add_predict(sub) -> None:
    predict = sub.add_parser(
        "predict", help="run the fix loop on each instance; write predictions (JSONL)", epilog=SETTINGS_HELP
    )
    predict.add_argument("instances")
    predict.add_argument("--repos-dir", required=True)
    predict.add_argument("--out", required=True)
    add_backend_flags(predict)
    _add_fix_knobs(predict)
    add_sandbox_flag(predict)


def _predict(args) -> int:
    from ds4.agent.swebench import load_jsonl, predict

    merge_args(args, None)
    instances = load_jsonl(args.instances)
    chosen = sandbox(args)

    def make_config(repo, issue):
        return _fix_config(args, repo, issue, sandbox=chosen)

    preds = predict(instances, args.repos_dir, backend(args), args.out, make_config)
    print(
        f"{len(preds)} predictions written to {args.out} "
        f"({sum(bool(p['model_patch']) for p in preds)} with a patch)"
    )
    return DONE


def _add_evaluate(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="apply test_patch and each prediction; run FAIL/PASS_TO_PASS")
    evaluate.add_argument("instances")
    evaluate.add_argument("predictions")
    evaluate.add_argument("--repos-dir", required=True)
    evaluate.add_argument("--test-cmd", default=None)
    add_sandbox_flag(evaluate)
    evaluate.add_argument("--json", action="store_true")


def _evaluate(args) -> int:
    from dataclasses import asdict

    from ds4.agent.swebench import evaluate, load_jsonl

    results = evaluate(
        load_jsonl(args.instances),
        load_jsonl(args.predictions),
        args.repos_dir,
        args.test_cmd,
        sandbox=sandbox(args),
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.instance_id}: {r.status}" + (f" ({r.reason})" if r.reason else ""))
        counts = {s: sum(r.status == s for r in results) for s in ("resolved", "partial", "failed")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return DONE
