"""Tool calls in DeepSeek V3.2's and V4's DSML, both ways: the model's <｜DSML｜{tag}> block read into
OpenAI `tool_calls` (whole, or as `delta.tool_calls` while it streams; one reader for both, so they
agree), and the grammar that forces a call. The prompt side is engine/dsml.py's."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ds4.agent.api.tool_calls import MAX_PARALLEL_CALLS, StreamedCall, held_back
from ds4.engine.dsml import DSML, INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN
from ds4.engine.grammar import Grammar, embedded_json

NAME_END = '">'
FLAG = '" string="'
PARAM_END, INVOKE_END = PARAM_CLOSE + "\n", INVOKE_CLOSE + "\n"  # as the template lays them out


@dataclass
class _Scanned:
    name: str
    arguments: str  # the JSON object text so far
    ended: bool


@dataclass
class DsmlCallStream:
    """Reads a growing output text and says what is new: content text and tool-call deltas in OpenAI's
    chunk shape. Content stops at the "\\n\\n" before <｜DSML｜{tag}>; each invoke is a call whose name is
    sent once whole and whose arguments, a JSON object built from its parameters, as they arrive: a
    string="true" value as a JSON string, char by char; a string="false" value whole once closed, as
    the model wrote it when it is not JSON (OpenAI passes malformed arguments on too)."""

    tag: str
    content_sent: int = 0
    calls: list[StreamedCall] = field(default_factory=list)

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        opening = f"<{DSML}{self.tag}>"
        head, begun, rest = text.partition(opening)
        if not begun:
            content = head if final else held_back(held_back(head, "\n\n" + opening), opening)
            return self._content(content), []
        deltas = [d for i, call in enumerate(_scan(rest, final)) for d in self._call(i, call)]
        if final and not self.calls:  # the calls never took shape: what the model wrote is the answer
            return self._content(text), []
        return self._content(head.removesuffix("\n\n")), deltas

    def _content(self, content: str) -> str:
        delta = content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(content))
        return delta

    def _call(self, index: int, scanned: _Scanned) -> list[dict]:
        deltas = []
        if index == len(self.calls):
            self.calls.append(StreamedCall(f"call_{uuid.uuid4().hex[:24]}", scanned.name))
            function = {"name": scanned.name, "arguments": ""}
            deltas.append(
                {"index": index, "id": self.calls[index].id, "type": "function", "function": function}
            )
        call = self.calls[index]
        call.complete = scanned.ended
        if len(scanned.arguments) > call.arguments_sent:
            new = scanned.arguments[call.arguments_sent :]
            deltas.append({"index": index, "function": {"arguments": new}})
            call.arguments_sent = len(scanned.arguments)
        return deltas


def _scan(block: str, final: bool) -> list[_Scanned]:
    """The invokes of a call block so far, in order; one whose name is not yet whole is left out."""
    calls, at = [], 0
    while (start := block.find(INVOKE_OPEN, at)) >= 0:
        name_end = block.find(NAME_END, start + len(INVOKE_OPEN))
        if name_end < 0:
            break
        arguments, ended, at = _arguments(block, name_end + len(NAME_END), final)
        calls.append(_Scanned(block[start + len(INVOKE_OPEN) : name_end], arguments, ended))
        if not ended:
            break
    return calls


def _arguments(block: str, at: int, final: bool) -> tuple[str, bool, int]:
    """(the JSON object text of the parameters from `at`, did </｜DSML｜invoke> end them, where reading
    stopped). Every text it gives for a longer block extends the one for a shorter: streamed deltas
    reassemble to the whole parse."""
    members = []
    while True:
        close, param = block.find(INVOKE_CLOSE, at), block.find(PARAM_OPEN, at)
        if close >= 0 and (param < 0 or close < param):
            return "{" + ", ".join(members) + "}", True, close + len(INVOKE_CLOSE)
        header_end = block.find(NAME_END, param + len(PARAM_OPEN)) if param >= 0 else -1
        if header_end < 0:  # no further parameter yet
            return "{" + ", ".join(members), False, len(block)
        name, _, flag = block[param + len(PARAM_OPEN) : header_end].partition(FLAG)
        key = json.dumps(name, ensure_ascii=False) + ": "
        value_at = header_end + len(NAME_END)
        value_end = block.find(PARAM_CLOSE, value_at)
        if value_end < 0:  # the value is still arriving, or was cut short
            value = block[value_at:] if final else held_back(block[value_at:], PARAM_CLOSE)
            if flag == "true":
                members.append(key + json.dumps(value, ensure_ascii=False)[:-1])
            elif final:
                members.append(key + value)
            return "{" + ", ".join(members), False, len(block)
        value = block[value_at:value_end]
        members.append(key + (json.dumps(value, ensure_ascii=False) if flag == "true" else _json(value)))
        at = value_end + len(PARAM_CLOSE)


def _json(value: str) -> str:
    """A string="false" value as compact JSON, or as written when it is not JSON."""
    try:
        return json.dumps(json.loads(value), ensure_ascii=False)
    except json.JSONDecodeError:
        return value


# Schema keys a raw string="true" value can honour: lengths are counted in characters of the raw text.
RAW_STRING_KEYS = {"type", "minLength", "maxLength", "description", "title", "default", "examples"}


def call_grammar(tools: list[dict], parallel: bool, tag: str) -> Grammar:
    """A grammar whose every sentence is a DSML call block (one invoke, or up to MAX_PARALLEL_CALLS when
    `parallel`) of `tools`, laid out as the template writes one. Enforced: the tool names; every
    declared parameter at most once, in the schema's order, each required one present, no undeclared
    ones; a plain string parameter (only type and length bounds) as a raw string="true" value of those
    lengths (in characters) that cannot contain </｜DSML｜parameter>; a string-only enum or const as one
    of its values, raw; every other parameter as string="false" JSON valid under its own schema
    (llguidance's %json; so a string with a pattern or format is a quoted JSON string there, valid
    once parsed as the string="false" value it is flagged as).
    Not enforced: object-level keywords beyond properties/required (minProperties, dependencies,
    patternProperties, an additionalProperties schema: undeclared parameters are never offered)."""
    rules = []
    for i, tool in enumerate(tools):
        f = tool["function"]
        params = _param_rules(i, f.get("parameters") or {"type": "object"}, rules)
        head = _lit(f"{INVOKE_OPEN}{f['name']}{NAME_END}\n")
        rules.append(f"call_{i}: {head} {params} {_lit(INVOKE_END)}")
    calls = f"call{{1,{MAX_PARALLEL_CALLS}}}" if parallel else "call"
    # each literal ends where no other can go on: llguidance's lexer takes the longest match, so a
    # separator "\n" before "\n</｜DSML｜{tag}>" could never end
    opening, closing = _lit("\n\n<" + DSML + tag + ">\n"), _lit("</" + DSML + tag + ">")
    start = f"start: {opening} {calls} {closing}"
    choice = "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))
    return Grammar.lark("\n".join([start, choice, *rules]))


def _param_rules(i: int, schema: dict, rules: list[str]) -> str:
    """The parameters of tool `i` as a sequence of (optional) rules, appended to `rules`."""
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    names = [*properties, *(n for n in required if n not in properties)]
    if not names:
        return _lit("\n")  # the template's empty invoke: a blank line
    sequence = []
    for j, name in enumerate(names):
        value_schema = properties.get(name, {})
        choices = _string_choices(value_schema)
        if value_schema.get("type") == "string" and set(value_schema) <= RAW_STRING_KEYS:
            low, high = value_schema.get("minLength", 0), value_schema.get("maxLength", "")
            rules.append(f"v_{i}_{j}[lazy]: /(?s:.{{{low},{high}}})/ {_lit(PARAM_END)}")
            flag, value = "true", f"v_{i}_{j}"
        elif choices:
            flag, value = "true", "(" + " | ".join(_lit(c + PARAM_END) for c in choices) + ")"
        else:
            flag, value = "false", f"{embedded_json(value_schema)} {_lit(PARAM_END)}"
        header = _lit(PARAM_OPEN + name + FLAG + flag + NAME_END)
        rules.append(f"p_{i}_{j}: {header} {value}")
        sequence.append(f"p_{i}_{j}" + ("" if name in required else "?"))
    return " ".join(sequence)


def _string_choices(schema: dict) -> list[str]:
    """The values of a string-only `enum` or `const` (written raw, string="true"), else []."""
    choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else []
    if not all(isinstance(c, str) and PARAM_CLOSE not in c for c in choices):
        return []
    return choices


def _lit(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)
