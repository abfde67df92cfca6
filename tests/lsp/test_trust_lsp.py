"""The language server against a hostile but fair client: a request before `initialize` is answered with
an error (pygls' own client), and malformed frames on raw stdio (a Content-Length that is not a number,
too small, too large, 10^12; bodies that are not JSON or not JSON-RPC) each get an error while the
server reads on and answers the next request."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient
from pygls.uris import from_fs_path

from ds4.agent.backends import BackendError
from ds4.lsp.errors import reason
from ds4.lsp.framing import MAX_BODY_BYTES, FrameError, FrameReader
from tests.fakes import BUGGY, make_repo

EXE = str(Path(sys.executable).parent / "ds4-agent")


def test_a_request_before_initialize_is_answered_with_an_error(tmp_path):
    repo = make_repo(tmp_path / "repo", BUGGY)

    async def run() -> None:
        client = LanguageClient("ds4-trust", "1")
        await client.start_io(EXE, "lsp")
        try:
            with pytest.raises(JsonRpcException) as refused:
                await asyncio.wait_for(
                    client.workspace_symbol_async(types.WorkspaceSymbolParams(query="add")), 30
                )
            assert refused.value.code == -32002 and "initialize" in refused.value.message
            folder = types.WorkspaceFolder(uri=from_fs_path(str(repo)), name="repo")
            params = types.InitializeParams(
                capabilities=types.ClientCapabilities(), workspace_folders=[folder]
            )
            await asyncio.wait_for(client.initialize_async(params), 30)
            client.initialized(types.InitializedParams())
            found = await asyncio.wait_for(
                client.workspace_symbol_async(types.WorkspaceSymbolParams(query="add")), 60
            )
            assert "add" in [s.name for s in found]  # the same request, after initialize, is served
            await client.shutdown_async(None)
            client.exit(None)
        finally:
            await asyncio.wait_for(client.stop(), 30)

    asyncio.run(run())


def frame(message: dict, length: int | None = None) -> bytes:
    body = json.dumps(message).encode()
    return f"Content-Length: {len(body) if length is None else length}\r\n\r\n".encode() + body


def request(msg_id: int, method: str, params=None) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


class RawClient:
    """`ds4-agent lsp` on stdio, written to byte by byte and read frame by frame."""

    def __init__(self):
        self.process = subprocess.Popen([EXE, "lsp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def receive(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            head, sep, rest = self.pending.partition(b"\r\n\r\n")
            if sep:
                length = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    self.pending = rest[length:]
                    return json.loads(rest[:length])
            assert time.monotonic() < deadline, f"no answer; the server {self.state()}"
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"the server closed its output; it {self.state()}"
                self.pending += chunk

    def answer_to(self, msg_id: int) -> dict:
        """The response to `msg_id`, skipping the errors and notifications before it."""
        while (message := self.receive()).get("id") != msg_id:
            continue
        return message

    def state(self) -> str:
        return "is running" if self.process.poll() is None else f"exited with {self.process.returncode}"

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


MALFORMED = {
    "not a number": b"Content-Length: abc\r\n\r\n" + json.dumps(request(90, "shutdown")).encode(),
    "too small": frame(request(91, "shutdown"), length=5),
    "10^12": b"Content-Length: 1000000000000\r\n\r\n{}",
    "not JSON": b"Content-Length: 9\r\n\r\n{not json",
    "not JSON-RPC": frame([1, 2, 3]),
    "not UTF-8": b"Content-Length: 4\r\n\r\n\xff\xfe\xfd\xfc",
}


@pytest.mark.parametrize("bad", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_frame_gets_an_error_and_the_server_reads_on(bad):
    client = RawClient()
    try:
        client.send(bad + frame(request(1, "workspace/symbol", {"query": "x"})))
        first = client.receive()
        assert "error" in first and first["error"]["code"] in (-32700, -32600), first
        assert client.answer_to(1)["error"]["code"] == -32002  # the next request: answered
        client.send(frame(request(2, "initialize", {"capabilities": {}})))
        assert "capabilities" in client.answer_to(2)["result"]
        assert client.process.poll() is None
    finally:
        client.close()


def test_a_content_length_longer_than_its_body_costs_only_that_frame():
    """The declared length runs into the next frame: the next frame's header ends the lying one."""
    client = RawClient()
    try:
        client.send(frame(request(1, "initialize", {"capabilities": {}}), length=5000))
        client.send(frame(request(2, "initialize", {"capabilities": {}})))
        assert client.receive()["error"]["code"] == -32700
        assert "capabilities" in client.answer_to(2)["result"]
    finally:
        client.close()


def reader_over(chunks: list[bytes]) -> FrameReader:
    pending = list(chunks)

    async def read() -> bytes:
        return pending.pop(0) if pending else b""

    return FrameReader(read)


async def frames_of(reader: FrameReader) -> list:
    found = []
    while (item := await reader.next()) is not None:
        found.append(item if isinstance(item, bytes) else type(item))
    return found


def test_frames_split_anywhere_read_the_same():
    stream = frame({"a": 1}) + b"Content-Length: 10000000000000\r\n\r\n" + frame({"b": "\u00e9"})
    whole = asyncio.run(frames_of(reader_over([stream])))
    assert whole == [b'{"a": 1}', FrameError, b'{"b": "\\u00e9"}']
    assert asyncio.run(frames_of(reader_over([bytes([b]) for b in stream]))) == whole


def test_a_frame_over_the_limit_is_skipped_without_reading_it():
    reader = reader_over([f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(), b"x" * 1000, frame({})])
    assert asyncio.run(frames_of(reader)) == [FrameError, FrameError, b"{}"]  # the header, then its bytes


def test_a_failure_without_a_message_still_names_its_reason():
    assert reason(BackendError()) == "BackendError"
    try:
        raise BackendError() from TimeoutError("the endpoint did not answer in 60 s")
    except BackendError as e:
        assert reason(e) == "BackendError: the endpoint did not answer in 60 s"
