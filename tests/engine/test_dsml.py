"""V3.2's and V4's chat templates with DSML tool calls: a conversation with tools, a call and its results
laid out as the official encodings write it (tests/golden/chat/, checked against DeepSeek's
encoding_dsv32.py and encoding_dsv4.py by eye; DS4_UPDATE_GOLDEN=1 rewrites), and V3's unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ds4.engine import RequestError
from ds4.engine.tokenizer import Tokenizer

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "chat"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
            "strict": None,
        },
    }
]
CALLS = [
    {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}},
    {"id": "c2", "type": "function", "function": {"name": "ls", "arguments": '{"depth": 2, "all": true}'}},
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is in a.py?"},
    {"role": "assistant", "content": "Looking.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "c1", "content": "x = 1"},
    {"role": "tool", "tool_call_id": "c2", "content": "a.py b.py"},
]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DS4_UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: if on purpose, DS4_UPDATE_GOLDEN=1"


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v32", "deepseek_v4"])
def tokenizer(request, tiny_v3):
    return Tokenizer(tiny_v3, bos_token_id=0, model_type=request.param)


@pytest.fixture(scope="module", params=["deepseek_v32", "deepseek_v4"])
def dsml_tokenizer(request, tiny_v3):
    return Tokenizer(tiny_v3, bos_token_id=0, model_type=request.param)


def test_a_conversation_with_tools_renders_as_the_familys_template(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS)
    check_golden(f"{tokenizer.model_type}.txt", text)
    assert tokenizer.decode(tokenizer.encode_chat(CONVERSATION, TOOLS), keep_special=True) == text


def test_dsml_turns_around_a_call_and_its_results(tokenizer):
    """The parts a model reads most: V3.2 keeps the results in the assistant's turn and reopens the
    reply with "</think>"; V4 gives them back as a user turn of <tool_result> blocks."""
    text = tokenizer.apply_chat_template(CONVERSATION[1:])
    calls = (
        "Looking.\n\n<｜DSML｜{tag}>\n"
        '<｜DSML｜invoke name="read_file">\n'
        '<｜DSML｜parameter name="path" string="true">a.py</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="ls">\n'
        '<｜DSML｜parameter name="depth" string="false">2</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="all" string="false">true</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜{tag}><｜end▁of▁sentence｜>"
    )
    expected = {
        "deepseek_v3": "<｜begin▁of▁sentence｜><｜User｜>What is in a.py?<｜Assistant｜>Looking."
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>read_file<｜tool▁sep｜>{"path": "a.py"}'
        '<｜tool▁call▁end｜><｜tool▁call▁begin｜>ls<｜tool▁sep｜>{"depth": 2, "all": true}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
        "<｜end▁of▁sentence｜><｜tool▁output▁begin｜>x = 1<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>a.py b.py<｜tool▁output▁end｜><｜Assistant｜>",
        "deepseek_v32": "<｜begin▁of▁sentence｜><｜User｜>What is in a.py?<｜Assistant｜></think>"
        + calls.format(tag="function_calls")
        + "\n\n<function_results>\n<result>x = 1</result>\n<result>a.py b.py</result>\n</function_results>"
        "\n\n</think>",
        "deepseek_v4": "<｜begin▁of▁sentence｜><｜User｜>What is in a.py?<｜Assistant｜></think>"
        + calls.format(tag="tool_calls")
        + "<｜User｜><tool_result>x = 1</tool_result>\n\n<tool_result>a.py b.py</tool_result>"
        "<｜Assistant｜></think>",
    }
    assert text == expected[tokenizer.model_type]


def test_tools_without_a_system_message_open_the_prompt(dsml_tokenizer):
    text = dsml_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS)
    assert text.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n\nYou have access to a set of tools")
    assert '{"name": "read_file", "description": "Read a file", "parameters": ' in text  # no "strict": null
    assert text.endswith("<｜User｜>hi<｜Assistant｜></think>")


def test_plain_chat_opens_the_reply_with_an_empty_thought(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    opening = "<｜Assistant｜>" if tokenizer.model_type == "deepseek_v3" else "<｜Assistant｜></think>"
    assert text == f"<｜begin▁of▁sentence｜><｜User｜>hi{opening}yo<｜end▁of▁sentence｜>{opening}"


@pytest.mark.parametrize("arguments", ["[1]", "{", None])
def test_a_call_whose_arguments_are_not_an_object_is_a_request_error(dsml_tokenizer, arguments):
    """DSML spells arguments out parameter by parameter: they must be a JSON object (V3.1 passes the
    text through as it is)."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(RequestError, match="arguments"):
        dsml_tokenizer.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": [call]}])
