"""Tool calls through a real server for the DSML families (V3.2 and V4 tiny checkpoints) and the official
openai client: a forced call is well-formed with schema-valid arguments, streamed deltas reassemble to
the whole call, and a `role: tool` reply is read back into the prompt."""

from __future__ import annotations

import json

import openai
import pytest

from tests.agent.tool_calls import ASK, READ, WEATHER, check_required_tool_calls, check_tool_result_is_read
from tests.schema_check import errors
from tests.servers import KEY, MODEL, serving

MAX_TOKENS = 600  # a call is ~200 tokens of the tiny tokenizers' DSML markup, plus its values


@pytest.fixture(scope="module", params=["tiny_v32", "tiny_v4"])
def client(request, tmp_path_factory):
    checkpoint = request.getfixturevalue(request.param)
    log = tmp_path_factory.mktemp(f"serve-{request.param}") / "serve.log"
    with serving(checkpoint, log, "--api-key", KEY, "--served-name", MODEL) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_a_required_tool_choice_yields_a_well_formed_call(client):
    check_required_tool_calls(client, seeds=4, max_tokens=MAX_TOKENS)


def test_a_named_tool_streams_as_deltas_that_reassemble_to_the_same_call(client):
    kwargs = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, READ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=MAX_TOKENS,
        parallel_tool_calls=False,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    first = whole.message.tool_calls[0]
    assert first.function.name == "get_weather"
    assert errors(json.loads(first.function.arguments), WEATHER["function"]["parameters"]) == []
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    assert list(calls.values()) == [{"name": "get_weather", "arguments": first.function.arguments}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert sum(1 for c in chunks for d in c.choices[0].delta.tool_calls or [] if d.id) == 1


def test_a_tool_result_round_trips(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # a random model asked for many calls makes them until max_tokens
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    check_tool_result_is_read(client, answer.choices[0].message)
