"""One `$/progress` token's begin/report/end, callable from any thread; it knows nothing of what the work
is. Creating the token (which needs the client's capabilities) is the server's."""

from __future__ import annotations

import asyncio
import threading

from lsprotocol import types


class Progress:
    """One `$/progress` token's begin/report/end, callable from any thread (sends go through the
    event loop); without a token (the client has no progress support) it only records."""

    def __init__(self, server, token: str | None, loop: asyncio.AbstractEventLoop):
        self.server, self.token, self.loop = server, token, loop
        self.cancelled = threading.Event()
        self.messages: list[str] = []

    def _send(self, method, value) -> None:
        if self.token is not None:  # through the loop, in order, whichever thread reports
            self.loop.call_soon_threadsafe(method, self.token, value)

    def begin(self, title: str, cancellable: bool) -> None:
        value = types.WorkDoneProgressBegin(title=title, cancellable=cancellable, percentage=0)
        self._send(self.server.work_done_progress.begin, value)

    def report(self, message: str, percentage: int | None = None) -> None:
        self.messages.append(message)
        self._send(
            self.server.work_done_progress.report,
            types.WorkDoneProgressReport(message=message, percentage=percentage),
        )

    def end(self, message: str) -> None:
        self._send(self.server.work_done_progress.end, types.WorkDoneProgressEnd(message=message))
