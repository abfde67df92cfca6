"""Processes the tests start and watch: the `ds4-agent` console script (EXE, run_cli), `ds4-agent serve`
on a free loopback port (serving), the app in a thread of the test process (Server), a handler served in a
thread (serve_in_thread), and /proc as the witness of what still runs (processes_with, wait_for)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

EXE = str(Path(sys.executable).parent / "ds4-agent")  # the console script of the venv running the tests
ENV = dict(os.environ, PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
KEY = "test-key-1"  # the API key the served tests use
MODEL = "tiny-test"  # the served name of the tiny checkpoint


def run_cli(*args, env: dict = ENV, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ds4-agent` with `args`, its output captured as text."""
    return subprocess.run(
        [EXE, *map(str, args)], capture_output=True, text=True, encoding="utf-8", env=env, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(checkpoint, log: Path, *flags: str):
    """`ds4-agent serve` on a free loopback port, its output in `log`; yields the base URL once healthy.
    `checkpoint` None: the flags say what is served (--endpoint)."""
    port = free_port()
    model = ["--model", str(checkpoint)] if checkpoint is not None else []
    with open(log, "w") as f:
        process = subprocess.Popen(
            [EXE, "serve", *model, "--port", str(port), *flags],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited: {log.read_text()}") from None
                time.sleep(0.25)
        else:
            raise RuntimeError(f"the server did not come up: {log.read_text()}")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


class Server:
    """uvicorn in a thread of this process, so the fix jobs can use a scripted backend."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        return request_json(self.base + path, data, {"Content-Type": "application/json"}, method)

    def events(self, path):
        with urllib.request.urlopen(self.base + path, timeout=120) as r:
            lines = r.read().decode().splitlines()
        return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def request_json(url: str, body: bytes | None, headers: dict, method=None, timeout: float = 120):
    """(status, the JSON body) of one HTTP request, error statuses included."""
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def serve_in_thread(handler) -> ThreadingHTTPServer:
    """An http.server handler class served on a loopback port by a daemon thread; shutdown() stops it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def processes_with(marker: str, starting: bool = False) -> list[int]:
    """Live processes whose command line holds `marker` (or starts with it) (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if command.startswith(marker) if starting else marker in command:
                    found.append(int(entry.name))
            except OSError:
                continue  # it ended while we looked
    return found


def wait_for(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
