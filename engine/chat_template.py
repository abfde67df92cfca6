"""DeepSeek's chat template with DeepSeek V3.1's tool calls (the deepseek_v3 family): messages, tools,
assistant calls and tool results laid out as (text, is it a template marker) pieces. Turning pieces
into token ids is the tokenizer's; V3.2's and V4's DSML layout is dsml.py's."""

from __future__ import annotations

import json

from ds4.engine.errors import RequestError

BOS, EOS, USER, ASSISTANT = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
)
ROLES = ("system", "user", "assistant", "tool")
# DeepSeek V3.1's tool-call tokens; a tokenizer without them (the tiny test ones) gets them as text
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, CALL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOLS_PROMPT = """

## Tools
You have access to the following tools:
{tools}
IMPORTANT: ALWAYS adhere to this exact format for tool use:
{calls_begin}{call_begin}tool_call_name{sep}tool_call_arguments{call_end}{{additional_tool_calls}}{calls_end}

Where:

- `tool_call_name` must be an exact match to one of the available tools
- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema
- For multiple tool calls, chain them directly without separators or spaces
"""


def chat_parts(
    messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None
) -> list[tuple[str, bool]]:
    """The chat prompt as (text, is it a template marker) pieces, in order."""
    parts = [(BOS, True)]
    for i, message in enumerate(messages):
        role, content = role_and_content(i, message)
        if role == "system":
            parts.append((content, False))
        elif role == "user":
            parts += [(USER, True), (content, False)]
        elif role == "tool":
            parts += [(OUTPUT_BEGIN, True), (content, False), (OUTPUT_END, True)]
        else:
            parts += [
                (ASSISTANT, True),
                (content, False),
                *_call_parts(message.get("tool_calls")),
                (EOS, True),
            ]
    if tools:
        at = 2 if len(parts) > 1 and not parts[1][1] else 1  # after the system text, or as one
        parts.insert(at, (_tools_text(tools), False))
    if add_generation_prompt:
        parts.append((ASSISTANT, True))
    return merged(parts)  # adjacent texts (two system messages) encode as one, as before


def merged(parts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Adjacent texts as one, empty pieces dropped."""
    out: list[tuple[str, bool]] = []
    for text, is_marker in parts:
        if out and not is_marker and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        elif text:
            out.append((text, is_marker))
    return out


def role_and_content(i: int, message) -> tuple[str, str]:
    """A message's role and text: an assistant message that only calls tools may have no content."""
    role = message.get("role") if isinstance(message, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if role == "assistant" and content is None and message.get("tool_calls"):
        content = ""
    if role not in ROLES or not isinstance(content, str):
        shape = f"{{'role': one of {', '.join(ROLES)}, 'content': a string}}"
        raise RequestError(f"messages[{i}] must be {shape}, got {message!r}")
    return role, content


def _call_parts(calls: list[dict] | None) -> list[tuple[str, bool]]:
    """An assistant turn's tool calls: <｜tool▁calls▁begin｜>, then per call
    <｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>, then <｜tool▁calls▁end｜>."""
    if not calls:
        return []
    parts = [(CALLS_BEGIN, True)]
    for call in calls:
        function = call.get("function") or {}
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise RequestError(f"a tool call needs a function name and arguments as strings, got {call!r}")
        parts += [(CALL_BEGIN, True), (name, False), (CALL_SEP, True), (arguments, False), (CALL_END, True)]
    return [*parts, (CALLS_END, True)]


def _tools_text(tools: list[dict]) -> str:
    """The system prompt's tool section, as DeepSeek V3.1's template writes it."""
    described = []
    for tool in tools:
        f = tool.get("function") or {}
        params = json.dumps(f.get("parameters") or {"type": "object", "properties": {}}, ensure_ascii=False)
        described.append(
            f"\n### {f.get('name')}\nDescription: {f.get('description') or ''}\n\nParameters: {params}\n"
        )
    return TOOLS_PROMPT.format(
        tools="".join(described),
        calls_begin=CALLS_BEGIN,
        calls_end=CALLS_END,
        call_begin=CALL_BEGIN,
        call_end=CALL_END,
        sep=CALL_SEP,
    )
