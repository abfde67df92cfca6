"""Prompts that fit the model's context: the repository budget a context leaves (beside the answer's
max_tokens, the instructions and a reserve for later rounds' answers and feedback), and each round's
messages fitted before they are sent (older rounds dropped, the newest feedback cut). It counts tokens and
trims text; it never packs (pack.py) nor sends."""

from __future__ import annotations

from ds4.agent.errors import FixError
from ds4.agent.tokens import TokenCounter

DEFAULT_BUDGET = 32_000  # prompt tokens for the repository and issue when the model's context is unknown
MIN_BUDGET = 256  # a pack smaller than this shows too little to be worth a run
MESSAGE_TOKENS = 8  # what a chat template adds around each message (role markers), counted generously
FEEDBACK_TOKENS = 2048  # a later round's feedback, reserved beside the previous answer

# How each face names the two settings its user can change when a prompt does not fit: advice names the
# user's own knob (a command-line flag, an editor setting, a request field).
CLI_SETTINGS = {"budget": "--budget", "max_tokens": "--max-tokens"}
EDITOR_SETTINGS = {"budget": "the ds4 `budget` setting", "max_tokens": "the ds4 `maxTokens` setting"}
API_SETTINGS = {"budget": "the request's `budget`", "max_tokens": "the request's `max_tokens`"}


def message_tokens(messages: list[dict], counter: TokenCounter) -> int:
    return sum(counter.count(m["content"]) + MESSAGE_TOKENS for m in messages)


def prompt_room(context: int, max_tokens: int, instructions_tokens: int) -> int:
    """The tokens a context leaves for the packed prompt beside the instructions and one answer."""
    return context - max_tokens - instructions_tokens - 2 * MESSAGE_TOKENS


def budget_for(
    context: int | None, max_tokens: int, instructions_tokens: int, rounds: int, names: dict = CLI_SETTINGS
) -> int:
    """The repository budget that leaves room for the answer and, with later rounds, a reserve of at most
    a third of the rest for the previous answer and its feedback; DEFAULT_BUDGET when `context` is None.
    `names`: the settings as the caller's user knows them (CLI_SETTINGS, EDITOR_SETTINGS, API_SETTINGS)."""
    if context is None:
        return DEFAULT_BUDGET
    room = prompt_room(context, max_tokens, instructions_tokens)
    reserve = 0 if rounds == 1 else min(room // 3, max_tokens + FEEDBACK_TOKENS)
    if room - reserve < MIN_BUDGET:
        raise FixError(
            f"the model's context ({context:,} tokens) leaves no room for a prompt beside answers of "
            f"{max_tokens:,} tokens: lower {names['max_tokens']}"
        )
    return room - reserve


def check_first(
    messages: list[dict],
    context: int | None,
    max_tokens: int,
    counter: TokenCounter,
    names: dict = CLI_SETTINGS,
) -> None:
    """A FixError, before any test runs, when the first round's prompt and answer exceed the context;
    its advice names the settings as `names` does."""
    if context is None:
        return
    used = message_tokens(messages, counter)
    if used + max_tokens > context:
        fits = context - max_tokens - (used - counter.count(messages[-1]["content"]))
        budget, answer = names["budget"], names["max_tokens"]
        advice = f"lower {budget} (at most {fits:,})" if fits >= MIN_BUDGET else f"lower {answer}"
        raise FixError(
            f"the prompt has {used:,} tokens and an answer may take {max_tokens:,}: more than the model's "
            f"context of {context:,}; {advice}, or leave {budget} unset to fit the context"
        )


def fit(messages: list[dict], room: int, counter: TokenCounter) -> list[dict]:
    """The messages to send within `room` tokens: the instructions and the packed prompt (the first two)
    whole, then the latest rounds' (answer, feedback) pairs that fit, newest first; when even the newest
    pair does not fit, its feedback and then its answer are cut in the middle to fit."""
    head, turns = messages[:2], messages[2:]
    left = room - message_tokens(head, counter)
    assert left >= 0, f"the first round's prompt was checked against the context: {left} tokens left"
    pairs = [turns[i : i + 2] for i in range(0, len(turns), 2)]
    kept: list[dict] = []
    for pair in reversed(pairs):
        size = message_tokens(pair, counter)
        if size <= left:
            kept, left = pair + kept, left - size
            continue
        if not kept:
            kept = _cut_pair(pair, left, counter)
        break
    return head + kept


def _cut_pair(pair: list[dict], room: int, counter: TokenCounter) -> list[dict]:
    """The newest (answer, feedback) cut to `room`: the feedback first, down to what the answer leaves."""
    if len(pair) == 1:
        return [{**pair[0], "content": cut(pair[0]["content"], room - MESSAGE_TOKENS, counter)}]
    answer, feedback = pair
    answer_room = min(message_tokens([answer], counter), room // 2)
    answer_text = cut(answer["content"], answer_room - MESSAGE_TOKENS, counter)
    feedback_room = room - message_tokens([{"content": answer_text}], counter) - MESSAGE_TOKENS
    return [
        {**answer, "content": answer_text},
        {**feedback, "content": cut(feedback["content"], feedback_room, counter)},
    ]


def cut(text: str, max_tokens: int, counter: TokenCounter) -> str:
    """`text` within `max_tokens`: whole if it fits, else its start and end around a note of what was cut
    (a test log's first failure and its summary line are at the two ends)."""
    if counter.count(text) <= max_tokens:
        return text
    keep = len(text)
    for _ in range(8):  # shrink by the measured ratio until it fits
        keep = int(keep * max_tokens / max(counter.count(_joined(text, keep)), 1) * 0.95)
        if keep <= 0:
            return ""
        if counter.count(_joined(text, keep)) <= max_tokens:
            return _joined(text, keep)
    return ""


def _joined(text: str, keep: int) -> str:
    head, tail = text[: keep // 2], text[len(text) - keep // 2 :]
    return (
        f"{head}\n[... {len(text) - 2 * (keep // 2):,} characters cut to fit the model's context ...]\n{tail}"
    )
