"""The request bodies of the OpenAI-compatible routes, as msgspec structs: their limits are the ones the
engine enforces, so the published OpenAPI schema tells clients the truth."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec


class ContentPart(msgspec.Struct):
    type: Literal["text"]  # the only kind a text model reads
    text: str


FunctionName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
JSONSchema = Annotated[dict[str, Any], msgspec.Meta(description="a JSON Schema")]


class CalledFunction(msgspec.Struct):
    name: FunctionName
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct):
    id: Annotated[str, msgspec.Meta(max_length=256)]
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # what a tool result answers


class FunctionDefinition(msgspec.Struct):
    name: FunctionName
    description: str | None = None
    parameters: JSONSchema | None = None  # the arguments' schema (default: any object)
    strict: bool | None = None  # arguments are always held to the schema when a call is forced


class Tool(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionChoice(msgspec.Struct):
    name: FunctionName


class NamedToolChoice(msgspec.Struct):
    type: Literal["function"]
    function: FunctionChoice


class JSONSchemaFormat(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
    schema: JSONSchema | None = None
    description: str | None = None
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(msgspec.Struct):
    """text (free), json_object (any JSON object) or json_schema (JSON valid under the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None  # required with type json_schema


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


MAX_TOKENS = 1 << 24  # past any model's context: a bound on the integer, the context bounds the rest
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1, description="a 64-bit seed for the sampler")]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Name = Annotated[str, msgspec.Meta(max_length=256)]


class Sampling(msgspec.Struct, kw_only=True):
    """The limits the sampler enforces are declared here too, so the schema tells clients the truth."""

    model: Name | None = None
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)] = 0
    min_p: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    seed: Seed | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], msgspec.Meta(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1


TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20, description="alternatives reported per token")]


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None  # read only with logprobs=true
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default auto
    parallel_tool_calls: bool = True


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(min_length=1)]
    suffix: str | None = None
    echo: bool = False
    logprobs: TopLogprobs | None = None  # each token's log-probability and this many alternatives
