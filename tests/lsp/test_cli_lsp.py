"""`ds4-agent lsp` itself (no test double): over TCP with the engine in-process on a tiny checkpoint
(inline completion through the real fill-in-the-middle path), and over stdio with bad settings."""

from __future__ import annotations

import asyncio
import subprocess

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient
from pygls.uris import from_fs_path

from tests.fakes import BUGGY, make_repo
from tests.servers import EXE, free_port


def initialize_params(repo, options) -> types.InitializeParams:
    return types.InitializeParams(
        capabilities=types.ClientCapabilities(),
        workspace_folders=[types.WorkspaceFolder(uri=from_fs_path(str(repo)), name="repo")],
        initialization_options=options,
    )


def test_lsp_over_tcp_completes_with_the_engine_in_process(tiny_v3, tmp_path):
    repo = make_repo(tmp_path / "repo", BUGGY)
    port = free_port()
    with open(tmp_path / "lsp.log", "w") as log:
        server = subprocess.Popen([EXE, "lsp", "--tcp", f"127.0.0.1:{port}"], stdout=log, stderr=log)
    try:

        async def scenario():
            client = LanguageClient("tcp-test", "1")
            for _ in range(200):  # until it listens (a probe connection would be taken as the client)
                try:
                    await client.start_tcp("127.0.0.1", port)
                    break
                except OSError:
                    assert server.poll() is None, (tmp_path / "lsp.log").read_text()
                    await asyncio.sleep(0.1)
            init = await client.initialize_async(
                initialize_params(repo, {"model": str(tiny_v3), "completionTokens": 8})
            )
            assert init.capabilities.inline_completion_provider is not None
            client.initialized(types.InitializedParams())
            uri = from_fs_path(str(repo / "calc.py"))
            text = BUGGY["calc.py"]
            item = types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
            client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=item))
            found = []
            for _ in range(100):  # indexing runs after `initialized`; symbols wait for it
                found = await client.workspace_symbol_async(types.WorkspaceSymbolParams(query="add"))
                if found:
                    break
            assert found[0].name == "add"
            result = await client.text_document_inline_completion_async(
                types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri=uri),
                    position=types.Position(1, 11),
                    context=types.InlineCompletionContext(
                        trigger_kind=types.InlineCompletionTriggerKind.Invoked
                    ),
                )
            )
            assert isinstance(result, types.InlineCompletionList)
            assert all(i.range.start == types.Position(1, 11) for i in result.items)
            await client.shutdown_async(None)
            client.exit(None)

        asyncio.run(asyncio.wait_for(scenario(), 180))
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()


def test_lsp_over_stdio_reports_bad_settings_and_a_missing_model(tmp_path):
    repo = make_repo(tmp_path / "repo", BUGGY)
    messages = []

    async def scenario():
        client = LanguageClient("stdio-test", "1")

        @client.feature(types.WINDOW_SHOW_MESSAGE)
        def show(params):
            messages.append(params.message)

        await client.start_io(EXE, "lsp")
        await client.initialize_async(initialize_params(repo, {"model": 42, "budget": 10}))
        client.initialized(types.InitializedParams())
        try:
            await client.workspace_execute_command_async(
                types.ExecuteCommandParams(command="ds4.ask", arguments=[{"question": "what is calc?"}])
            )
            raise AssertionError("ds4.ask answered without a model")
        except JsonRpcException as e:
            assert "no model configured" in str(e)
        found = await client.workspace_symbol_async(types.WorkspaceSymbolParams(query="mul"))
        assert found[0].name == "mul"  # the server keeps serving
        await client.shutdown_async(None)
        client.exit(None)
        await asyncio.wait_for(client.stop(), 30)
        return client._server.returncode

    assert asyncio.run(scenario()) == 0
    joined = " ".join(messages)
    assert "'model' must be a string" in joined and "'budget' must be at least 256" in joined
    assert "no model configured" in joined
