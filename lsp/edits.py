"""A patch as an LSP WorkspaceEdit: applied in memory to what the editor shows (unsaved buffers, else the
files on disk), then sent as small line edits against each document's current version, so the client
keeps its cursor, marks and undo history outside the changed lines."""

from __future__ import annotations

import difflib
from pathlib import Path

from lsprotocol import types
from pygls.uris import from_fs_path

from ds4.agent.patch import apply


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def line_edits(old: str, new: str) -> list[types.TextEdit]:
    """The line ranges that differ between `old` and `new`, as TextEdits on `old` (UTF-16 positions)."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)

    def position(line: int) -> types.Position:
        if line < len(a) or not a or a[-1].endswith(("\n", "\r")):
            return types.Position(line=line, character=0)
        last = a[-1]  # past a last line without a newline: its end
        return types.Position(line=len(a) - 1, character=utf16_len(last))

    edits = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            edits.append(types.TextEdit(types.Range(position(i1), position(i2)), "".join(b[j1:j2])))
    return edits


def workspace_edit(
    root: Path,
    diff: str,
    buffers: dict[str, str],
    versions: dict[str, int],
    document_changes: bool = True,
) -> tuple[types.WorkspaceEdit, dict[str, str | None]]:
    """The WorkspaceEdit that turns what the editor shows into the patched files, and those files'
    new texts (None: deleted). `buffers`: unsaved texts by relative path; `versions`: open documents'
    versions by relative path (edits to them carry it, so a stale edit is refused by the client).
    `document_changes` False (a client without that capability): plain `changes` when the patch only
    edits existing files."""
    result = apply(diff, root, write=False, lint=False, base=buffers)
    changes: list = []
    for rel, text in sorted(result.files.items()):
        path = root / rel
        uri = from_fs_path(str(path))
        before = buffers.get(rel)
        if before is None and path.is_file():
            before = path.read_bytes().decode("utf-8", "surrogateescape")
        identifier = types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=versions.get(rel))
        if text is None:
            gone = types.DeleteFileOptions(ignore_if_not_exists=True)
            changes.append(types.DeleteFile(uri=uri, options=gone))
        elif before is None:
            changes.append(types.CreateFile(uri=uri, options=types.CreateFileOptions(ignore_if_exists=True)))
            changes.append(
                types.TextDocumentEdit(
                    text_document=types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=None),
                    edits=[types.TextEdit(types.Range(types.Position(0, 0), types.Position(0, 0)), text)],
                )
            )
        else:
            changes.append(types.TextDocumentEdit(text_document=identifier, edits=line_edits(before, text)))
    plain = all(isinstance(c, types.TextDocumentEdit) for c in changes)
    if not document_changes and plain:
        return types.WorkspaceEdit(changes={c.text_document.uri: c.edits for c in changes}), result.files
    return types.WorkspaceEdit(document_changes=changes), result.files
