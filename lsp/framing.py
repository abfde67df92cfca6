"""LSP's base protocol read defensively: frames (a `Content-Length` header, a blank line, a JSON body) from
a byte stream, where a missing, malformed, huge or lying Content-Length costs that one frame, never the
connection or the memory. pygls' own reader (pygls.io_.run_async) stalls or exits on these; the serving
loop here replaces it for stdio and answers each bad frame with a JSON-RPC error."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable

from lsprotocol.types import EXIT, INITIALIZE, ResponseError
from pygls.exceptions import JsonRpcException
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import RPCNotification, RPCRequest

log = logging.getLogger("ds4.lsp")

MAX_BODY_BYTES = 64 * 1024 * 1024  # a whole large file in didOpen fits; 10^12 does not
MAX_HEADER_BYTES = 8192
# JSON never holds a raw CR LF inside a string, and "Content-Length:" outside one is not JSON: a match
# inside a body means the declared length was a lie and the next frame starts there
HEADER = re.compile(rb"Content-Length:[ \t]*(\d{1,15})[ \t]*\r\n", re.IGNORECASE)
PARSE_ERROR, INVALID_REQUEST, SERVER_NOT_INITIALIZED = -32700, -32600, -32002


class FrameError(Exception):
    """A frame that could not be read; the stream goes on at the next frame."""


class FrameReader:
    """Frames from `read` (the next chunk of bytes, b"" at the end of the stream)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]]):
        self.read = read
        self.buffer = bytearray()
        self.ended = False

    async def next(self) -> bytes | FrameError | None:
        """The next frame's body, a FrameError for a bad frame (already skipped), None at the end."""
        while True:
            header = HEADER.search(self.buffer)
            if header is not None and header.start() > 0 and self.buffer[: header.start()].strip():
                return self._skip(header.start(), f"{header.start()} bytes outside any frame were skipped")
            if header is None:
                if self.buffer.strip() and len(self.buffer) > MAX_HEADER_BYTES:
                    return self._skip(len(self.buffer) - 64, "bytes outside any frame were skipped")
                if not await self._more():
                    return None
                continue
            end = self.buffer.find(b"\r\n\r\n", header.start())
            if end < 0:
                if len(self.buffer) - header.start() > MAX_HEADER_BYTES:
                    return self._skip(header.end(), f"headers longer than {MAX_HEADER_BYTES} bytes")
                if not await self._more():
                    return None
                continue
            return await self._body(int(header.group(1)), end + 4)

    async def _body(self, length: int, start: int) -> bytes | FrameError | None:
        if length > MAX_BODY_BYTES:
            return self._skip(start, f"Content-Length {length} is over the limit of {MAX_BODY_BYTES} bytes")
        scanned = start
        while len(self.buffer) - start < length:
            lie = HEADER.search(self.buffer, max(start, scanned - 32))
            if lie is not None:
                return self._skip(lie.start(), f"the body ended before its Content-Length of {length} bytes")
            scanned = len(self.buffer)
            if not await self._more():
                return None
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        return body

    def _skip(self, upto: int, reason: str) -> FrameError:
        del self.buffer[:upto]
        return FrameError(reason)

    async def _more(self) -> bool:
        if self.ended:
            return False
        chunk = await self.read()
        self.ended = not chunk
        self.buffer += chunk
        return bool(chunk)


async def serve_frames(protocol, reader: FrameReader, stopped: Callable[[], bool]) -> None:
    """Hands every good frame to pygls' protocol and answers every bad one; returns at the end of input."""
    while not stopped():
        frame = await reader.next()
        if frame is None:
            return
        if isinstance(frame, FrameError):
            log.warning("malformed LSP frame: %s", frame)
            _reply_error(protocol, None, PARSE_ERROR, f"malformed frame: {frame}")
            continue
        _dispatch(protocol, frame)


def _dispatch(protocol, body: bytes) -> None:
    try:
        message = json.loads(body, object_hook=protocol.structure_message)
    except ValueError as e:  # not JSON, not UTF-8
        _reply_error(protocol, None, PARSE_ERROR, f"the body is not JSON: {e}")
        return
    except JsonRpcException as e:  # JSON, but not a message of its method's shape
        _reply_error(protocol, _request_id(body), e.code, e.message or type(e).__name__)
        return
    if not hasattr(message, "jsonrpc"):
        _reply_error(protocol, _request_id(body), INVALID_REQUEST, "not a JSON-RPC 2.0 message")
        return
    protocol.handle_message(message)


def _request_id(body: bytes) -> int | str | None:
    """The id of a request whose body is JSON but not a valid message, to address the error to."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, int | str) and not isinstance(found, bool) else None


def _reply_error(protocol, msg_id: int | str | None, code: int, message: str) -> None:
    protocol._send_response(msg_id, error=ResponseError(code=code, message=message))


class GuardedProtocol(LanguageServerProtocol):
    """pygls' protocol, answering the spec's ServerNotInitialized to any request before `initialize` (and
    dropping notifications but `exit`): a handler run before it would wait forever for the workspace."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initialize_seen = False

    def handle_message(self, message) -> None:
        method = getattr(message, "method", None)
        if method == INITIALIZE and isinstance(message, RPCRequest):
            self.initialize_seen = True
        elif not self.initialize_seen and isinstance(message, RPCRequest):
            _reply_error(
                self, message.id, SERVER_NOT_INITIALIZED, f"{method} before initialize: initialize first"
            )
            return
        elif not self.initialize_seen and isinstance(message, RPCNotification) and method != EXIT:
            log.warning("notification %s before initialize dropped", method)
            return
        super().handle_message(message)
