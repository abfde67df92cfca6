"""DeepSeek V3.2's and V4's chat templates (chat mode, no thinking) with their DSML tool calls: tools
described in the system text, an assistant's calls as <｜DSML｜{tag}> blocks of invoke/parameter tags,
tool results as V3.2's <function_results> or V4's <tool_result> blocks. Pieces only: tokens are the
tokenizer's, and reading the model's calls back is agent/api/dsml_calls.py's."""

from __future__ import annotations

import json

from ds4.engine.chat_template import ASSISTANT, BOS, EOS, USER, merged, role_and_content
from ds4.engine.errors import RequestError

DSML = "｜DSML｜"
THINK_END = "</think>"  # chat mode: the reply opens with an empty thought
# the outer tag of a call block, by model_type: V3.2 writes function_calls, V4 tool_calls
CALLS_TAG = {"deepseek_v32": "function_calls", "deepseek_v4": "tool_calls"}
INVOKE_OPEN, INVOKE_CLOSE = f'<{DSML}invoke name="', f"</{DSML}invoke>"
PARAM_OPEN, PARAM_CLOSE = f'<{DSML}parameter name="', f"</{DSML}parameter>"

V32_TOOLS_PROMPT = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}{tag}>" block like the following as part of your reply to the user:
<{dsml}{tag}>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}{tag}>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}{tag}>
...
</{dsml}{tag}>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""  # noqa: E501
V4_TOOLS_PROMPT = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}{tag}>" block like the following:

<{dsml}{tag}>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}{tag}>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501


def chat_parts(
    messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None, model_type: str
) -> list[tuple[str, bool]]:
    """The chat prompt as (text, is it a template marker) pieces. The tools' section follows the first
    system message (an empty one when there is none). An assistant turn opens with <｜Assistant｜></think>
    unless the turn before opened it (V3.2's tool results end in "\\n\\n</think>" alone)."""
    tag = CALLS_TAG[model_type]
    turns = [(*role_and_content(i, m), m) for i, m in enumerate(messages)]
    parts: list[tuple[str, bool]] = [(BOS, True)]
    if tools and (not turns or turns[0][0] != "system"):
        parts.append(("\n\n" + tools_text(tools, model_type), False))
    opened = False  # the previous turn ended with the assistant's opening
    for k, (role, content, message) in enumerate(turns):
        previous = turns[k - 1][0] if k else None
        following = turns[k + 1][0] if k + 1 < len(turns) else None
        if role == "system":
            parts.append((content, False))
            if tools and k == 0:
                parts.append(("\n\n" + tools_text(tools, model_type), False))
        elif role == "assistant":
            parts += [] if opened else _opening()
            parts += [(content, False), *calls_parts(message.get("tool_calls"), tag), (EOS, True)]
        elif model_type == "deepseek_v4":
            parts += _v4_user_parts(role, content, previous)
            if following == "assistant" or following is None and add_generation_prompt:
                parts += _opening()
        else:
            parts += _v32_user_parts(role, content, previous, following)
        is_v4_unopened = model_type == "deepseek_v4" and following not in ("assistant", None)
        opened = role in ("user", "tool") and not is_v4_unopened
    if add_generation_prompt and not opened:
        parts += _opening()
    return merged(parts)


def _opening() -> list[tuple[str, bool]]:
    return [(ASSISTANT, True), (THINK_END, True)]


def _v32_user_parts(role: str, content: str, previous: str | None, following: str | None) -> list:
    """A V3.2 user turn opens the reply itself; a run of tool results is one <function_results> block
    after the calls' end of sentence, and its closing </think> opens the reply."""
    if role == "user":
        return [(USER, True), (content, False), *_opening()]
    opening = "\n\n<function_results>" if previous != "tool" else ""
    parts = [(opening + "\n<result>", True)]
    parts += [(content, False), ("</result>", True)]
    if following != "tool":
        parts += [("\n</function_results>\n\n", True), (THINK_END, True)]
    return parts


def _v4_user_parts(role: str, content: str, previous: str | None) -> list:
    """V4 joins a run of tool results and user messages into one user turn, "\\n\\n" between them."""
    head = [(USER, True)] if previous not in ("user", "tool") else [("\n\n", True)]
    if role == "user":
        return [*head, (content, False)]
    return [*head, ("<tool_result>", True), (content, False), ("</tool_result>", True)]


def calls_parts(calls: list[dict] | None, tag: str) -> list[tuple[str, bool]]:
    """An assistant's calls after its content: "\\n\\n<｜DSML｜{tag}>\\n", the invokes one a line, each
    with its parameters one a line (string="true" for strings, JSON otherwise), "\\n</｜DSML｜{tag}>"."""
    if not calls:
        return []
    parts = [(f"\n\n<{DSML}{tag}>\n", True)]
    for k, call in enumerate(calls):
        name, arguments = _name_and_arguments(call)
        parts += [(("\n" if k else "") + INVOKE_OPEN, True), (name, False), ('">\n', True)]
        for j, (key, value) in enumerate(arguments.items()):
            is_string = isinstance(value, str)
            text = value if is_string else json.dumps(value, ensure_ascii=False)
            parts += [(("\n" if j else "") + PARAM_OPEN, True), (key, False)]
            parts += [(f'" string="{"true" if is_string else "false"}">', True), (text, False)]
            parts.append((PARAM_CLOSE, True))
        parts.append(("\n" + INVOKE_CLOSE, True))
    return [*parts, (f"\n</{DSML}{tag}>", True)]


def _name_and_arguments(call: dict) -> tuple[str, dict]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise RequestError(
            f"a tool call needs a function name and its arguments as the text of a JSON object, got {call!r}"
        )
    return name, arguments


def tools_text(tools: list[dict], model_type: str) -> str:
    """The system text's tool section: the call format, then each function as one line of JSON."""
    tag = CALLS_TAG[model_type]
    functions = [{k: v for k, v in (t.get("function") or {}).items() if v is not None} for t in tools]
    template = V4_TOOLS_PROMPT if model_type == "deepseek_v4" else V32_TOOLS_PROMPT
    return template.format(
        dsml=DSML,
        tag=tag,
        schemas="\n".join(json.dumps(f, ensure_ascii=False) for f in functions),
    )
