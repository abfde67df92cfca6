"""The fix loop's events: their kinds and `describe`, the one line each face shows for an event (the CLI's
progress, the API's event stream, the editor's `$/progress`). An event is a dict: {"event": kind, "t":
seconds since the epoch, ...the kind's fields}; the loop emits them and keeps them in the trajectory."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    INDEX = "index"  # indexing and packing the repository
    SECRETS = "secrets"  # found: possible secrets in packed files
    BASELINE = "baseline"  # command, sandbox: the tests run before any change
    BASELINE_DONE = "baseline_done"  # exit_code, failed
    TRIMMED = "trimmed"  # sample, round, tokens: earlier rounds' turns dropped or cut to fit the context
    ASK = "ask"  # sample, round: the model is asked
    ANSWER = "answer"  # sample, round, tokens, prompt_tokens, cached_tokens, seconds
    REFUSED = "refused"  # sample, round, reason: the edits did not apply; feedback sent
    APPLIED = "applied"  # sample, round, blocks
    TESTED = "tested"  # sample, round, passed, failed, timed_out
    BACKEND_ERROR = "backend_error"  # sample, round, message: this candidate ends
    DONE = "done"  # status
    ERROR = "error"  # message: the loop could not run


def describe(event: dict) -> str:
    """One plain line for `event`; a kind this module does not know is shown with its fields."""
    kind = event["event"]
    where = f"sample {event['sample']} round {event['round']}: " if "sample" in event else ""
    if kind == Kind.INDEX:
        return "indexing and packing the repository"
    if kind == Kind.SECRETS:
        first = event["found"][0]
        return f"warning: {len(event['found'])} possible secret(s), e.g. {first['path']}:{first['line']}"
    if kind == Kind.BASELINE:
        bare = " (WITHOUT a sandbox)" if event.get("sandbox") == "none" else ""
        return f"baseline tests: {event['command']}{bare}"
    if kind == Kind.BASELINE_DONE:
        return _baseline(event)
    if kind == Kind.TRIMMED:
        return (
            where + f"earlier feedback trimmed to fit the model's context ({event['tokens']:,} prompt tokens)"
        )
    if kind == Kind.ASK:
        return where + "asking the model"
    if kind == Kind.ANSWER:
        cached = event.get("cached_tokens")
        cache = f", {cached:,} cached" if cached else ""
        return (
            where + f"{event['tokens']:,} tokens in {event['seconds']}s "
            f"(prompt {event['prompt_tokens']:,}{cache})"
        )
    if kind == Kind.REFUSED:
        return where + f"edits refused, feedback sent: {event['reason']}"
    if kind == Kind.APPLIED:
        return where + f"{event['blocks']} edit(s) applied; testing"
    if kind == Kind.TESTED:
        return where + _tested(event)
    if kind == Kind.BACKEND_ERROR:
        return where + f"the model failed, this candidate ends: {event['message']}"
    if kind == Kind.DONE:
        return f"done: {event['status']}"
    if kind == Kind.ERROR:
        return f"error: {event['message']}"
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "t"))
    return f"{kind} {details}".strip()


def _baseline(event: dict) -> str:
    failed = event["failed"]
    if failed:
        return f"baseline: {len(failed)} failing ({_tests(failed)})"
    if event.get("exit_code") is None:
        return "baseline: the tests timed out"
    if event["exit_code"] != 0:
        return f"baseline: the tests fail (exit code {event['exit_code']})"
    return "baseline: all tests pass already, so they cannot confirm a fix (add a failing test)"


def _tested(event: dict) -> str:
    if event["timed_out"]:
        return "tests timed out"
    if event["passed"]:
        return "tests pass"
    return f"{len(event['failed'])} failing ({_tests(event['failed'])})"


def _tests(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(n.rsplit("::", 1)[-1] for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
