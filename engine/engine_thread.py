"""One engine thread shared by many callers: a server submits from any thread and reads each request's
own stream of events; the thread owns the engine and runs its steps, so batches mix everyone's work.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ds4.engine.errors import EngineError, EngineStopped, RequestError, StepFailed
from ds4.engine.request_engine import LLMEngine, RequestOutput
from ds4.engine.sampler import SamplingParams

log = logging.getLogger("ds4.engine.loop")


@dataclass
class StreamEvent:
    """What a request gained in one step: new token ids and newly stable text; `output` when finished."""

    token_ids: list[int]
    text: str
    output: RequestOutput | None = None
    error: BaseException | None = None
    logprobs: list[dict] | None = None  # one per new token, when the request asked for them

    @property
    def finished(self) -> bool:
        return self.output is not None or self.error is not None


def stable_text(out: RequestOutput, params: SamplingParams) -> str:
    """The part of the output text no later token can change: all of it once finished; before that, a
    possible stop-string prefix and an incomplete UTF-8 tail are held back."""
    if out.finish_reason is not None:
        return out.text
    hold = max((len(s) for s in params.stop), default=1) - 1
    text = out.text[: max(len(out.text) - hold, 0)]
    return text[:-1] if text.endswith("\ufffd") else text


class RequestHandle:
    def __init__(self, loop: EngineLoop, params: SamplingParams):
        self.loop, self.params = loop, params
        self.request_id: int | None = None
        self.events: queue.Queue[StreamEvent] = queue.Queue()
        self._sent_tokens = 0
        self._sent_text = 0

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            event = self.events.get()
            yield event
            if event.finished:
                return

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Blocks until the request finishes; raises what the engine raised for it."""
        while True:
            event = self.events.get(timeout=timeout)
            if event.error is not None:
                raise event.error
            if event.output is not None:
                return event.output

    def cancel(self) -> None:
        self.loop.cancel(self)

    def _publish(self, out: RequestOutput, finished: bool) -> None:
        tokens = out.token_ids[self._sent_tokens :]
        text = stable_text(out, self.params)[self._sent_text :]
        logprobs = None if out.logprobs is None else out.logprobs[self._sent_tokens :][: len(tokens)]
        self._sent_tokens += len(tokens)
        self._sent_text += len(text)
        if tokens or text or finished:
            self.events.put(StreamEvent(tokens, text, out if finished else None, logprobs=logprobs))


class EngineLoop:
    def __init__(self, engine: LLMEngine, idle_wait: float = 0.05):
        self.engine, self.idle_wait = engine, idle_wait
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds4-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queues a request (checked here, in the caller's thread) and returns its handle at once."""
        if not self.is_alive:
            raise EngineStopped("the engine is not running (stopped or shutting down): retry later")
        self.engine.check_request(prompt_ids, params)
        handle = RequestHandle(self, params)
        self._inbox.put(("add", handle, list(prompt_ids)))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        self._inbox.put(("cancel", handle, None))

    def cancel_all(self) -> None:
        """Finishes every request in flight (reason "cancelled"); later submissions still run."""
        self._inbox.put(("cancel_all", None, None))

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished (queued in the inbox or in the engine)."""
        return len(self._handles) + self._inbox.qsize()

    @property
    def is_alive(self) -> bool:
        """The engine thread runs and has not been asked to stop."""
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        """Refuses new requests, cancels those in flight (their callers get "cancelled" outputs) and lets
        the thread end after its current step; returns at once."""
        self._inbox.put(("cancel_all", None, None))
        self._stop.set()
        self._inbox.put(("wake", None, None))

    def shutdown(self, timeout: float = 10.0) -> None:
        """stop(), then waits for the thread to end."""
        self.stop()
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    self._step()
            except Exception as error:  # a request cannot stop the thread: fail what is in flight, go on
                log.exception("the engine loop failed; failing the requests in flight")
                self._fail_all(error)
        self._drain_inbox(block=False)  # the last cancels: callers waiting on a stream get their end

    def _step(self) -> None:
        try:
            produced = self.engine.step()
        except StepFailed as failed:  # the engine found the requests that fail; the others go on
            log.error("%s", failed, exc_info=failed.cause)
            self._fail(failed.request_ids, failed.cause)
            return
        except Exception as error:  # the engine could not recover: every request fails, the loop goes on
            log.exception("engine step failed")
            self._fail_all(error)
            return
        for request_id in {r for r, _ in produced}:
            self._publish(request_id)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.idle_wait) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, handle: RequestHandle | None, payload) -> None:
        if kind == "add" and self._stop.is_set():
            stopped = EngineStopped("the engine stopped before this request ran")
            handle.events.put(StreamEvent([], "", error=stopped))
        elif kind == "add":
            self._add(handle, payload)
        elif kind == "cancel" and handle.request_id in self._handles:
            self.engine.cancel(handle.request_id)
            self._publish(handle.request_id)
        elif kind == "cancel_all":
            for request_id in list(self._handles):
                self.engine.cancel(request_id)
                self._publish(request_id)

    def _add(self, handle: RequestHandle, prompt_ids: list[int]) -> None:
        """A request the engine refuses (a seed the generator cannot take, ...) fails alone."""
        try:
            handle.request_id = self.engine.add_request(prompt_ids, handle.params)
        except Exception as error:
            log.warning("request refused by the engine: %r", error)
            failure = error if isinstance(error, EngineError) else RequestError(f"request refused: {error}")
            handle.events.put(StreamEvent([], "", error=failure))
            return
        self._handles[handle.request_id] = handle

    def _publish(self, request_id: int) -> None:
        out = self.engine.output(request_id)
        finished = out.finish_reason is not None
        self._handles[request_id]._publish(out, finished)
        if finished:
            del self._handles[request_id]
            self.engine.release(request_id)

    def _fail(self, request_ids: list[int], error: BaseException) -> None:
        for request_id in request_ids:
            handle = self._handles.pop(request_id, None)
            self.engine.release(request_id)
            if handle is not None:
                handle.events.put(StreamEvent([], "", error=error))

    def _fail_all(self, error: Exception) -> None:
        for request_id, handle in list(self._handles.items()):
            handle.events.put(StreamEvent([], "", error=error))
            try:
                self.engine.cancel(request_id)
                self.engine.release(request_id)
            except Exception:  # the thread goes on; this request's engine state is what failed
                log.exception("could not release request %d", request_id)
        self._handles.clear()
