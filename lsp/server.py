"""ds4's language server: the repository index, the packer and the fix loop behind standard LSP features.

What the editor shows is what ds4 sees: open documents' unsaved text is searched (workspace/symbol,
documentSymbol), packed and tested (ds4.fix, code actions), and patches come back as a
`workspace/applyEdit` against the documents' current versions. Long work (indexing, the fix loop, model
calls) runs in worker threads and reports `$/progress`; the server keeps answering meanwhile."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import uuid
from pathlib import Path

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path

from ds4.agent.backends import BackendError, GenerationParams
from ds4.agent.errors import Cancelled
from ds4.agent.events import describe
from ds4.agent.index.indexer import default_db_path, index_repo
from ds4.agent.index.languages import language_of
from ds4.agent.index.query import search, symbols
from ds4.agent.index.store import IndexDatabaseError, open_index
from ds4.agent.index.tags import extract
from ds4.lsp.edits import workspace_edit
from ds4.lsp.framing import FrameReader, GuardedProtocol, serve_frames
from ds4.lsp.settings import Settings, read_settings

log = logging.getLogger("ds4.lsp")

COMMANDS = ("ds4.fix", "ds4.explain", "ds4.ask", "ds4.reindex")
KINDS = {
    "function": types.SymbolKind.Function,
    "method": types.SymbolKind.Method,
    "class": types.SymbolKind.Class,
    "interface": types.SymbolKind.Interface,
    "struct": types.SymbolKind.Struct,
    "enum": types.SymbolKind.Enum,
    "module": types.SymbolKind.Module,
    "constant": types.SymbolKind.Constant,
    "variable": types.SymbolKind.Variable,
    "field": types.SymbolKind.Field,
    "property": types.SymbolKind.Property,
    "type": types.SymbolKind.TypeParameter,
    "macro": types.SymbolKind.Function,
    "trait": types.SymbolKind.Interface,
    "implementation": types.SymbolKind.Class,
}
MAX_SYMBOLS = 200
EXPLAIN = (
    "You explain code to a developer who works in this repository. Answer in Markdown: what the "
    "selected code does, how it fits with the rest of the repository (name the files), and anything "
    "surprising in it. Be brief."
)
ASK = (
    "You answer questions about this repository. Answer in Markdown and name the files (path:line) "
    "your answer rests on."
)


class RequestFailed(JsonRpcException):
    """A request that cannot be served as asked (no model configured, the model failed): LSP's
    RequestFailed code, with a message the editor shows."""

    CODE = -32803


def make_backend(settings: Settings):
    from ds4.agent.backends import LocalBackend, OpenAIBackend

    if settings.endpoint:
        return OpenAIBackend(settings.endpoint, settings.model_name or "default", settings.api_key)
    if settings.model:
        if not Path(settings.model).is_dir():
            raise BackendError(f"the ds4 setting 'model' is not a folder: {settings.model}")
        return LocalBackend(settings.model)
    raise BackendError(
        "no model configured: set the ds4 setting 'model' (a checkpoint folder) or 'endpoint' "
        "(an OpenAI-compatible server)"
    )


class Ds4Server(LanguageServer):
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

    def buffer_definitions(self, uri: str, rel: str) -> list:
        doc = self.workspace.get_text_document(uri)
        cached = self._buffer_symbols.get(uri)
        if cached is not None and cached[0] == doc.version and doc.version is not None:
            return cached[1]
        language = language_of(rel)
        definitions = extract(language, doc.source.encode("utf-8", "surrogateescape"))[0] if language else []
        self._buffer_symbols[uri] = (doc.version, definitions)
        return definitions

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

    # -- symbols ----------------------------------------------------------------------------------

    def workspace_symbols(self, query: str) -> list[types.SymbolInformation]:
        found: list[tuple[tuple, types.SymbolInformation]] = []
        words = [w.lower() for w in re.findall(r"[\w$]+", query)]
        for root in self.roots:
            unsaved, _ = self.buffers(root)
            open_paths = {}
            for uri in list(self.workspace.text_documents):
                try:
                    doc_root, rel = self.locate(uri)
                except JsonRpcInvalidParams:
                    continue
                if doc_root == root and rel in unsaved:
                    open_paths[rel] = uri
            db_path = default_db_path(root)
            rows = []
            if db_path.exists():
                db = open_index(db_path, write=False)
                try:
                    rows = search(db, query, limit=MAX_SYMBOLS) if words else symbols(db)[:MAX_SYMBOLS]
                finally:
                    db.conn.close()
            for order, row in enumerate(rows):
                if row["path"] in open_paths:
                    continue  # the buffer's own symbols stand in for the file's
                path = row["path"]
                info = _symbol(row["name"], row["kind"], root / path, row["line"], row["end_line"], path)
                found.append((_rank(row["name"], query, order), info))
            for rel, uri in open_paths.items():
                for d in self.buffer_definitions(uri, rel):
                    if words and not any(w in d.name.lower() for w in words):
                        continue
                    info = _symbol(d.name, d.kind, root / rel, d.line, d.end_line, rel)
                    found.append((_rank(d.name, query, -1), info))
        found.sort(key=lambda pair: pair[0])
        return [info for _, info in found[:MAX_SYMBOLS]]

    def document_symbols(self, uri: str) -> list[types.SymbolInformation]:
        root, rel = self.locate(uri)
        if self.is_open(uri):
            defs = [(d.name, d.kind, d.line, d.end_line) for d in self.buffer_definitions(uri, rel)]
        else:
            db_path = default_db_path(root)
            if not db_path.exists():
                return []
            db = open_index(db_path, write=False)
            try:
                defs = [(r["name"], r["kind"], r["line"], r["end_line"]) for r in symbols(db, rel)]
            finally:
                db.conn.close()
        return [_symbol(name, kind, root / rel, line, end, rel) for name, kind, line, end in defs]

    # -- the fix loop -----------------------------------------------------------------------------

    def issue_text(self, issue: str, uri: str | None, selection: types.Range | None) -> str:
        if uri is None:
            return issue
        root, rel = self.locate(uri)
        doc = self.workspace.get_text_document(uri)
        lines = doc.source.splitlines()
        if selection is not None:
            first, last = selection.start.line, max(selection.start.line, selection.end.line)
            if selection.end.character == 0 and selection.end.line > selection.start.line:
                last -= 1
            code = "\n".join(lines[first : last + 1])
            return f"{issue}\n\nThe user points at {rel}, lines {first + 1}-{last + 1}:\n```\n{code}\n```"
        return f"{issue}\n\n(The user is looking at {rel}.)"

    async def run_fix(self, issue: str, root: Path, title: str) -> dict:
        """The fix loop over what the editor shows; with progress; returns {status, diff, ...} and, when
        it resolves, the WorkspaceEdit that brings the documents there."""
        from ds4.agent.config import read_config
        from ds4.agent.loop import FixConfig, fix

        backend = await self.get_backend()
        unsaved, versions = self.buffers(root)
        settings = self.settings
        test_cmd = settings.test_command or read_config(root / ".ds4.toml").get("test_cmd")
        config = FixConfig(
            repo=root,
            issue=issue,
            test_cmd=test_cmd,
            rounds=settings.rounds,
            budget=settings.budget,
            generation=GenerationParams(max_tokens=settings.max_tokens),
            overlay=unsaved,
        )
        progress = await self.progress(title, cancellable=True)
        config.cancel = progress.cancelled

        def on_event(event: dict) -> None:
            if progress.cancelled.is_set():
                raise Cancelled
            progress.report(describe(event))

        try:
            result = await asyncio.to_thread(fix, config, backend, on_event)
        except Cancelled:
            progress.end("cancelled")
            return {"status": "cancelled", "diff": "", "applied": False, "edit": None}
        finally:
            self.cancel_events.pop(progress.token or "", None)
        answer = {
            "status": result.status,
            "diff": result.diff,
            "applied": False,
            "message": result.message,
            "runDir": result.run_dir,
            "edit": None,
        }
        if result.status == "resolved":
            try:
                answer["edit"], _ = workspace_edit(
                    root, result.diff, unsaved, versions, self.supports_document_changes()
                )
            except Exception as e:  # the buffers moved under the patch: report, never half-apply
                answer["status"], answer["message"] = "unresolved", f"the patch no longer applies: {e}"
        progress.end(f"{answer['status']}" + (f": {answer['message']}" if answer["message"] else ""))
        return answer

    async def get_backend(self):
        try:
            return await asyncio.to_thread(self.backend)
        except (BackendError, OSError, ValueError) as e:
            self.window_show_message(types.ShowMessageParams(types.MessageType.Error, f"ds4: {_reason(e)}"))
            raise RequestFailed(_reason(e)) from None

    async def ask_model(self, root: Path, question: str, instructions: str, title: str) -> str:
        from ds4.agent.loop import ApproxCounter
        from ds4.agent.pack import TokenCounter, pack

        backend = await self.get_backend()
        unsaved, _ = self.buffers(root)
        progress = await self.progress(title)
        try:

            def work() -> str:
                counter = TokenCounter(backend.tokenizer_file) if backend.tokenizer_file else ApproxCounter()
                index_repo(root)
                db = open_index(default_db_path(root))
                try:
                    packed = pack(db, root, question, self.settings.budget, counter, overlay=unsaved)
                finally:
                    db.conn.close()
                messages = [
                    {"role": "system", "content": instructions},
                    {"role": "user", "content": packed.prompt},
                ]
                params = GenerationParams(max_tokens=self.settings.max_tokens)
                return backend.complete(messages, params).text

            text = await asyncio.to_thread(work)
        except (BackendError, IndexDatabaseError, OSError) as e:
            progress.end(f"failed: {_reason(e)}")
            raise RequestFailed(f"the model failed: {_reason(e)}") from None
        progress.end("done")
        return text


class Progress:
    """One `$/progress` token's begin/report/end, callable from any thread (sends go through the
    event loop); without a token (the client has no progress support) it only records."""

    def __init__(self, server: Ds4Server, token: str | None, loop: asyncio.AbstractEventLoop):
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


def _symbol(name: str, kind: str, path: Path, line: int, end_line: int, container: str):
    return types.SymbolInformation(
        name=name,
        kind=KINDS.get(kind, types.SymbolKind.Variable),
        location=types.Location(
            uri=from_fs_path(str(path)),
            range=types.Range(types.Position(line - 1, 0), types.Position(max(end_line - 1, line - 1), 0)),
        ),
        container_name=container,
    )


def _rank(name: str, query: str, order: int) -> tuple:
    query = query.strip()
    return (name != query, name.lower() != query.lower(), not name.lower().startswith(query.lower()), order)


def create_server(backend_factory=make_backend, watch: bool = True) -> Ds4Server:
    """The server with its features registered; `watch`: keep the index fresh from file events."""
    server = Ds4Server(backend_factory, watch)

    @server.feature(types.INITIALIZE)
    def initialize(ls: Ds4Server, params: types.InitializeParams) -> None:
        ls.apply_settings(params.initialization_options)

    @server.feature(types.INITIALIZED)
    async def initialized(ls: Ds4Server, params: types.InitializedParams) -> None:
        ls.roots = ls.find_roots()
        if not ls.roots:
            ls.window_show_message(
                types.ShowMessageParams(types.MessageType.Warning, "ds4: no workspace folder to index")
            )
        await ls.index_all()
        if ls.watch:
            ls.start_watchers()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: Ds4Server, params: types.DidChangeConfigurationParams) -> None:
        ls.apply_settings(params.settings)

    @server.feature(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
    async def did_change_folders(ls: Ds4Server, params: types.DidChangeWorkspaceFoldersParams) -> None:
        ls.stop_watchers()
        ls.roots = ls.find_roots()
        await ls.index_all()
        if ls.watch:
            ls.start_watchers()

    @server.feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: Ds4Server, params: types.DidSaveTextDocumentParams) -> None:
        ls.hint(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: Ds4Server, params: types.DidCloseTextDocumentParams) -> None:
        ls._buffer_symbols.pop(params.text_document.uri, None)
        ls.hint(params.text_document.uri)

    @server.feature(types.WINDOW_WORK_DONE_PROGRESS_CANCEL)
    def progress_cancel(ls: Ds4Server, params: types.WorkDoneProgressCancelParams) -> None:
        event = ls.cancel_events.get(str(params.token))
        if event is not None:
            event.set()

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: Ds4Server, *args) -> None:
        ls.stop_watchers()

    @server.feature(types.WORKSPACE_SYMBOL)
    async def workspace_symbol(ls: Ds4Server, params: types.WorkspaceSymbolParams):
        await ls.indexed.wait()
        return ls.workspace_symbols(params.query)

    @server.feature(types.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
    def document_symbol(ls: Ds4Server, params: types.DocumentSymbolParams):
        return ls.document_symbols(params.text_document.uri)

    @server.command("ds4.fix")
    async def fix_command(ls: Ds4Server, *args):
        arg = _one_object(args, "ds4.fix", "{issue, uri?, range?}")
        issue = arg.get("issue")
        if not isinstance(issue, str) or not issue.strip():
            raise JsonRpcInvalidParams("ds4.fix needs a non-empty 'issue' string")
        uri, selection = _location(ls, arg)
        root = ls.locate(uri)[0] if uri else _first_root(ls)
        await ls.indexed.wait()
        answer = await ls.run_fix(ls.issue_text(issue, uri, selection), root, "ds4: fix")
        edit = answer.pop("edit")
        if edit is not None:
            response = await ls.workspace_apply_edit_async(
                types.ApplyWorkspaceEditParams(edit=edit, label="ds4: fix")
            )
            answer["applied"] = bool(response and response.applied)
            if not answer["applied"]:
                reason = getattr(response, "failure_reason", None)
                answer["message"] = f"the editor did not apply the edit: {reason}"
        return answer

    @server.command("ds4.explain")
    async def explain_command(ls: Ds4Server, *args):
        arg = _one_object(args, "ds4.explain", "{uri, range}")
        uri, selection = _location(ls, arg)
        if uri is None or selection is None:
            raise JsonRpcInvalidParams("ds4.explain needs 'uri' and 'range'")
        root, rel = ls.locate(uri)
        question = ls.issue_text("Explain this code.", uri, selection)
        text = await ls.ask_model(root, question, EXPLAIN, f"ds4: explaining {rel}")
        ls.window_log_message(types.LogMessageParams(types.MessageType.Info, text))
        return {"markdown": text}

    @server.command("ds4.ask")
    async def ask_command(ls: Ds4Server, *args):
        arg = _one_object(args, "ds4.ask", "{question}")
        question = arg.get("question")
        if not isinstance(question, str) or not question.strip():
            raise JsonRpcInvalidParams("ds4.ask needs a non-empty 'question' string")
        root = _first_root(ls)
        await ls.indexed.wait()
        text = await ls.ask_model(root, question, ASK, "ds4: asking")
        return {"answer": text, "references": _references(root, text)}

    @server.command("ds4.reindex")
    async def reindex_command(ls: Ds4Server, *args):
        if len(args) > 1 or (args and args[0] not in (None, {})):
            raise JsonRpcInvalidParams("ds4.reindex takes no arguments")
        return {"roots": await ls.index_all()}

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.QuickFix], resolve_provider=True),
    )
    def code_action(ls: Ds4Server, params: types.CodeActionParams):
        uri = params.text_document.uri
        try:
            ls.locate(uri)
        except JsonRpcInvalidParams:
            return []
        selected = params.range.start != params.range.end
        if not params.context.diagnostics and not selected:
            return []
        problems = [d.message for d in params.context.diagnostics]
        data = {
            "uri": uri,
            "range": ls.protocol._converter.unstructure(params.range),
            "problems": problems,
        }
        title = "Fix with ds4" + (f": {problems[0][:60]}" if problems else "")
        return [
            types.CodeAction(
                title=title,
                kind=types.CodeActionKind.QuickFix,
                diagnostics=params.context.diagnostics or None,
                data=data,
            )
        ]

    @server.feature(types.CODE_ACTION_RESOLVE)
    async def code_action_resolve(ls: Ds4Server, action: types.CodeAction) -> types.CodeAction:
        data = action.data if isinstance(action.data, dict) else {}
        uri, selection = _location(ls, data)
        if uri is None:
            raise JsonRpcInvalidParams("this code action carries no document: ask for code actions again")
        problems = [p for p in data.get("problems") or [] if isinstance(p, str)]
        issue = "Fix this: " + "; ".join(problems) if problems else "Fix the problem in the selected code."
        root = ls.locate(uri)[0]
        await ls.indexed.wait()
        answer = await ls.run_fix(ls.issue_text(issue, uri, selection), root, "ds4: fixing")
        if answer["edit"] is not None:
            action.edit = answer["edit"]  # computed now, against the documents' current versions
        else:
            ls.window_show_message(
                types.ShowMessageParams(
                    types.MessageType.Warning,
                    f"ds4 found no passing fix ({answer['status']}): {answer['message']}",
                )
            )
        return action

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: Ds4Server, params: types.InlineCompletionParams):
        uri = params.text_document.uri
        seq = ls.completion_seq.get(uri, 0) + 1
        ls.completion_seq[uri] = seq
        await asyncio.sleep(ls.settings.debounce_ms / 1000)
        if ls.completion_seq.get(uri) != seq:
            return types.InlineCompletionList(items=[])  # a newer request for this document wins
        root, rel = ls.locate(uri)
        doc = ls.workspace.get_text_document(uri)
        offset = doc.offset_at_position(params.position)
        prefix, suffix = doc.source[:offset], doc.source[offset:]
        backend = await ls.get_backend()
        context = _completion_context(ls, root, rel, prefix)
        request = GenerationParams(max_tokens=ls.settings.completion_tokens)
        try:
            completion = await asyncio.to_thread(
                backend.infill, context + prefix[-6000:], suffix[:2000], request
            )
        except BackendError as e:
            raise RequestFailed(f"completion failed: {_reason(e)}") from None
        if ls.completion_seq.get(uri) != seq or not completion.text:
            return types.InlineCompletionList(items=[])
        here = types.Range(params.position, params.position)
        item = types.InlineCompletionItem(insert_text=completion.text, range=here)
        return types.InlineCompletionList(items=[item])

    return server


def _reason(error: BaseException) -> str:
    """What went wrong, never blank: some errors (a timeout, a dropped connection) carry no message."""
    text = str(error).strip()
    if not text and error.__cause__ is not None:
        return f"{type(error).__name__}: {_reason(error.__cause__)}"
    return text or type(error).__name__


def _one_object(args: tuple, command: str, shape: str) -> dict:
    if len(args) != 1 or not isinstance(args[0], dict):
        raise JsonRpcInvalidParams(f"{command} takes one argument object {shape}, got {list(args)!r}")
    return args[0]


def _location(ls: Ds4Server, arg: dict) -> tuple[str | None, types.Range | None]:
    uri, raw_range = arg.get("uri"), arg.get("range")
    if uri is not None and not isinstance(uri, str):
        raise JsonRpcInvalidParams("'uri' must be a string")
    if uri is not None:
        ls.locate(uri)
    selection = None
    if raw_range is not None:
        try:
            selection = ls.protocol._converter.structure(raw_range, types.Range)
        except Exception:
            raise JsonRpcInvalidParams(f"'range' must be an LSP Range, got {raw_range!r}") from None
    return uri, selection


def _first_root(ls: Ds4Server) -> Path:
    if not ls.roots:
        raise JsonRpcInvalidParams("no workspace folder: open a folder (the repository) first")
    return ls.roots[0]


def _references(root: Path, text: str) -> list[dict]:
    """The repository files an answer names (path or path:line), as LSP locations."""
    found, seen = [], set()
    for match in re.finditer(r"([\w./-]+\.\w+)(?::(\d+))?", text):
        rel, line = match.group(1).lstrip("./"), int(match.group(2) or 1)
        path = (root / rel).resolve()
        if (rel, line) in seen or not path.is_file() or not path.is_relative_to(root):
            continue
        seen.add((rel, line))
        position = {"line": max(line - 1, 0), "character": 0}
        found.append({"uri": from_fs_path(str(path)), "range": {"start": position, "end": position}})
    return found


def _completion_context(ls: Ds4Server, root: Path, rel: str, prefix: str) -> str:
    """Repository context ahead of the file: the definitions (signature and doc) of names used near
    the cursor that live in other files, as comment-free path-tagged blocks, a few hundred tokens."""
    db_path = default_db_path(root)
    if not db_path.exists():
        return ""
    names = list(dict.fromkeys(re.findall(r"[A-Za-z_]\w{2,}", prefix[-1500:])))[-30:]
    db = open_index(db_path, write=False)
    try:
        lines, size = [], 0
        for name in reversed(names):
            for row in search(db, name, limit=3):
                if row["name"] != name or row["path"] == rel:
                    continue
                line = f"{row['path']}:{row['line']}: {row['signature']}"
                if size + len(line) > 2000:
                    break
                lines.append(line)
                size += len(line)
    finally:
        db.conn.close()
    if not lines:
        return ""
    header = "# Related definitions elsewhere in the repository:\n"
    return header + "".join(f"# {x}\n" for x in lines) + f"# {rel}\n"
