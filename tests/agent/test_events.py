"""The loop's events as every face shows them: one line per kind, the fallback only for unknown kinds."""

from __future__ import annotations

from ds4.agent.events import Kind, describe

EXAMPLES = {
    Kind.INDEX: ({}, "indexing and packing the repository"),
    Kind.SECRETS: (
        {"found": [{"path": "a.py", "line": 3, "kind": "key"}]},
        "warning: 1 possible secret(s), e.g. a.py:3",
    ),
    Kind.BASELINE: ({"command": "pytest", "sandbox": "none"}, "baseline tests: pytest (WITHOUT a sandbox)"),
    Kind.BASELINE_DONE: ({"exit_code": 1, "failed": ["t.py::test_a"]}, "baseline: 1 failing (test_a)"),
    Kind.TRIMMED: (
        {"sample": 1, "round": 3, "tokens": 1900},
        "sample 1 round 3: earlier feedback trimmed to fit the model's context (1,900 prompt tokens)",
    ),
    Kind.ASK: ({"sample": 1, "round": 2}, "sample 1 round 2: asking the model"),
    Kind.ANSWER: (
        {
            "sample": 1,
            "round": 1,
            "tokens": 1200,
            "seconds": 3.5,
            "prompt_tokens": 9000,
            "cached_tokens": 8000,
        },
        "sample 1 round 1: 1,200 tokens in 3.5s (prompt 9,000, 8,000 cached)",
    ),
    Kind.REFUSED: (
        {"sample": 1, "round": 1, "reason": "no match"},
        "sample 1 round 1: edits refused, feedback sent: no match",
    ),
    Kind.APPLIED: ({"sample": 2, "round": 1, "blocks": 2}, "sample 2 round 1: 2 edit(s) applied; testing"),
    Kind.TESTED: (
        {"sample": 1, "round": 3, "passed": False, "timed_out": False, "failed": ["a", "b", "c", "d"]},
        "sample 1 round 3: 4 failing (a, b, c and 1 more)",
    ),
    Kind.BACKEND_ERROR: (
        {"sample": 2, "round": 1, "message": "context full"},
        "sample 2 round 1: the model failed, this candidate ends: context full",
    ),
    Kind.DONE: ({"status": "resolved"}, "done: resolved"),
    Kind.ERROR: ({"message": "not a git repository"}, "error: not a git repository"),
}


def test_every_kind_has_its_own_line():
    assert set(EXAMPLES) == set(Kind)
    for kind, (fields, line) in EXAMPLES.items():
        assert describe({"event": kind.value, "t": 0.0, **fields}) == line


def test_an_unknown_kind_shows_its_fields():
    assert describe({"event": "end", "t": 1.0, "status": "finished"}) == "end status=finished"


def test_tests_that_pass_or_time_out():
    base = {"event": "tested", "sample": 1, "round": 1, "failed": []}
    assert describe({**base, "passed": True, "timed_out": False}) == "sample 1 round 1: tests pass"
    assert describe({**base, "passed": False, "timed_out": True}) == "sample 1 round 1: tests timed out"
