"""The live progress view of `ds4-agent fix`: one plain line per loop event, with the elapsed time."""

from __future__ import annotations

import time


def _tests(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(n.rsplit("::", 1)[-1] for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe(event: dict) -> str:
    kind = event["event"]
    where = f"sample {event['sample']} round {event['round']}: " if "sample" in event else ""
    if kind == "index":
        return "indexing and packing the repository"
    if kind == "secrets":
        first = event["found"][0]
        return f"warning: {len(event['found'])} possible secret(s), e.g. {first['path']}:{first['line']}"
    if kind == "baseline":
        bare = " (WITHOUT a sandbox)" if event.get("sandbox") == "none" else ""
        return f"baseline tests: {event['command']}{bare}"
    if kind == "baseline_done":
        failed = event["failed"]
        if failed:
            return f"baseline: {len(failed)} failing ({_tests(failed)})"
        if event.get("exit_code") is None:
            return "baseline: the tests timed out"
        if event["exit_code"] != 0:
            return f"baseline: the tests fail (exit code {event['exit_code']})"
        return "baseline: all tests pass already, so they cannot confirm a fix (add a failing test)"
    if kind == "ask":
        return where + "asking the model"
    if kind == "answer":
        cached = event.get("cached_tokens")
        cache = f", {cached:,} cached" if cached else ""
        return (
            where + f"{event['tokens']:,} tokens in {event['seconds']}s "
            f"(prompt {event['prompt_tokens']:,}{cache})"
        )
    if kind == "refused":
        return where + f"edits refused, feedback sent: {event['reason']}"
    if kind == "applied":
        return where + f"{event['blocks']} edit(s) applied; testing"
    if kind == "tested":
        if event["timed_out"]:
            return where + "tests timed out"
        if event["passed"]:
            return where + "tests pass"
        return where + f"{len(event['failed'])} failing ({_tests(event['failed'])})"
    if kind == "backend_error":
        return where + f"the model failed, this candidate ends: {event['message']}"
    if kind == "done":
        return f"done: {event['status']}"
    if kind == "error":
        return f"error: {event['message']}"
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "t"))
    return f"{kind} {details}".strip()


class ProgressView:
    """Prints each event as `  12.3s  what happened` to a stream (the CLI gives it standard error)."""

    def __init__(self, stream):
        self.stream, self.start = stream, time.monotonic()

    def __call__(self, event: dict) -> None:
        print(f"{time.monotonic() - self.start:7.1f}s  {describe(event)}", file=self.stream, flush=True)
