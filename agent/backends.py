"""Where answers come from: the engine in-process, or any OpenAI-compatible chat endpoint.

The loop knows a backend only through `Backend.complete(messages, params)`. `LocalBackend` runs ds4's
engine (its prefix cache makes every later round pay only for its new suffix); `OpenAIBackend` speaks
/v1/chat/completions with streaming, timeouts and retries with backoff (ds4's own server, vLLM or
SGLang serving DeepSeek, or a hosted API), its key from DS4_API_KEY or OPENAI_API_KEY.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ds4.agent.errors import BackendError
from ds4.agent.probe import choose_model, list_models


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 2048
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a prefix cache
    seconds: float = 0.0


class Backend(Protocol):
    name: str
    tokenizer_file: Path | None  # for exact token budgets; None: estimate
    max_model_len: int | None  # the context, prompt and answer together; None: not known
    can_run_concurrently: bool  # the fix loop may ask for several samples at once, from threads

    def complete(
        self, messages: list[dict], params: GenerationParams, on_text: Callable[[str], None] | None = None
    ) -> Completion: ...

    def infill(self, prefix: str, suffix: str, params: GenerationParams) -> Completion:
        """Fill-in-the-middle: the text that goes between `prefix` and `suffix`."""
        ...


class LocalBackend:
    """The engine in this process (torch is imported here, not before)."""

    can_run_concurrently = False  # one generation at a time: the samples take turns

    def __init__(self, model_dir: str | Path, **engine_kwargs):
        from ds4.engine import LLM

        self.llm = LLM(model_dir, **engine_kwargs)
        if self.llm.tokenizer is None:
            raise BackendError(
                f"{model_dir} has no tokenizer.json: the fix loop needs one to talk to the model"
            )
        self.name = f"ds4:{Path(model_dir).name}"
        self.tokenizer_file = Path(model_dir) / "tokenizer.json"
        self.max_model_len = self.llm.max_model_len

    def complete(self, messages, params, on_text=None) -> Completion:
        start = time.perf_counter()
        ids = self.llm.tokenizer.encode_chat(messages)
        sampling = engine_sampling(params, len(ids), self.max_model_len)
        text, finished = "", []
        for delta in self.llm.stream(ids, sampling, on_finish=finished.append):
            text += delta
            if on_text is not None:
                on_text(delta)
        out = finished[0]
        return Completion(
            text, len(ids), len(out.token_ids), out.num_cached_tokens, time.perf_counter() - start
        )

    def infill(self, prefix: str, suffix: str, params: GenerationParams) -> Completion:
        start = time.perf_counter()
        ids = self.llm.tokenizer.encode_fim(prefix, suffix)
        if ids is None:
            raise BackendError(f"{self.name}: the tokenizer has no fill-in-the-middle tokens")
        out = self.llm.generate([ids], engine_sampling(params, len(ids), self.max_model_len))[0]
        return Completion(
            out.text, len(ids), len(out.token_ids), out.num_cached_tokens, time.perf_counter() - start
        )


def engine_sampling(params: GenerationParams, prompt_len: int, max_model_len: int):
    """The engine's sampling parameters for a chat prompt, the answer capped by the room left in context."""
    from ds4.engine import SamplingParams

    room = max_model_len - prompt_len
    if room < 1:
        raise BackendError(f"the prompt has {prompt_len} tokens; the model's limit is {max_model_len}")
    return SamplingParams(
        temperature=params.temperature, max_tokens=min(params.max_tokens, room), seed=params.seed
    )


def sse_data(line: str) -> str | None:
    """The payload of an event stream's `data:` line; None for any other line."""
    line = line.strip()
    return line[5:].strip() if line.startswith("data:") else None


def sse_chunks(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON chunks of an OpenAI-style event stream: each `data:` line's, up to `data: [DONE]`."""
    for data in map(sse_data, lines):
        if data == "[DONE]":
            return
        if data is not None:
            yield json.loads(data)


class OpenAIBackend:
    """An OpenAI-compatible /v1/chat/completions; a server batches concurrent requests, so samples run at
    once (each request opens its own connection)."""

    can_run_concurrently = True

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        tokenizer_file: str | Path | None = None,
    ):
        self.url = endpoint.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.endpoint, self.model, self.timeout, self.retries = endpoint, model, timeout, retries
        self.api_key = api_key or os.environ.get("DS4_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.tokenizer_file = Path(tokenizer_file) if tokenizer_file else None
        self.max_model_len: int | None = None  # known once probed, when the server lists it

    @property
    def name(self) -> str:
        return f"openai:{self.model}@{self.endpoint}"

    def probe(self) -> None:
        """Asks the endpoint for its models before anything else runs: it is reachable, the key is
        accepted, and the model named is served (unnamed: its first is chosen); keeps its context when
        listed. A failure is a BackendError that says what to do."""
        chosen = choose_model(list_models(self.url, self.api_key), self.model, self.endpoint)
        self.model, self.max_model_len = chosen.id, chosen.max_model_len

    def complete(self, messages, params, on_text=None) -> Completion:
        if self.model is None:
            self.probe()
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                return self._stream(body, on_text)
            except BackendError as e:
                retryable = getattr(e, "retryable", False)
                if not retryable or attempt == self.retries:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def infill(self, prefix: str, suffix: str, params: GenerationParams) -> Completion:
        """POST /v1/completions with `suffix` (no retries: an editor asks again on the next keystroke)."""
        if self.model is None:
            self.probe()
        start = time.perf_counter()
        url = self.url.removesuffix("/chat/completions") + "/completions"
        body = {
            "model": self.model,
            "prompt": prefix,
            "suffix": suffix,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise BackendError(f"{url} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as e:
            raise BackendError(f"cannot complete at {url}: {getattr(e, 'reason', e)}") from None
        usage = answer.get("usage") or {}
        choices = answer.get("choices") or [{}]
        return Completion(
            choices[0].get("text") or "",
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            time.perf_counter() - start,
        )

    def _stream(self, body: dict, on_text) -> Completion:
        start = time.perf_counter()
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
                **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
            },
        )
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            error = BackendError(f"{self.url} answered {e.code}: {detail}")
            error.retryable = e.code == 429 or e.code >= 500
            raise error from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            error = BackendError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}")
            error.retryable = True
            raise error from None
        text, usage = "", {}
        with response:
            for chunk in sse_chunks(raw.decode("utf-8", "replace") for raw in response):
                if chunk.get("error"):
                    raise BackendError(f"{self.url}: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta:
                        text += delta
                        if on_text is not None:
                            on_text(delta)
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        return Completion(
            text,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            cached,
            time.perf_counter() - start,
        )
