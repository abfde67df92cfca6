"""The language server end to end over stdio, driven by pygls' LanguageClient, with the scripted backend
(the named test double for the model) in the server process: indexing with progress, symbols from the
index and from unsaved buffers, ds4.fix applying a workspace edit that makes the tests pass, a code
action resolved to an edit, inline completion, bad input, and a clean shutdown."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient
from pygls.uris import from_fs_path, to_fs_path

from tests.fakes import BUGGY, RIGHT, make_repo

ISSUE = "add(2, 3) returns -1 instead of 5"
NEW = "\n\ndef brand_new_helper():\n    return 41\n"


def offset(text: str, position: types.Position) -> int:
    """A UTF-16 LSP position as an index into `text`."""
    lines = text.splitlines(keepends=True)
    if position.line >= len(lines):
        return len(text)
    start = sum(len(line) for line in lines[: position.line])
    units, i, line = 0, 0, lines[position.line]
    while i < len(line) and units < position.character:
        units += len(line[i].encode("utf-16-le")) // 2
        i += 1
    return start + i


def apply_edits(text: str, edits) -> str:
    for edit in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character), reverse=True):
        text = text[: offset(text, edit.range.start)] + edit.new_text + text[offset(text, edit.range.end) :]
    return text


class Editor:
    """A minimal editor around pygls' client: open documents, progress and messages seen, and
    workspace/applyEdit carried out on its buffers (which it then saves, as a user would)."""

    def __init__(self, repo: Path, script: dict, tmp: Path):
        self.repo, self.script_path = repo, tmp / "script.json"
        self.script_path.write_text(json.dumps(script))
        self.client = LanguageClient("ds4-test-editor", "1")
        self.progress: list = []
        self.tokens: list = []  # each progress value's token
        self.messages: list[types.ShowMessageParams] = []
        self.docs: dict[str, tuple[int, str]] = {}
        self.applied: list[types.WorkspaceEdit] = []
        client = self.client

        @client.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
        def create(params):
            return None

        @client.feature(types.PROGRESS)
        def progress(params):  # the value is LSPAny: it arrives as a plain dict
            value = params.value
            self.tokens.append(params.token)
            self.progress.append(
                value if isinstance(value, dict) else client.protocol._converter.unstructure(value)
            )

        @client.feature(types.WINDOW_SHOW_MESSAGE)
        def show(params):
            self.messages.append(params)

        @client.feature(types.WINDOW_LOG_MESSAGE)
        def log(params):
            pass

        @client.feature(types.WORKSPACE_APPLY_EDIT)
        def apply_edit(params: types.ApplyWorkspaceEditParams):
            for change in params.edit.document_changes or []:
                uri = change.text_document.uri
                version, text = self.docs.get(uri, (None, None))
                if text is None:
                    text = Path(to_fs_path(uri)).read_text()
                elif change.text_document.version != version:
                    return types.ApplyWorkspaceEditResult(applied=False, failure_reason="stale version")
                text = apply_edits(text, change.edits)
                Path(to_fs_path(uri)).write_text(text)  # applied, then saved
                if uri in self.docs:
                    self.change(uri, text)
            self.applied.append(params.edit)
            return types.ApplyWorkspaceEditResult(applied=True)

    async def start(self, options: dict | None = None) -> types.InitializeResult:
        await self.client.start_io(sys.executable, "-m", "tests.lsp.scripted_server", str(self.script_path))
        result = await self.client.initialize_async(
            types.InitializeParams(
                capabilities=types.ClientCapabilities(
                    window=types.WindowClientCapabilities(work_done_progress=True),
                    workspace=types.WorkspaceClientCapabilities(
                        apply_edit=True,
                        workspace_edit=types.WorkspaceEditClientCapabilities(document_changes=True),
                    ),
                ),
                workspace_folders=[types.WorkspaceFolder(uri=from_fs_path(str(self.repo)), name="repo")],
                initialization_options=options or {"budget": 4000, "testCommand": "python -m pytest -q -rf"},
            )
        )
        self.client.initialized(types.InitializedParams())
        await self.wait(lambda: any(v.get("kind") == "end" for v in self.progress), "indexing")
        return result

    async def wait(self, condition, what: str, timeout: float = 60) -> None:
        for _ in range(int(timeout * 20)):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def uri(self, rel: str) -> str:
        return from_fs_path(str(self.repo / rel))

    def open(self, rel: str) -> str:
        uri, text = self.uri(rel), (self.repo / rel).read_text()
        self.docs[uri] = (1, text)
        item = types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=item))
        return uri

    def change(self, uri: str, text: str) -> None:
        version = self.docs[uri][0] + 1
        self.docs[uri] = (version, text)
        self.client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)],
            )
        )

    async def symbols(self, query: str) -> list:
        return await self.client.workspace_symbol_async(types.WorkspaceSymbolParams(query=query)) or []

    async def command(self, name: str, *arguments):
        params = types.ExecuteCommandParams(command=name, arguments=list(arguments))
        return await self.client.workspace_execute_command_async(params)

    async def stop(self) -> int:
        await self.client.shutdown_async(None)
        self.client.exit(None)
        await asyncio.wait_for(self.client.stop(), 30)
        return self.client._server.returncode


def asked(editor: Editor) -> list[dict]:
    path = editor.script_path.with_suffix(".asked.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def repo(tmp_path):
    return make_repo(tmp_path / "repo", BUGGY)


def test_the_main_flow_over_stdio(repo, tmp_path):
    async def scenario():
        editor = Editor(repo, {"answers": [RIGHT, RIGHT], "infill": "a + b"}, tmp_path)
        init = await editor.start()
        caps = init.capabilities
        assert caps.inline_completion_provider is not None  # advertised: registered with its options
        assert set(caps.execute_command_provider.commands) == {
            "ds4.fix",
            "ds4.explain",
            "ds4.ask",
            "ds4.reindex",
        }
        assert caps.code_action_provider.resolve_provider is True
        begins = [v for v in editor.progress if v["kind"] == "begin"]
        assert begins and "indexing" in begins[0]["title"]

        found = await editor.symbols("mul")
        assert [(s.name, Path(to_fs_path(s.location.uri)).name) for s in found][0] == ("mul", "calc.py")

        uri = editor.open("calc.py")
        editor.change(uri, BUGGY["calc.py"] + NEW)  # unsaved
        found = await editor.symbols("brand_new")
        assert [s.name for s in found] == ["brand_new_helper"]
        assert found[0].location.range.start.line == BUGGY["calc.py"].count("\n") + 2
        outline = await editor.client.text_document_document_symbol_async(
            types.DocumentSymbolParams(text_document=types.TextDocumentIdentifier(uri=uri))
        )
        assert [s.name for s in outline] == ["add", "mul", "brand_new_helper"]

        actions = await editor.client.text_document_code_action_async(
            types.CodeActionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                range=types.Range(types.Position(1, 0), types.Position(1, 16)),
                context=types.CodeActionContext(
                    diagnostics=[
                        types.Diagnostic(
                            range=types.Range(types.Position(1, 4), types.Position(1, 16)),
                            message="test_add fails: add(2, 3) == -1",
                        )
                    ]
                ),
            )
        )
        assert len(actions) == 1 and actions[0].title.startswith("Fix with ds4") and actions[0].edit is None
        resolved = await editor.client.code_action_resolve_async(actions[0])
        [doc_edit] = resolved.edit.document_changes
        assert doc_edit.text_document.version == 2  # against the buffer as it is now
        assert apply_edits(editor.docs[uri][1], doc_edit.edits) == (
            BUGGY["calc.py"].replace("a - b", "a + b") + NEW
        )

        answer = await editor.command("ds4.fix", {"issue": ISSUE, "uri": uri})
        assert answer["status"] == "resolved" and answer["applied"] is True, answer
        assert "+    return a + b" in answer["diff"] and "brand_new_helper" not in answer["diff"]
        fix_reports = [v.get("message") for v in editor.progress if v["kind"] == "report"]
        assert any("tests pass" in (m or "") for m in fix_reports)
        prompt = asked(editor)[-1]["payload"][-1]["content"]
        assert "def brand_new_helper" in prompt  # the unsaved buffer was packed

        completion = await editor.client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(1, 11),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
            )
        )
        assert [i.insert_text for i in completion.items] == ["a + b"]
        fim = [a for a in asked(editor) if a["kind"] == "infill"][-1]["payload"]
        assert fim["prefix"].endswith("def add(a, b):\n    return ") and fim["suffix"].startswith("a + b\n")
        return await editor.stop()

    assert asyncio.run(scenario()) == 0
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"].replace("a - b", "a + b") + NEW
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout


def test_bad_input_gets_errors_and_messages_and_the_server_keeps_serving(repo, tmp_path):
    async def scenario():
        editor = Editor(repo, {"answers": []}, tmp_path)
        await editor.start()
        failures = []
        for name, args in [
            ("ds4.nonsense", []),
            ("ds4.fix", []),
            ("ds4.fix", ["just a string"]),
            ("ds4.fix", [{"issue": ""}]),
            ("ds4.fix", [{"issue": "x", "uri": "file:///elsewhere/x.py"}]),
            ("ds4.fix", [{"issue": "x", "range": {"start": 3}}]),
            ("ds4.explain", [{"uri": editor.uri("calc.py")}]),
            ("ds4.reindex", ["extra"]),
        ]:
            with pytest.raises(JsonRpcException) as e:
                await editor.command(name, *args)
            failures.append(str(e.value))
        assert "not defined" in failures[0] and "one argument object" in failures[1]
        assert "outside the workspace" in failures[4] and "LSP Range" in failures[5]

        editor.client.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"ds4": {"budget": "lots", "colour": 1}})
        )
        await editor.wait(lambda: len(editor.messages) >= 2, "settings messages")
        texts = " ".join(m.message for m in editor.messages)
        assert "'budget' must be an integer" in texts and "unknown ds4 setting 'colour'" in texts

        uri = editor.open("calc.py")
        (repo / "calc.py").unlink()  # deleted while open: the buffer still answers
        outline = await editor.client.text_document_document_symbol_async(
            types.DocumentSymbolParams(text_document=types.TextDocumentIdentifier(uri=uri))
        )
        assert [s.name for s in outline] == ["add", "mul"]
        assert [s.name for s in await editor.symbols("mul")][0] == "mul"  # exact names first
        return await editor.stop()

    assert asyncio.run(scenario()) == 0


def test_ask_and_explain_answer_with_the_repository_in_the_prompt(repo, tmp_path):
    answers = ["The sum is in calc.py:2 and its test in tests/test_calc.py:5.", "It subtracts: a bug."]

    async def scenario():
        editor = Editor(repo, {"answers": answers}, tmp_path)
        await editor.start()
        answer = await editor.command("ds4.ask", {"question": "where is add tested?"})
        assert answer["answer"] == answers[0]
        refs = [(Path(to_fs_path(r["uri"])).name, r["range"]["start"]["line"]) for r in answer["references"]]
        assert refs == [("calc.py", 1), ("test_calc.py", 4)]
        uri = editor.open("calc.py")
        selection = {"start": {"line": 0, "character": 0}, "end": {"line": 2, "character": 0}}
        explained = await editor.command("ds4.explain", {"uri": uri, "range": selection})
        assert explained == {"markdown": answers[1]}
        prompts = [a["payload"][-1]["content"] for a in asked(editor)]
        assert "where is add tested?" in prompts[0] and "<issue>" in prompts[0]
        assert "calc.py, lines 1-2" in prompts[1] and "return a - b" in prompts[1]
        return await editor.stop()

    assert asyncio.run(scenario()) == 0


def test_without_a_budget_the_prompt_fits_the_models_context(repo, tmp_path):
    """No budget setting: the question's prompt is packed to what the context leaves beside the answer
    (a fixed 32K would send the whole of a module far larger than this context)."""
    from ds4.agent.tokens import ApproxCounter

    (repo / "helpers").mkdir()
    for n in range(60):  # 60 small modules, together far past this context
        text = "\n\n".join(f"def helper_{n}_{i}(x):\n    return x * {i} + {n * 7} % 13\n" for i in range(5))
        (repo / "helpers" / f"h{n}.py").write_text(text)

    async def scenario():
        editor = Editor(repo, {"answers": ["ok"], "max_model_len": 1500}, tmp_path)
        await editor.start({"testCommand": "python -m pytest -q", "maxTokens": 200})
        assert (await editor.command("ds4.ask", {"question": "where is add tested?"}))["answer"] == "ok"
        messages = asked(editor)[-1]["payload"]
        used = sum(ApproxCounter().count(m["content"]) for m in messages)
        assert 1000 < used <= 1500 - 200, used  # filled up to what the context leaves, and no further
        return await editor.stop()

    assert sum(ApproxCounter().count(p.read_text()) for p in (repo / "helpers").iterdir()) > 4000
    assert asyncio.run(scenario()) == 0


def test_a_fix_cancelled_from_its_progress_leaves_everything_as_it_was(repo, tmp_path):
    async def scenario():
        # the scripted model answers, but the tests it would run are slow: cancel while they run
        editor = Editor(repo, {"answers": [RIGHT]}, tmp_path)
        await editor.start({"budget": 4000, "testCommand": "python -c 'import time; time.sleep(30)'"})
        task = asyncio.ensure_future(editor.command("ds4.fix", {"issue": ISSUE}))
        await editor.wait(lambda: any(v.get("title") == "ds4: fix" for v in editor.progress), "fix progress")
        token = next(
            t for t, v in zip(editor.tokens, editor.progress, strict=True) if v.get("title") == "ds4: fix"
        )
        await asyncio.sleep(1.0)  # the baseline's 30 s test run has started
        editor.client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
        answer = await asyncio.wait_for(task, 20)  # the test run was killed, not waited for
        assert answer["status"] == "cancelled" and not editor.applied
        return await editor.stop()

    assert asyncio.run(scenario()) == 0
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"]
    trees = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert trees.count("\n") == 1  # the loop's worktrees are gone


def test_inline_completion_newest_request_per_document_wins(repo, tmp_path):
    async def scenario():
        editor = Editor(repo, {"infill": "a + b"}, tmp_path)
        await editor.start({"debounceMs": 300})
        uri = editor.open("calc.py")

        def request(character: int):
            return editor.client.text_document_inline_completion_async(
                types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri=uri),
                    position=types.Position(1, character),
                    context=types.InlineCompletionContext(
                        trigger_kind=types.InlineCompletionTriggerKind.Automatic
                    ),
                )
            )

        older = asyncio.ensure_future(request(10))
        await asyncio.sleep(0.05)  # typing goes on: a newer request for the same document
        newer = await request(11)
        assert not (await older).items and [i.insert_text for i in newer.items] == ["a + b"]
        assert (
            len([a for a in asked(editor) if a["kind"] == "infill"]) == 1
        )  # the older never reached the model
        return await editor.stop()

    assert asyncio.run(scenario()) == 0
