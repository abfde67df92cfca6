"""Tool calls in DeepSeek V3.1's format, both ways: the model's output parsed into OpenAI `tool_calls`
(whole, or as `delta.tool_calls` chunks while it streams; one parser for both, so they agree), and the
grammar that forces a call when `tool_choice` is "required" or names a function."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ds4.engine.chat_template import CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END
from ds4.engine.grammar import Grammar, embedded_json
from ds4.engine.tokenizer import Tokenizer


def held_back(text: str, marker: str) -> str:
    """`text` less a tail that could be the start of `marker` (the next token may complete it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return text[:-n]
    return text


@dataclass
class StreamedCall:
    """A call announced to the client: its id, and how much of its arguments was sent."""

    id: str
    name: str
    arguments_sent: int = 0
    complete: bool = False


@dataclass
class ToolCallStream:
    """Reads a growing output text (markers included) and says what is new: content text and tool-call
    deltas in OpenAI's chunk shape. Content stops at <｜tool▁calls▁begin｜>; each call's name is sent once
    whole, its arguments as they arrive."""

    content_sent: int = 0
    calls: list[StreamedCall] = field(default_factory=list)

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        head, begun, rest = text.partition(CALLS_BEGIN)
        if not begun:
            content = head if final else held_back(head, CALLS_BEGIN)
            return self._content(content), []
        deltas = [
            d for i, piece in enumerate(rest.split(CALL_BEGIN)[1:]) for d in self._call(i, piece, final)
        ]
        if final and not self.calls:  # the calls never took shape: what the model wrote is the answer
            return self._content(text), []
        return self._content(head), deltas

    def _content(self, content: str) -> str:
        delta = content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(content))
        return delta

    def _call(self, index: int, piece: str, final: bool) -> list[dict]:
        name, named, arguments = piece.partition(CALL_SEP)
        if not named or index > len(self.calls):
            return []
        arguments, ended, _ = arguments.partition(CALL_END)
        if not ended and not final:
            arguments = held_back(held_back(arguments, CALL_END), CALLS_END)
        deltas = []
        if index == len(self.calls):
            self.calls.append(StreamedCall(f"call_{uuid.uuid4().hex[:24]}", name))
            function = {"name": name, "arguments": ""}
            deltas.append(
                {"index": index, "id": self.calls[index].id, "type": "function", "function": function}
            )
        call = self.calls[index]
        call.complete = bool(ended)
        if len(arguments) > call.arguments_sent:
            deltas.append({"index": index, "function": {"arguments": arguments[call.arguments_sent :]}})
            call.arguments_sent = len(arguments)
        return deltas


def parse(text: str, stream=None) -> tuple[str, list[dict]]:
    """(content, OpenAI tool_calls) of a whole output, read by `stream` (a fresh ToolCallStream or
    DsmlCallStream; V3.1's by default); arguments are passed on as the model wrote them, valid JSON or
    not, as OpenAI does."""
    stream = stream or ToolCallStream()
    content, deltas = stream.update(text, final=True)
    return content, merge(deltas)


def merge(deltas: list[dict]) -> list[dict]:
    """Streamed `delta.tool_calls` entries reassembled into whole calls, as a client does."""
    calls: list[dict] = []
    for d in deltas:
        if d["index"] == len(calls):
            calls.append({"id": d["id"], "type": "function", "function": {"name": "", "arguments": ""}})
        function = calls[d["index"]]["function"]
        function["name"] += d["function"].get("name", "")
        function["arguments"] += d["function"].get("arguments", "")
    return calls


MAX_PARALLEL_CALLS = 16  # a forced answer's calls: a model that will not stop calling is cut off here


def _marker(tokenizer: Tokenizer, marker: str) -> str:
    """A marker in llguidance's Lark: its control token by id, or its text where the tokenizer lacks it."""
    token_id = tokenizer.token_id(marker)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(marker, ensure_ascii=False)


def call_grammar(tools: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
    """A grammar whose every sentence is a well-formed call (one, or several when `parallel`) of one of
    `tools`, with arguments valid under that tool's parameter schema."""
    begin, end, sep = (_marker(tokenizer, m) for m in (CALL_BEGIN, CALL_END, CALL_SEP))
    rules = []
    for i, tool in enumerate(tools):
        f = tool["function"]
        arguments = embedded_json(f.get("parameters") or {"type": "object"})
        rules.append(f"call_{i}: {begin} {json.dumps(f['name'])} {sep} {arguments} {end}")
    calls = f"call{{1,{MAX_PARALLEL_CALLS}}}" if parallel else "call"
    head = f"start: {_marker(tokenizer, CALLS_BEGIN)} {calls} {_marker(tokenizer, CALLS_END)}"
    choice = "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))
    return Grammar.lark("\n".join([head, choice, *rules]))
