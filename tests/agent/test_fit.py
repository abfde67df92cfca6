"""Prompts that fit (agent/fit.py): the budget a context leaves, the first round checked, and later rounds'
messages fitted by dropping older turns and cutting the newest feedback, counted with the estimate."""

from __future__ import annotations

import pytest

from ds4.agent.errors import FixError
from ds4.agent.fit import (
    API_SETTINGS,
    DEFAULT_BUDGET,
    EDITOR_SETTINGS,
    budget_for,
    check_first,
    cut,
    fit,
    message_tokens,
)
from ds4.agent.tokens import ApproxCounter

COUNTER = ApproxCounter()


def _log(num_lines: int, tag: str) -> str:
    return "\n".join(
        f"{tag} line {i}: AssertionError in test_add, expected 5 got -1" for i in range(num_lines)
    )


def _conversation(num_rounds: int) -> list[dict]:
    messages = [{"role": "system", "content": "Answer with edits."}, {"role": "user", "content": "x" * 700}]
    for r in range(num_rounds):
        messages.append({"role": "assistant", "content": f"answer {r}: " + "y" * 140})
        messages.append({"role": "user", "content": _log(40, f"round {r}")})
    return messages


def test_the_budget_is_what_the_context_leaves():
    assert budget_for(None, 2048, 150, 3) == DEFAULT_BUDGET
    assert budget_for(2048, 256, 150, 1) == 2048 - 256 - 150 - 16
    room = 2048 - 256 - 150 - 16
    assert budget_for(2048, 256, 150, 3) == room - room // 3  # a third kept for later rounds
    room = 128_000 - 2048 - 150 - 16
    assert budget_for(128_000, 2048, 150, 3) == room - (2048 + 2048)  # at most an answer and its feedback
    with pytest.raises(FixError, match=r"context \(2,048 tokens\) leaves no room .* lower --max-tokens"):
        budget_for(2048, 2048, 150, 1)


def test_a_first_prompt_over_the_context_says_how_much_budget_fits():
    first = [{"role": "system", "content": "Answer with edits."}, {"role": "user", "content": "x" * 3500}]
    size = message_tokens(first, COUNTER)  # the prompt's own 1,000 tokens and the rest
    check_first(first, size + 100, 100, COUNTER)  # exactly fits
    check_first(first, None, 10**6, COUNTER)  # context unknown: the server will say
    with pytest.raises(
        FixError, match=r"more than the model's context of .*; lower --budget \(at most 999\)"
    ):
        check_first(first, size + 99, 100, COUNTER)
    with pytest.raises(FixError, match=r"of 1,000; lower --max-tokens, or leave --budget unset"):
        check_first(first, 1000, 900, COUNTER)


def test_advice_names_the_settings_of_the_users_face():
    """The editor's user sets maxTokens and budget in settings, a client sends fields: no CLI flags."""
    first = [{"role": "system", "content": "Answer with edits."}, {"role": "user", "content": "x" * 3500}]
    with pytest.raises(
        FixError, match=r"lower the ds4 `maxTokens` setting, or leave the ds4 `budget` setting"
    ):
        check_first(first, 1000, 900, COUNTER, EDITOR_SETTINGS)
    with pytest.raises(FixError, match=r"lower the request's `budget` \(at most 999\)"):
        check_first(first, message_tokens(first, COUNTER) + 99, 100, COUNTER, API_SETTINGS)
    with pytest.raises(FixError, match=r"answers of 2,048 tokens: lower the ds4 `maxTokens` setting$"):
        budget_for(2048, 2048, 150, 1, EDITOR_SETTINGS)


def test_what_fits_is_sent_whole():
    messages = _conversation(2)
    assert fit(messages, message_tokens(messages, COUNTER), COUNTER) == messages


def test_older_rounds_are_dropped_before_the_newest_is_cut():
    messages = _conversation(3)
    newest = messages[-2:]
    room = message_tokens(messages[:2] + newest, COUNTER) + 10
    sent = fit(messages, room, COUNTER)
    assert sent == messages[:2] + newest
    assert message_tokens(sent, COUNTER) <= room


def test_the_newest_feedback_is_cut_in_the_middle_to_fit():
    messages = _conversation(2)
    room = message_tokens(messages[:3], COUNTER) + 200  # the answer and 200 tokens of feedback
    sent = fit(messages, room, COUNTER)
    assert sent[:3] == messages[:2] + [messages[-2]] and message_tokens(sent, COUNTER) <= room
    feedback, whole = sent[3]["content"], messages[-1]["content"]
    assert feedback.startswith("round 1 line 0:") and feedback.endswith(whole[-30:])
    assert "characters cut to fit the model's context" in feedback


@pytest.mark.parametrize("max_tokens", [0, 5, 40, 333])
def test_cut_keeps_both_ends_within_the_limit(max_tokens):
    text = _log(200, "t")
    shown = cut(text, max_tokens, COUNTER)
    assert COUNTER.count(shown) <= max_tokens
    if max_tokens >= 40:
        assert shown.startswith("t line 0") and shown.endswith(text[-10:])
    assert cut(text, COUNTER.count(text), COUNTER) == text
