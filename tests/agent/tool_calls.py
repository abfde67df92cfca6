"""The tools, the question and the check of a forced tool call that the OpenAI tool-call tests share
(V3 in test_api_openai_extras, the DSML families in test_api_openai_dsml)."""

from __future__ import annotations

import json

from tests.schema_check import errors
from tests.servers import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
READ = {
    "type": "function",
    "function": {
        "name": "read_file",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string", "maxLength": 12}},
            "required": ["path"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_required_tool_calls(client, seeds: int, max_tokens: int) -> None:
    """With tool_choice "required", each seed's answer is one well-formed call of an offered tool whose
    arguments satisfy its schema."""
    for seed in range(seeds):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER, READ],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=max_tokens,
        )
        choice = answer.choices[0]
        assert (choice.finish_reason, len(choice.message.tool_calls or [])) == ("tool_calls", 1), choice
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        tool = {"get_weather": WEATHER, "read_file": READ}[call.function.name]
        assert errors(json.loads(call.function.arguments), tool["function"]["parameters"]) == []


def check_tool_result_is_read(client, call) -> int:
    """The assistant's `call` and a `role: tool` reply to it, sent back, are read into the prompt; returns
    the prompt tokens of the question alone."""
    history = [*ASK, call.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 21 C"})
    follow = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bare = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=1)
    assert follow.usage.prompt_tokens > bare.usage.prompt_tokens + 10  # the call and its result were read
    return bare.usage.prompt_tokens
