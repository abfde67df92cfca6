"""What a chat request asks of the engine beyond its messages, and how the answer goes back: the tools
offered to the model, the grammar that enforces `response_format` or a forced `tool_choice`, and the
reply's content and `tool_calls` (whole, or chunk by chunk while streaming)."""

from __future__ import annotations

import msgspec

from ds4.agent.api import dsml_calls
from ds4.agent.api.errors import APIError
from ds4.agent.api.openai_bodies import ChatCompletionRequest, ChatMessage, NamedToolChoice
from ds4.agent.api.tool_calls import ToolCallStream, call_grammar, parse
from ds4.engine.dsml import CALLS_TAG
from ds4.engine.grammar import Grammar
from ds4.engine.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template reads them: text content, an assistant's tool calls."""
    if not messages:
        raise APIError(400, "messages must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(
                400,
                f"messages[{i}].role must be one of {', '.join(ROLES)}, not {m.role!r}",
                f"messages[{i}].role",
            )
        text = "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content or ""
        message = {"role": m.role, "content": text}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = msgspec.to_builtins(m.tool_calls)
        out.append(message)
    return out


def offered_tools(data: ChatCompletionRequest) -> list[dict] | None:
    """The tools the model is shown (none when tool_choice is "none"); a forced choice needs tools, and
    a named one must be among them."""
    choice, tools = data.tool_choice, msgspec.to_builtins(data.tools or [])
    if choice in ("required",) or isinstance(choice, NamedToolChoice):
        if not tools:
            raise APIError(400, "tool_choice forces a tool call but no tools are given", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in _names(tools):
        raise APIError(
            400,
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            "tool_choice",
            "tool_not_offered",
        )
    return tools or None if choice != "none" else None


def _names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def chat_grammar(
    data: ChatCompletionRequest, tools: list[dict] | None, tokenizer: Tokenizer
) -> tuple[Grammar, str] | None:
    """(the grammar the answer must follow, the parameter it comes from), or None: a forced tool call
    comes first, then response_format."""
    choice = data.tool_choice
    if tools and choice == "required":
        return _call_grammar(tools, data.parallel_tool_calls, tokenizer), "tools"
    if tools and isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t["function"]["name"] == choice.function.name]
        return _call_grammar(named, data.parallel_tool_calls, tokenizer), "tools"
    fmt = data.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.schema is not None:
        return Grammar.json_schema(fmt.json_schema.schema), "response_format"
    return Grammar.json_object(), "response_format"


def _call_grammar(tools: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
    """The forced-call grammar in the served family's format: V3.2's and V4's DSML, else V3.1's."""
    tag = CALLS_TAG.get(tokenizer.model_type)
    return dsml_calls.call_grammar(tools, parallel, tag) if tag else call_grammar(tools, parallel, tokenizer)


def calls_stream(tokenizer: Tokenizer) -> ToolCallStream | dsml_calls.DsmlCallStream:
    """A reader of the model's calls in the served family's format."""
    tag = CALLS_TAG.get(tokenizer.model_type)
    return dsml_calls.DsmlCallStream(tag) if tag else ToolCallStream()


def finish_reason(engine_reason: str, calls: bool) -> str:
    """OpenAI's finish_reason: "tool_calls" when the answer calls tools (and was not cut short)."""
    return "tool_calls" if calls and engine_reason != "length" else FINISH[engine_reason]


def reply(out, tools: list[dict] | None, tokenizer: Tokenizer) -> tuple[dict, str]:
    """(the assistant message, finish_reason) of a finished output."""
    if tools:
        content, calls = parse(tokenizer.decode(out.token_ids, keep_special=True), calls_stream(tokenizer))
        if calls:
            message = {"role": "assistant", "content": content or None, "tool_calls": calls}
            return message, finish_reason(out.finish_reason, True)
    return {"role": "assistant", "content": out.text}, FINISH[out.finish_reason]


class StreamedReply:
    """A streamed answer's deltas: plain text as the engine releases it, or, with tools, content and
    `tool_calls` deltas read from the output decoded with its tool-call markers."""

    def __init__(self, tools: list[dict] | None, tokenizer: Tokenizer):
        self.tools, self.tokenizer = tools, tokenizer
        self.token_ids: list[int] = []
        self.calls = calls_stream(tokenizer)

    def delta(self, event) -> dict:
        if not self.tools:
            return {"content": event.text} if event.text else {}
        self.token_ids += event.token_ids
        final = event.output is not None
        text = self.tokenizer.decode(self.token_ids, keep_special=True)
        content, calls = self.calls.update(text if final else text.rstrip("\ufffd"), final)
        return {**({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}

    def finish_reason(self, out) -> str:
        return finish_reason(out.finish_reason, bool(self.calls.calls))
