"""ds4's language server: the repository index, the packer and the fix loop behind standard LSP features.

What the editor shows is what ds4 sees: open documents' unsaved text is searched (workspace/symbol,
documentSymbol), packed and tested (ds4.fix, code actions), and patches come back as a
`workspace/applyEdit` against the documents' current versions. Long work (indexing, the fix loop, model
calls) runs in worker threads and reports `$/progress`; the server keeps answering meanwhile. This file
holds the server's state (settings, the model, workspace roots, open buffers, progress, the index and its
watchers) and its transports; the handlers are in handlers.py, the features they call beside it."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import uuid
from pathlib import Path

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from ds4.agent.backends import BackendError
from ds4.agent.index.indexer import index_repo
from ds4.agent.index.tags import Definition
from ds4.lsp.errors import RequestFailed, reason
from ds4.lsp.framing import FrameReader, GuardedProtocol, serve_frames
from ds4.lsp.progress import Progress
from ds4.lsp.settings import Settings, read_settings
from ds4.lsp.symbols import buffer_definitions

log = logging.getLogger("ds4.lsp")


def make_backend(settings: Settings):
    from ds4.agent.backends import LocalBackend, OpenAIBackend

    if settings.endpoint:
        return OpenAIBackend(settings.endpoint, settings.model_name, settings.api_key)
    if settings.model:
        if not Path(settings.model).is_dir():
            raise BackendError(f"the ds4 setting 'model' is not a folder: {settings.model}")
        return LocalBackend(settings.model)
    raise BackendError(
        "no model configured: set the ds4 setting 'model' (a checkpoint folder) or 'endpoint' "
        "(an OpenAI-compatible server)"
    )


class Ds4Server(LanguageServer):
    """pygls' server with ds4's state: settings, the model, workspace roots, parsed buffers, progress
    tokens, and the index with its watchers."""

    def __init__(self, backend_factory=make_backend, watch: bool = True):
        """`backend_factory(settings)`: the model behind the server (tests pass a scripted one)."""
        super().__init__(
            "ds4",
            "0.1.0",
            text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
            protocol_cls=GuardedProtocol,
        )
        self.settings = Settings()
        self.backend_factory, self.watch = backend_factory, watch
        self._backend, self._backend_for = None, None
        self._backend_lock = threading.Lock()
        self.roots: list[Path] = []
        self.watchers: dict[Path, object] = {}
        self.indexed = asyncio.Event()
        self.cancel_events: dict[str, threading.Event] = {}
        self.completion_seq: dict[str, int] = {}
        self._buffer_symbols: dict[str, tuple[int | None, list]] = {}

    # -- transports: pygls' own, with framing.py's reader -----------------------------------------

    def start_io(self, stdin=None, stdout=None) -> None:
        """stdio, read with FrameReader: malformed frames are answered, never fatal."""
        stdin = stdin or sys.stdin.buffer
        self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        read_chunk = getattr(stdin, "read1", stdin.read)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            reader = FrameReader(lambda: loop.run_in_executor(self.thread_pool, read_chunk, 65536))
            await serve_frames(self.protocol, reader, self._stop_event.is_set)

        try:
            asyncio.run(main())
        except BrokenPipeError:
            log.error("the client closed the connection")
        finally:
            self.shutdown()

    def start_tcp(self, host: str, port: int) -> None:
        """One client over TCP, read with FrameReader."""
        self._stop_event = threading.Event()

        async def connected(stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.protocol.set_writer(writer)
            await serve_frames(
                self.protocol, FrameReader(lambda: stream.read(65536)), self._stop_event.is_set
            )
            self.shutdown()

        async def main() -> None:
            async with await asyncio.start_server(connected, host, port) as listening:
                await listening.serve_forever()

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            log.info("the TCP server stopped")

    # -- settings and the model -----------------------------------------------------------------

    def apply_settings(self, raw) -> None:
        self.settings, problems = read_settings(raw, self.settings)
        for problem in problems:
            self.window_show_message(types.ShowMessageParams(types.MessageType.Warning, problem))

    def backend(self):
        with self._backend_lock:
            s = self.settings
            key = (s.model, s.endpoint, s.model_name, s.api_key)
            if self._backend is None or self._backend_for != key:
                self._backend = self.backend_factory(self.settings)
                self._backend_for = key
            return self._backend

    async def get_backend(self):
        """The model for a request; a model that cannot be had is shown and fails the request."""
        try:
            return await asyncio.to_thread(self.backend)
        except (BackendError, OSError, ValueError) as e:
            self.window_show_message(types.ShowMessageParams(types.MessageType.Error, f"ds4: {reason(e)}"))
            raise RequestFailed(reason(e)) from None

    # -- the workspace ----------------------------------------------------------------------------

    def find_roots(self) -> list[Path]:
        folders = [Path(to_fs_path(f.uri)) for f in self.workspace.folders.values()]
        if not folders and self.workspace.root_path:
            folders = [Path(self.workspace.root_path)]
        return [f.resolve() for f in folders if f.is_dir()]

    def locate(self, uri: str) -> tuple[Path, str]:
        """(workspace root, path relative to it) of a document; InvalidParams outside every root."""
        path = to_fs_path(uri) if uri.startswith("file:") else None
        if path is None:
            raise JsonRpcInvalidParams(f"not a file URI: {uri!r}")
        path = Path(path).resolve()
        for root in sorted(self.roots, key=lambda r: -len(str(r))):
            if path.is_relative_to(root):
                return root, path.relative_to(root).as_posix()
        raise JsonRpcInvalidParams(f"{path} is outside the workspace folders")

    def buffers(self, root: Path) -> tuple[dict[str, str], dict[str, int]]:
        """Open documents under `root` whose text differs from the disk (unsaved, or deleted from disk),
        by relative path; and every open document's version."""
        texts, versions = {}, {}
        for uri, doc in list(self.workspace.text_documents.items()):
            try:
                doc_root, rel = self.locate(uri)
            except JsonRpcInvalidParams:
                continue
            if doc_root != root:
                continue
            versions[rel] = doc.version
            path = root / rel
            on_disk = path.read_bytes().decode("utf-8", "surrogateescape") if path.is_file() else None
            if doc.source != on_disk:
                texts[rel] = doc.source
        return texts, versions

    def buffer_definitions(self, uri: str, rel: str) -> list[Definition]:
        """An open document's definitions, parsed once per version."""
        doc = self.workspace.get_text_document(uri)
        cached = self._buffer_symbols.get(uri)
        if cached is not None and cached[0] == doc.version and doc.version is not None:
            return cached[1]
        definitions = buffer_definitions(rel, doc.source)
        self._buffer_symbols[uri] = (doc.version, definitions)
        return definitions

    def forget_buffer(self, uri: str) -> None:
        self._buffer_symbols.pop(uri, None)

    def unsaved_definitions(self, root: Path) -> dict[str, list[Definition]]:
        """The definitions of the open documents under `root` whose text differs from the disk, by
        relative path: they stand in for what the index holds of those files."""
        unsaved, _ = self.buffers(root)
        uri_of = {}
        for uri in list(self.workspace.text_documents):
            try:
                doc_root, rel = self.locate(uri)
            except JsonRpcInvalidParams:
                continue
            if doc_root == root and rel in unsaved:
                uri_of[rel] = uri
        return {rel: self.buffer_definitions(uri, rel) for rel, uri in uri_of.items()}

    def supports_document_changes(self) -> bool:
        workspace = self.client_capabilities.workspace
        return bool(workspace and workspace.workspace_edit and workspace.workspace_edit.document_changes)

    def is_open(self, uri: str) -> bool:
        return uri in self.workspace.text_documents

    # -- progress ---------------------------------------------------------------------------------

    async def progress(self, title: str, cancellable: bool = False) -> Progress:
        token = f"ds4-{uuid.uuid4().hex[:12]}"
        supported = bool(
            self.client_capabilities.window and self.client_capabilities.window.work_done_progress
        )
        progress = Progress(self, token if supported else None, asyncio.get_running_loop())
        if supported:
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), 10)
            except Exception as e:  # the client refused or never answered: work goes on without it
                log.warning("no progress token: %r", e)
                progress.token = None
        progress.begin(title, cancellable)
        if cancellable and progress.token:
            self.cancel_events[progress.token] = progress.cancelled
        return progress

    # -- index ------------------------------------------------------------------------------------

    async def index_all(self) -> list[dict]:
        reports = []
        for root in self.roots:
            progress = await self.progress(f"ds4: indexing {root.name}")

            def report(done: int, total: int, progress=progress) -> None:
                progress.report(f"{done}/{total} files", round(100 * done / max(total, 1)))

            try:
                result = await asyncio.to_thread(index_repo, root, None, progress=report)
            except Exception as e:
                progress.end(f"indexing failed: {e}")
                self.window_show_message(
                    types.ShowMessageParams(types.MessageType.Error, f"ds4 could not index {root}: {e}")
                )
                continue
            progress.end(
                f"{result.files} files, {result.definitions} symbols ({result.parsed} parsed) "
                f"in {result.seconds:.1f}s"
            )
            reports.append(
                {
                    "root": str(root),
                    "files": result.files,
                    "parsed": result.parsed,
                    "definitions": result.definitions,
                    "seconds": round(result.seconds, 3),
                }
            )
        self.indexed.set()
        return reports

    def start_watchers(self) -> None:
        from ds4.agent.index.watcher import RepoWatcher

        for root in self.roots:
            if root not in self.watchers:
                watcher = RepoWatcher(root)
                watcher.start()
                self.watchers[root] = watcher

    def stop_watchers(self) -> None:
        for watcher in self.watchers.values():
            watcher.stop()
        self.watchers.clear()

    def hint(self, uri: str) -> None:
        """A document was saved or closed: the watcher re-reads what changed (events can be dropped)."""
        try:
            root, _ = self.locate(uri)
        except JsonRpcInvalidParams:
            return
        watcher = self.watchers.get(root)
        if watcher is not None:
            watcher.hint()


def create_server(backend_factory=make_backend, watch: bool = True) -> Ds4Server:
    """The server with its features registered; `watch`: keep the index fresh from file events."""
    from ds4.lsp import handlers  # it names Ds4Server in its handlers' annotations, which pygls resolves

    server = Ds4Server(backend_factory, watch)
    for method, options, handler in handlers.FEATURES:
        server.feature(method, options)(handler)
    for name, handler in handlers.COMMANDS:
        server.command(name)(handler)
    return server
