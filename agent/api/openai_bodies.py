"""The request bodies of the OpenAI-compatible routes, as msgspec structs: their limits are the ones the
engine enforces, so the published OpenAPI schema tells clients the truth."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class ContentPart(msgspec.Struct):
    type: Literal["text"]  # the only kind a text model reads
    text: str


class ChatMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


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


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(min_length=1)]
    suffix: str | None = None
    echo: bool = False
    logprobs: TopLogprobs | None = None  # each token's log-probability and this many alternatives
