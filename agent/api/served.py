"""The model behind the server: the engine in this process, one engine thread shared by all requests."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from ds4.agent.errors import InputError


class ServedModel:
    def __init__(self, model_dir: str, name: str | None = None, **engine_kwargs):
        from ds4.engine import LLM

        self.llm = LLM(model_dir, **engine_kwargs)
        self.model_dir = Path(model_dir)
        if self.llm.tokenizer is None:
            raise InputError(f"{model_dir} has no tokenizer.json: the server needs one", "model")
        self.name = name or Path(model_dir).resolve().name
        self.created = int(time.time())
        self.max_model_len = self.llm.max_model_len
        self.loop = self.llm.serve()

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def fim_prompt(self, prefix: str | list[int], suffix: str) -> list[int] | None:
        """DeepSeek's fill-in-the-middle prompt, or None when the tokenizer has no FIM tokens."""
        return self.tokenizer.encode_fim(prefix, suffix)

    @property
    def num_in_flight(self) -> int:
        return self.loop.num_in_flight

    def stats(self) -> dict:
        return self.llm.engine.stats()

    def shutdown(self) -> None:
        self.loop.shutdown()


class LoopBackend:
    """The fix loop's backend inside the server: requests go through the shared engine thread, so fix
    jobs and API clients batch together and share the prefix cache. `cancel`, when set, stops the
    generation in flight (a cancelled job, a server that stops)."""

    def __init__(self, served: ServedModel, cancel: threading.Event | None = None):
        self.served, self.cancel = served, cancel
        self.name = f"ds4:{served.name}"
        self.tokenizer_file = served.model_dir / "tokenizer.json"
        self.max_model_len = served.max_model_len
        self.can_run_concurrently = False  # fix jobs already share the engine thread with API clients

    def with_cancel(self, cancel: threading.Event) -> LoopBackend:
        return LoopBackend(self.served, cancel)

    def complete(self, messages, params, on_text=None):
        from ds4.agent.backends import BackendError, Completion, engine_sampling
        from ds4.engine.errors import EngineError

        start = time.perf_counter()
        ids = self.served.tokenizer.encode_chat(messages)
        sampling = engine_sampling(params, len(ids), self.served.max_model_len)
        try:
            out = self._result(self.served.loop.submit(ids, sampling))
        except EngineError as e:
            raise BackendError(str(e)) from None
        if on_text is not None:
            on_text(out.text)
        return Completion(
            out.text, len(ids), len(out.token_ids), out.num_cached_tokens, time.perf_counter() - start
        )

    def _result(self, handle):
        from ds4.agent.backends import BackendError

        while self.cancel is None or not self.cancel.is_set():
            try:
                event = handle.events.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if event.error is not None:
                raise event.error
            if event.output is not None:
                return event.output
        handle.cancel()
        raise BackendError("the generation was cancelled")


POLL_S = 0.1  # how soon a cancelled job's generation stops
