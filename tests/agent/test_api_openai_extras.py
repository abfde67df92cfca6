"""What agents drive beyond plain text, through a real uvicorn server and the official openai client:
log-probabilities (chat and completions, streamed and not), structured output (`response_format`) and
tool calls (`tools`, `tool_choice`, streamed `delta.tool_calls`, `role: tool` replies)."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch

from ds4.engine import LLM, SamplingParams
from tests.agent.tool_calls import ASK, READ, WEATHER, check_required_tool_calls, check_tool_result_is_read
from tests.schema_check import errors
from tests.servers import KEY, MODEL, serving


@pytest.fixture(scope="module")
def server(tiny_v3, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-extras") / "serve.log"
    with serving(tiny_v3, log, "--api-key", KEY, "--served-name", MODEL) as base:
        yield base


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(tiny_v3):
    return LLM(tiny_v3)


def _scored(llm: LLM, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The model's log-probabilities [len(generated), V] at each generated position, teacher-forced."""
    logits = llm.score(prompt + generated)
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def test_completion_logprobs_match_the_models_scores(client, llm):
    prompt = llm.tokenizer.encode("def quicksort(xs):")
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6))[0].token_ids
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(expected)
    scored = _scored(llm, prompt, expected)
    for i, token in enumerate(expected):
        assert lp.tokens[i] == llm.tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        assert math.isclose(lp.token_logprobs[i], scored[i, token].item(), abs_tol=1e-4)
        assert (
            len(lp.top_logprobs[i]) <= 3 and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i] - 1e-6
        )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, stream=True
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [x for p in parts for x in p.token_logprobs] == lp.token_logprobs
    assert [x for p in parts for x in p.text_offset] == lp.text_offset


def test_echoed_prompt_tokens_come_first_with_null_logprobs(client):
    echoed = client.completions.create(
        model=MODEL, prompt="import os", max_tokens=3, temperature=0, logprobs=1, echo=True
    )
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.token_logprobs[-1] is not None
    assert "".join(lp.tokens).startswith("import os")
    assert lp.text_offset[len(lp.tokens) - 3] == len("import os")


def test_chat_logprobs_have_openais_shape_and_the_models_values(client, llm):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    prompt = llm.tokenizer.encode_chat(messages)
    expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5))[0].token_ids
    scored = _scored(llm, prompt, expected)
    for i, (entry, token) in enumerate(zip(content, expected, strict=True)):
        assert bytes(entry.bytes) == llm.tokenizer.token_bytes(token)
        assert math.isclose(entry.logprob, scored[i, token].item(), abs_tol=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isclose(entry.top_logprobs[0].logprob, scored[i].max().item(), abs_tol=1e-4)  # greedy
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    pieces = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "severity": {"enum": ["low", "high"]},
        "line": {"type": "integer", "minimum": 1, "maximum": 9999},
    },
    "required": ["title", "severity", "line"],
    "additionalProperties": False,
}


def test_strict_json_schema_answers_parse_and_conform(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "issue", "schema": SCHEMA, "strict": True}}
    for seed in range(12):
        answer = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=200, response_format=fmt
        )
        assert answer.choices[0].finish_reason == "stop"
        value = json.loads(answer.choices[0].message.content)
        assert errors(value, SCHEMA) == []
    anything = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=300, response_format={"type": "json_object"}
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_a_required_tool_choice_yields_a_well_formed_call(client):
    check_required_tool_calls(client, seeds=6, max_tokens=200)


def test_a_named_tool_streams_as_deltas_that_reassemble_to_the_same_call(client):
    named = {"type": "function", "function": {"name": "read_file"}}
    kwargs = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, READ],
        tool_choice=named,
        temperature=0,
        max_tokens=200,
        parallel_tool_calls=False,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls[0].function.name == "read_file"
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    first = whole.message.tool_calls[0]
    assert list(calls.values())[0] | {"id": first.id} == {
        "id": first.id,
        "name": first.function.name,
        "arguments": first.function.arguments,
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert sum(1 for c in chunks for d in c.choices[0].delta.tool_calls or [] if d.id) == 1


def test_a_tool_result_round_trips(client):
    call = (
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=200
        )
        .choices[0]
        .message
    )
    bare = check_tool_result_is_read(client, call)
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1
    )
    assert none.usage.prompt_tokens < bare  # "none": the tools are not offered


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            None,
        ),
    ],
)
def test_impossible_constraints_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    body = caught.value.body
    assert body["param"] == (param or "response_format") and body["message"]
