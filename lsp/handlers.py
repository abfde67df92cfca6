"""The LSP features and ds4 commands: each handler checks its arguments and calls a feature function
(symbols.py, completion.py, fix.py) or the server's workspace helpers. `FEATURES` and `COMMANDS` are what
create_server registers, in this order (the advertised capabilities follow it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lsprotocol import converters, types
from pygls.exceptions import JsonRpcInvalidParams

from ds4.agent.backends import BackendError, GenerationParams
from ds4.lsp import completion, symbols
from ds4.lsp.errors import RequestFailed, reason
from ds4.lsp.fix import ask_model, issue_text, run_fix
from ds4.lsp.server import Ds4Server

CONVERTER = converters.get_converter()  # LSP types <-> JSON, for ranges carried in command arguments


# -- lifecycle, settings, the workspace -------------------------------------------------------------


def initialize(ls: Ds4Server, params: types.InitializeParams) -> None:
    ls.apply_settings(params.initialization_options)


async def initialized(ls: Ds4Server, params: types.InitializedParams) -> None:
    ls.roots = ls.find_roots()
    if not ls.roots:
        ls.window_show_message(
            types.ShowMessageParams(types.MessageType.Warning, "ds4: no workspace folder to index")
        )
    await ls.index_all()
    if ls.watch:
        ls.start_watchers()


def did_change_configuration(ls: Ds4Server, params: types.DidChangeConfigurationParams) -> None:
    ls.apply_settings(params.settings)


async def did_change_folders(ls: Ds4Server, params: types.DidChangeWorkspaceFoldersParams) -> None:
    ls.stop_watchers()
    ls.roots = ls.find_roots()
    await ls.index_all()
    if ls.watch:
        ls.start_watchers()


def did_save(ls: Ds4Server, params: types.DidSaveTextDocumentParams) -> None:
    ls.hint(params.text_document.uri)


def did_close(ls: Ds4Server, params: types.DidCloseTextDocumentParams) -> None:
    ls.forget_buffer(params.text_document.uri)
    ls.hint(params.text_document.uri)


def progress_cancel(ls: Ds4Server, params: types.WorkDoneProgressCancelParams) -> None:
    event = ls.cancel_events.get(str(params.token))
    if event is not None:
        event.set()


def shutdown(ls: Ds4Server, *args) -> None:
    ls.stop_watchers()


# -- symbols ----------------------------------------------------------------------------------------


async def workspace_symbol(ls: Ds4Server, params: types.WorkspaceSymbolParams):
    await ls.indexed.wait()
    return symbols.workspace_symbols(params.query, {root: ls.unsaved_definitions(root) for root in ls.roots})


def document_symbol(ls: Ds4Server, params: types.DocumentSymbolParams):
    uri = params.text_document.uri
    root, rel = ls.locate(uri)
    definitions = ls.buffer_definitions(uri, rel) if ls.is_open(uri) else None
    return symbols.document_symbols(root, rel, definitions)


# -- commands ---------------------------------------------------------------------------------------


async def fix_command(ls: Ds4Server, *args):
    arg = _one_object(args, "ds4.fix", "{issue, uri?, range?}")
    issue = arg.get("issue")
    if not isinstance(issue, str) or not issue.strip():
        raise JsonRpcInvalidParams("ds4.fix needs a non-empty 'issue' string")
    uri, selection = _location(ls, arg)
    root = ls.locate(uri)[0] if uri else _first_root(ls)
    await ls.indexed.wait()
    answer = await run_fix(ls, _issue_at(ls, issue, uri, selection), root, "ds4: fix")
    edit = answer.pop("edit")
    if edit is not None:
        response = await ls.workspace_apply_edit_async(
            types.ApplyWorkspaceEditParams(edit=edit, label="ds4: fix")
        )
        answer["applied"] = bool(response and response.applied)
        if not answer["applied"]:
            answer["message"] = (
                f"the editor did not apply the edit: {getattr(response, 'failure_reason', None)}"
            )
    return answer


async def explain_command(ls: Ds4Server, *args):
    arg = _one_object(args, "ds4.explain", "{uri, range}")
    uri, selection = _location(ls, arg)
    if uri is None or selection is None:
        raise JsonRpcInvalidParams("ds4.explain needs 'uri' and 'range'")
    root, rel = ls.locate(uri)
    question = _issue_at(ls, "Explain this code.", uri, selection)
    text = await ask_model(ls, root, question, "explain", f"ds4: explaining {rel}")
    ls.window_log_message(types.LogMessageParams(types.MessageType.Info, text))
    return {"markdown": text}


async def ask_command(ls: Ds4Server, *args):
    arg = _one_object(args, "ds4.ask", "{question}")
    question = arg.get("question")
    if not isinstance(question, str) or not question.strip():
        raise JsonRpcInvalidParams("ds4.ask needs a non-empty 'question' string")
    root = _first_root(ls)
    await ls.indexed.wait()
    text = await ask_model(ls, root, question, "ask", "ds4: asking")
    return {"answer": text, "references": symbols.references(root, text)}


async def reindex_command(ls: Ds4Server, *args):
    if len(args) > 1 or (args and args[0] not in (None, {})):
        raise JsonRpcInvalidParams("ds4.reindex takes no arguments")
    return {"roots": await ls.index_all()}


# -- code actions and completion --------------------------------------------------------------------


def code_action(ls: Ds4Server, params: types.CodeActionParams):
    """A lazy "Fix with ds4" where there are diagnostics or a selection; resolving it runs the fix."""
    uri = params.text_document.uri
    try:
        ls.locate(uri)
    except JsonRpcInvalidParams:
        return []
    selected = params.range.start != params.range.end
    if not params.context.diagnostics and not selected:
        return []
    problems = [d.message for d in params.context.diagnostics]
    data = {"uri": uri, "range": CONVERTER.unstructure(params.range), "problems": problems}
    title = "Fix with ds4" + (f": {problems[0][:60]}" if problems else "")
    action = types.CodeAction(
        title=title,
        kind=types.CodeActionKind.QuickFix,
        diagnostics=params.context.diagnostics or None,
        data=data,
    )
    return [action]


async def code_action_resolve(ls: Ds4Server, action: types.CodeAction) -> types.CodeAction:
    data = action.data if isinstance(action.data, dict) else {}
    uri, selection = _location(ls, data)
    if uri is None:
        raise JsonRpcInvalidParams("this code action carries no document: ask for code actions again")
    problems = [p for p in data.get("problems") or [] if isinstance(p, str)]
    issue = "Fix this: " + "; ".join(problems) if problems else "Fix the problem in the selected code."
    root = ls.locate(uri)[0]
    await ls.indexed.wait()
    answer = await run_fix(ls, _issue_at(ls, issue, uri, selection), root, "ds4: fixing")
    if answer["edit"] is not None:
        action.edit = answer["edit"]  # computed now, against the documents' current versions
    else:
        message = f"ds4 found no passing fix ({answer['status']}): {answer['message']}"
        ls.window_show_message(types.ShowMessageParams(types.MessageType.Warning, message))
    return action


async def inline_completion(ls: Ds4Server, params: types.InlineCompletionParams):
    """Fill-in-the-middle at the cursor, after a debounce; a newer request for the document wins."""
    uri = params.text_document.uri
    seq = ls.completion_seq.get(uri, 0) + 1
    ls.completion_seq[uri] = seq
    await asyncio.sleep(ls.settings.debounce_ms / 1000)
    if ls.completion_seq.get(uri) != seq:
        return types.InlineCompletionList(items=[])  # a newer request for this document wins
    root, rel = ls.locate(uri)
    doc = ls.workspace.get_text_document(uri)
    offset = doc.offset_at_position(params.position)
    backend = await ls.get_backend()
    prefix, suffix = completion.infill_inputs(root, rel, doc.source, offset)
    request = GenerationParams(max_tokens=ls.settings.completion_tokens)
    try:
        done = await asyncio.to_thread(backend.infill, prefix, suffix, request)
    except BackendError as e:
        raise RequestFailed(f"completion failed: {reason(e)}") from None
    if ls.completion_seq.get(uri) != seq or not done.text:
        return types.InlineCompletionList(items=[])
    item = types.InlineCompletionItem(
        insert_text=done.text, range=types.Range(params.position, params.position)
    )
    return types.InlineCompletionList(items=[item])


# -- arguments --------------------------------------------------------------------------------------


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
            selection = CONVERTER.structure(raw_range, types.Range)
        except Exception:
            raise JsonRpcInvalidParams(f"'range' must be an LSP Range, got {raw_range!r}") from None
    return uri, selection


def _first_root(ls: Ds4Server) -> Path:
    if not ls.roots:
        raise JsonRpcInvalidParams("no workspace folder: open a folder (the repository) first")
    return ls.roots[0]


def _issue_at(ls: Ds4Server, issue: str, uri: str | None, selection: types.Range | None) -> str:
    if uri is None:
        return issue
    rel = ls.locate(uri)[1]
    return issue_text(issue, rel, ls.workspace.get_text_document(uri).source, selection)


FEATURES = [  # (method, options, handler)
    (types.INITIALIZE, None, initialize),
    (types.INITIALIZED, None, initialized),
    (types.WORKSPACE_DID_CHANGE_CONFIGURATION, None, did_change_configuration),
    (types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS, None, did_change_folders),
    (types.TEXT_DOCUMENT_DID_SAVE, None, did_save),
    (types.TEXT_DOCUMENT_DID_CLOSE, None, did_close),
    (types.WINDOW_WORK_DONE_PROGRESS_CANCEL, None, progress_cancel),
    (types.SHUTDOWN, None, shutdown),
    (types.WORKSPACE_SYMBOL, None, workspace_symbol),
    (types.TEXT_DOCUMENT_DOCUMENT_SYMBOL, None, document_symbol),
    (
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.QuickFix], resolve_provider=True),
        code_action,
    ),
    (types.CODE_ACTION_RESOLVE, None, code_action_resolve),
    (types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions(), inline_completion),
]
COMMANDS = [
    ("ds4.fix", fix_command),
    ("ds4.explain", explain_command),
    ("ds4.ask", ask_command),
    ("ds4.reindex", reindex_command),
]
