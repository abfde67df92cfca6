"""A real agent framework drives ds4: the openai Agents SDK (PyPI `openai-agents`), pointed at ds4's
server as its OpenAI chat-completions endpoint, runs its loop over a function tool, plain and streamed.
A random tiny model cannot choose tools, so the tool is forced (`tool_choice` naming it): the SDK must
receive a well-formed call, parse its arguments, run the tool and finish its run with the tool's output."""

from __future__ import annotations

from typing import Annotated

import agents  # openai-agents, a dev dependency
import pytest
from pydantic import Field

from tests.servers import KEY, MODEL, serving


@pytest.fixture(scope="module")
def base(tiny_v3, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-agents") / "serve.log"
    with serving(tiny_v3, log, "--api-key", KEY, "--served-name", MODEL) as url:
        yield url


def _agent(base: str, calls: list):
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # the SDK would export traces to OpenAI's servers

    @agents.function_tool
    def get_weather(city: Annotated[str, Field(max_length=12)], celsius: bool) -> str:
        """The weather in a city now.

        Args:
            city: the city's name.
            celsius: degrees Celsius (else Fahrenheit).
        """
        calls.append((city, celsius))
        return f"sunny in {city}"

    model = agents.OpenAIChatCompletionsModel(
        model=MODEL, openai_client=AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    )
    return agents.Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        model=model,
        tools=[get_weather],
        model_settings=agents.ModelSettings(
            tool_choice="get_weather",
            parallel_tool_calls=False,
            max_tokens=512,  # the tiny tokenizer spells DeepSeek's call markers out, byte by byte
            temperature=1.0,
        ),
        tool_use_behavior="stop_on_first_tool",  # the tool's output is the run's answer
    )


def test_the_agents_sdk_runs_a_forced_tool_through_ds4(base):
    calls = []
    result = agents.Runner.run_sync(_agent(base, calls), "What is the weather in Paris?")
    assert len(calls) == 1
    city, celsius = calls[0]
    assert isinstance(city, str) and len(city) <= 12 and isinstance(celsius, bool)
    assert result.final_output == f"sunny in {city}"


def test_the_agents_sdk_streams_a_forced_tool_call_from_ds4(base):
    import asyncio

    calls = []

    async def run():
        streamed = agents.Runner.run_streamed(_agent(base, calls), "And in Oslo?")
        kinds = [event.type async for event in streamed.stream_events()]
        return streamed, kinds

    streamed, kinds = asyncio.run(run())
    assert len(calls) == 1
    assert "raw_response_event" in kinds  # the answer arrived chunk by chunk
    assert streamed.final_output == f"sunny in {calls[0][0]}"
