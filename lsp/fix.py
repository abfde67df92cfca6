"""The model behind the editor's requests: the fix loop (ds4.fix, code actions) and questions answered
over the packed repository (ds4.explain, ds4.ask), each on what the editor shows (unsaved buffers) and
reporting `$/progress`. It builds the loop's inputs and reads its results; the loop itself is agent's."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from lsprotocol import types

from ds4.agent.backends import BackendError, GenerationParams
from ds4.agent.errors import Cancelled, FixError
from ds4.agent.events import describe
from ds4.agent.fit import EDITOR_SETTINGS, budget_for
from ds4.agent.index.indexer import default_db_path, index_repo
from ds4.agent.index.store import IndexDatabaseError, open_index
from ds4.lsp.edits import workspace_edit
from ds4.lsp.errors import RequestFailed, reason
from ds4.lsp.settings import Settings

if TYPE_CHECKING:
    from ds4.agent.config import FixConfig
    from ds4.agent.loop import FixResult
    from ds4.lsp.server import Ds4Server

PROMPTS = files("ds4.agent") / "prompts"


def instructions(name: str) -> str:
    """The system prompt `agent/prompts/<name>.md`; the file's final newline is not part of it."""
    return (PROMPTS / f"{name}.md").read_text(encoding="utf-8").rstrip("\n")


def issue_text(issue: str, rel: str | None, source: str, selection: types.Range | None) -> str:
    """The issue as the model reads it: with the selected lines of the document at `rel` quoted, or a
    note of which file the user is looking at."""
    if rel is None:
        return issue
    lines = source.splitlines()
    if selection is not None:
        first, last = selection.start.line, max(selection.start.line, selection.end.line)
        if selection.end.character == 0 and selection.end.line > selection.start.line:
            last -= 1
        code = "\n".join(lines[first : last + 1])
        return f"{issue}\n\nThe user points at {rel}, lines {first + 1}-{last + 1}:\n```\n{code}\n```"
    return f"{issue}\n\n(The user is looking at {rel}.)"


def fix_config(root: Path, issue: str, settings: Settings, unsaved: dict[str, str]) -> FixConfig:
    """The loop's configuration from the editor's settings (the test command: the setting, else the
    repository's .ds4.toml, else detected by the loop), packing the unsaved buffers."""
    from ds4.agent.config import FixConfig, read_config

    test_cmd = settings.test_command or read_config(root / ".ds4.toml").get("test_cmd")
    return FixConfig(
        repo=root,
        issue=issue,
        test_cmd=test_cmd,
        rounds=settings.rounds,
        budget=settings.budget,
        generation=GenerationParams(max_tokens=settings.max_tokens),
        overlay=unsaved,
        setting_names=EDITOR_SETTINGS,
    )


def answer_of(result: FixResult) -> dict:
    """The fix's answer to the editor, before any edit is made from it."""
    return {
        "status": result.status,
        "diff": result.diff,
        "applied": False,
        "message": result.message,
        "runDir": result.run_dir,
        "edit": None,
    }


async def run_fix(ls: Ds4Server, issue: str, root: Path, title: str) -> dict:
    """The fix loop over what the editor shows; with progress; returns {status, diff, ...} and, when
    it resolves, the WorkspaceEdit that brings the documents there."""
    from ds4.agent.loop import fix

    backend = await ls.get_backend()
    unsaved, versions = ls.buffers(root)
    config = fix_config(root, issue, ls.settings, unsaved)
    progress = await ls.progress(title, cancellable=True)
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
        ls.cancel_events.pop(progress.token or "", None)
    answer = answer_of(result)
    if result.status == "resolved":
        try:
            answer["edit"], _ = workspace_edit(
                root, result.diff, unsaved, versions, ls.supports_document_changes()
            )
        except Exception as e:  # the buffers moved under the patch: report, never half-apply
            answer["status"], answer["message"] = "unresolved", f"the patch no longer applies: {e}"
    progress.end(f"{answer['status']}" + (f": {answer['message']}" if answer["message"] else ""))
    return answer


async def ask_model(ls: Ds4Server, root: Path, question: str, prompt: str, title: str) -> str:
    """The model's answer to `question` over the packed repository (unsaved buffers included), with the
    system prompt `agent/prompts/<prompt>.md`."""
    from ds4.agent.pack import pack
    from ds4.agent.tokens import ApproxCounter, TokenCounter

    backend = await ls.get_backend()
    unsaved, _ = ls.buffers(root)
    progress = await ls.progress(title)
    try:

        def work() -> str:
            counter = TokenCounter(backend.tokenizer_file) if backend.tokenizer_file else ApproxCounter()
            system, max_tokens = instructions(prompt), ls.settings.max_tokens
            budget = ls.settings.budget or budget_for(
                backend.max_model_len, max_tokens, counter.count(system), rounds=1, names=EDITOR_SETTINGS
            )
            index_repo(root)
            with open_index(default_db_path(root)) as db:
                packed = pack(db, root, question, budget, counter, overlay=unsaved)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": packed.prompt}]
            return backend.complete(messages, GenerationParams(max_tokens=max_tokens)).text

        text = await asyncio.to_thread(work)
    except (BackendError, FixError, IndexDatabaseError, OSError) as e:
        progress.end(f"failed: {reason(e)}")
        raise RequestFailed(f"the model failed: {reason(e)}") from None
    progress.end("done")
    return text
