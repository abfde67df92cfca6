"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (with `suffix` for
fill-in-the-middle), streamed as SSE `data:` chunks ending in `data: [DONE]`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import anyio
import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent

from ds4.agent.api.errors import APIError, responses, strict_body
from ds4.agent.api.openai_bodies import ChatCompletionRequest, CompletionRequest, Sampling
from ds4.agent.api.openai_chat import FINISH, StreamedReply, chat_grammar, chat_messages, offered_tools, reply
from ds4.agent.api.openai_logprobs import CompletionLogprobs, chat_logprobs
from ds4.agent.api.proxied import ProxiedModel
from ds4.agent.api.served import ServedModel
from ds4.engine.errors import EngineStopped, ParamError, RequestError
from ds4.engine.grammar import Grammar
from ds4.engine.sampler import SamplingParams


class EventStream(ServerSentEvent):
    """SSE whatever the route's declared media type: litestar 2 lets a handler's JSON default override
    a streamed response's own `text/event-stream`, and the completion routes answer both ways."""

    def to_asgi_response(self, *args, media_type=None, **kwargs):
        return super().to_asgi_response(*args, media_type=None, **kwargs)


def _model(request: Request) -> ServedModel | ProxiedModel:
    return request.app.state.model


def _check_model(served: ServedModel, asked: str | None) -> None:
    if asked is not None and asked != served.name:
        raise APIError(
            404,
            f"the model {asked!r} does not exist; this server serves {served.name!r}",
            "model",
            "model_not_found",
        )


T = TypeVar("T", ChatCompletionRequest, CompletionRequest)


def _generation_route(path: str, summary: str):
    """A generation endpoint's POST route: 200 when it answers, and every error a generation can meet."""
    errors = responses(400, 401, 404, 413, 415, 429, 500, 502, 503, 504)
    return post(path, summary=summary, status_code=200, responses=errors)


async def _generation_request(request: Request, kind: type[T]) -> tuple[T, ServedModel | ProxiedModel]:
    """The body decoded strictly as `kind`, and the served model, which must be the one the body names."""
    data = await strict_body(request, kind)
    served = _model(request)
    _check_model(served, data.model)
    return data, served


def _sampling(
    body: Sampling,
    max_tokens: int | None,
    prompt_len: int,
    served: ServedModel,
    logprobs: int | None = None,
    grammar: Grammar | None = None,
) -> SamplingParams:
    if body.n != 1:
        raise APIError(400, "n must be 1: ask several times for several samples", "n", "unsupported_value")
    room = served.max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {served.max_model_len}",
            "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            "context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            max_tokens=min(max_tokens, room) if max_tokens is not None else min(room, 4096),
            seed=body.seed,
            logprobs=logprobs,
            grammar=grammar,
            stop=stop,
        )
    except ParamError as e:
        param = e.param if e.param in msgspec.structs.asdict(body) else None  # a field of this body only
        raise APIError(400, str(e), param, "invalid_value") from None


async def _check_grammar(served: ServedModel, grammar: Grammar, param: str) -> None:
    """A 400 naming the problem unless the grammar compiles (in a worker thread: big schemas take time)."""
    try:
        await anyio.to_thread.run_sync(served.llm.engine.grammars.check, grammar)
    except RequestError as e:
        raise APIError(400, str(e), param, "invalid_value") from None


def _submit(served: ServedModel, ids: list[int], params: SamplingParams):
    try:
        return served.loop.submit(ids, params)
    except EngineStopped as e:
        raise APIError(503, str(e), None, "engine_stopped") from None
    except RequestError as e:
        raise APIError(400, str(e), None, "context_length_exceeded") from None


def _check_size(served: ServedModel, texts: list[str], param: str) -> None:
    """Refuses, without tokenising it, a text too long for the context whatever its tokens: tokenising
    megabytes takes seconds of a worker thread."""
    num_chars = sum(map(len, texts))
    max_chars = served.max_model_len * served.tokenizer.max_token_chars
    if num_chars > max_chars:
        raise APIError(
            400,
            f"the prompt has {num_chars} characters, more than this model's context of "
            f"{served.max_model_len} tokens can hold (at most {max_chars})",
            param,
            "context_length_exceeded",
        )


async def _tokenized(served: ServedModel, texts: list[str], param: str, encode, *args) -> list[int]:
    """encode(*args), after the size check, in a worker thread: the event loop keeps answering."""
    _check_size(served, texts, param)
    try:
        return await anyio.to_thread.run_sync(encode, *args)
    except RequestError as e:
        raise APIError(400, str(e), param, "invalid_value") from None


def _emitted(out) -> list[dict]:
    """The log-probabilities of the output's tokens (a stop token's own is not reported)."""
    return (out.logprobs or [])[: len(out.token_ids)]


def _joined(head: dict | None, tail: dict) -> dict:
    """Two completion logprobs objects as one (an echoed prompt's, then the completion's)."""
    return tail if head is None else {k: head[k] + tail[k] for k in tail}


def _usage(request: Request, out, prompt_len: int) -> dict:
    completion = len(out.token_ids)
    usage = {
        "prompt_tokens": prompt_len,
        "completion_tokens": completion,
        "total_tokens": prompt_len + completion,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }
    request.app.state.metrics.count_usage(usage)
    return usage


async def _events(handle) -> AsyncIterator:
    """The handle's stream events, waited for off the event loop; the request is cancelled if the
    client goes away first (or the server stops and cancels this task)."""
    finished = False
    try:
        while not finished:
            event = await anyio.to_thread.run_sync(handle.events.get, abandon_on_cancel=True)
            finished = event.finished
            if isinstance(event.error, RequestError):
                raise APIError(400, str(event.error), None, "invalid_value")
            if event.error is not None:
                raise event.error
            yield event
    finally:
        if not finished:
            handle.cancel()


async def _result(request: Request, handle):
    """The finished output; a client that hangs up first cancels its generation."""
    async with anyio.create_task_group() as group:
        group.start_soon(_cancel_on_disconnect, request, handle)
        outputs = [event.output async for event in _events(handle) if event.output is not None]
        group.cancel_scope.cancel()
    if not outputs:
        raise RuntimeError("the engine ended a request without an output")
    return outputs[-1]


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """The body is read already: the next ASGI message is the client's disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        continue
    handle.cancel()


async def _proxy(request: Request, served: ProxiedModel, route: str, stream: bool) -> object:
    """The request's own JSON, checked already, answered by the upstream endpoint."""
    body = msgspec.json.decode(await request.body())
    metrics = request.app.state.metrics
    if not stream:
        answer = await served.forward(route, body)
        if isinstance(answer.get("usage"), dict):
            metrics.count_usage(answer["usage"])
        return answer
    chunks = await served.open_stream(route, body)

    async def relay() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    metrics.count_usage(chunk["usage"])
                yield chunk if isinstance(chunk, str) else json.dumps(chunk)
        finally:
            await chunks.aclose()

    return EventStream(relay())


@get("/v1/models", summary="The served model", responses=responses(401, 429, 500))
async def list_models(request: Request) -> dict:
    served = _model(request)
    return {"object": "list", "data": [_model_card(served)]}


@get("/v1/models/{model_id:str}", summary="One model", responses=responses(400, 401, 404, 429, 500))
async def get_model(request: Request, model_id: FromPath[str]) -> dict:
    served = _model(request)
    _check_model(served, model_id)
    return _model_card(served)


def _model_card(served: ServedModel) -> dict:
    return {
        "id": served.name,
        "object": "model",
        "created": served.created,
        "owned_by": "ds4",
        **({"max_model_len": served.max_model_len} if served.max_model_len else {}),
    }


@_generation_route("/v1/chat/completions", "Chat completion (streams with stream=true)")
async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest]) -> object:
    data, served = await _generation_request(request, ChatCompletionRequest)
    messages = chat_messages(data.messages)
    if isinstance(served, ProxiedModel):
        return await _proxy(request, served, "/chat/completions", data.stream)
    tools = offered_tools(data)
    texts = [m["content"] for m in messages] + ([json.dumps(tools)] if tools else [])
    ids = await _tokenized(served, texts, "messages", served.tokenizer.encode_chat, messages, tools)
    grammar = chat_grammar(data, tools, served.tokenizer)
    if grammar is not None:
        await _check_grammar(served, *grammar)
    top = (data.top_logprobs or 0) if data.logprobs else None
    max_tokens = data.max_completion_tokens or data.max_tokens
    params = _sampling(data, max_tokens, len(ids), served, top, grammar[0] if grammar else None)
    handle = _submit(served, ids, params)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}

    def logprobs(entries: list[dict]) -> dict | None:
        return chat_logprobs(served.tokenizer, entries) if data.logprobs else None

    if not data.stream:
        out = await _result(request, handle)
        message, finish = reply(out, tools, served.tokenizer)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs(_emitted(out)),
            "finish_reason": finish,
        }
        usage = _usage(request, out, len(ids))
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None, entries: list[dict] | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs(entries or []), "finish_reason": finish}
        return json.dumps({**base, "object": "chat.completion.chunk", "choices": [choice]})

    async def stream() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        streamed = StreamedReply(tools, served.tokenizer)
        async for event in _events(handle):
            delta = streamed.delta(event)
            if delta or event.logprobs:
                yield chunk(delta or {"content": ""}, None, event.logprobs)
            if event.output is not None:
                yield chunk({}, streamed.finish_reason(event.output))
                usage = _usage(request, event.output, len(ids))
                if include_usage:
                    yield json.dumps(
                        {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                    )
        yield "[DONE]"

    return EventStream(stream())


@_generation_route("/v1/completions", "Text completion; `suffix` asks for fill-in-the-middle")
async def completions(request: Request, data: JSONBody[CompletionRequest]) -> object:
    data, served = await _generation_request(request, CompletionRequest)
    if isinstance(served, ProxiedModel):
        return await _proxy(request, served, "/completions", data.stream)
    if not isinstance(data.prompt, str) and any(t >= served.tokenizer.vocab_size for t in data.prompt):
        raise APIError(400, f"prompt token ids must be in [0, {served.tokenizer.vocab_size})", "prompt")
    texts = [t for t in (data.prompt, data.suffix) if isinstance(t, str)]
    if data.suffix is not None:
        ids = await _tokenized(served, texts, "prompt", served.fim_prompt, data.prompt, data.suffix)
        if ids is None:
            raise APIError(
                400, "this model's tokenizer has no fill-in-the-middle tokens", "suffix", "unsupported_value"
            )
    elif isinstance(data.prompt, str):
        ids = await _tokenized(served, texts, "prompt", served.tokenizer.encode, data.prompt)
    else:
        ids = list(data.prompt)
    max_tokens = data.max_tokens if data.max_tokens is not None else 16
    params = _sampling(data, max_tokens, len(ids), served, data.logprobs)
    echo = (
        "" if not data.echo else data.prompt if isinstance(data.prompt, str) else served.tokenizer.decode(ids)
    )
    handle = _submit(served, ids, params)
    scored = CompletionLogprobs(served.tokenizer) if data.logprobs is not None else None
    echoed = scored.echo(echo) if scored is not None and echo else None
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
    if not data.stream:
        out = await _result(request, handle)
        text = echo + out.text
        lp = _joined(echoed, scored.add(_emitted(out))) if scored is not None else None
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": FINISH[out.finish_reason]}
        return {**base, "choices": [choice], "usage": _usage(request, out, len(ids))}
    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        if echo:
            yield json.dumps(
                {**base, "choices": [{"index": 0, "text": echo, "logprobs": echoed, "finish_reason": None}]}
            )
        async for event in _events(handle):
            finish = FINISH[event.output.finish_reason] if event.output is not None else None
            if event.text or event.logprobs or finish:
                lp = scored.add(event.logprobs or []) if scored is not None else None
                choice = {"index": 0, "text": event.text, "logprobs": lp, "finish_reason": finish}
                yield json.dumps({**base, "choices": [choice]})
            if event.output is not None:
                usage = _usage(request, event.output, len(ids))
                if include_usage:
                    yield json.dumps({**base, "choices": [], "usage": usage})
        yield "[DONE]"

    return EventStream(stream())


ROUTES = [list_models, get_model, chat_completions, completions]
BODIES = [ChatCompletionRequest, CompletionRequest]
