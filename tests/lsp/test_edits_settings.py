"""Pieces of the language server without a client: patches as line edits (UTF-16 positions, files
without a final newline, new and deleted files) and settings checking."""

from __future__ import annotations

import pytest
from lsprotocol import types

from ds4.lsp.edits import line_edits, workspace_edit
from ds4.lsp.settings import Settings, read_settings
from tests.lsp.test_server import apply_edits


@pytest.mark.parametrize(
    "old, new",
    [
        ("a\nb\nc\n", "a\nB\nc\n"),
        ("a\nb\nc", "a\nb\nc\nd"),  # no final newline, appended after it
        ("a\nb\nc", "a\nb"),
        ("", "x = 1\n"),
        ("héllo 😀 wörld\nsecond\n", "héllo 😀 wörld\nSECOND\nthird\n"),
        ("x\r\ny\r\n", "x\r\nz\r\n"),
        ("keep\n" * 50, "keep\n" * 20 + "new\n" + "keep\n" * 30),
    ],
)
def test_line_edits_turn_old_into_new(old, new):
    edits = line_edits(old, new)
    assert apply_edits(old, edits) == new
    assert len(edits) <= 2  # only what changed


def test_a_patch_becomes_versioned_edits_on_what_the_editor_shows(tmp_path):
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (tmp_path / "old.py").write_text("x = 1\n")
    buffer = "def add(a, b):\n    return a - b\n\n\ndef unsaved():\n    pass\n"
    diff = (
        "--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n"
        " def add(a, b):\n-    return a - b\n+    return a + b\n"
        "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+y = 2\n"
        "--- a/old.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x = 1\n"
    )
    edit, files = workspace_edit(tmp_path, diff, {"calc.py": buffer}, {"calc.py": 7})
    assert files["calc.py"] == buffer.replace("a - b", "a + b") and files["new.py"] == "y = 2\n"
    assert files["old.py"] is None
    kinds = [type(c).__name__ for c in edit.document_changes]
    assert kinds == ["TextDocumentEdit", "CreateFile", "TextDocumentEdit", "DeleteFile"]
    calc = edit.document_changes[0]
    assert calc.text_document.version == 7 and apply_edits(buffer, calc.edits) == files["calc.py"]
    assert (tmp_path / "calc.py").read_text().endswith("a - b\n") and (tmp_path / "old.py").exists()


def test_clients_without_document_changes_get_plain_changes(tmp_path):
    (tmp_path / "calc.py").write_text("v = 1\n")
    diff = "--- a/calc.py\n+++ b/calc.py\n@@ -1 +1 @@\n-v = 1\n+v = 2\n"
    edit, _ = workspace_edit(tmp_path, diff, {}, {}, document_changes=False)
    assert edit.document_changes is None and list(edit.changes) == [(tmp_path / "calc.py").as_uri()]


def test_settings_are_checked_and_bad_values_keep_the_last_good_one():
    settings, problems = read_settings(
        {"model": "/ckpt", "budget": 9000, "testCommand": "make test"}, Settings()
    )
    assert (settings.model, settings.budget, settings.test_command) == (
        "/ckpt",
        9000,
        "make test",
    ) and not problems
    again, problems = read_settings({"ds4": {"budget": "lots", "rounds": 0, "colour": 1}}, settings)
    assert again == settings and len(problems) == 3
    assert any("'budget' must be an integer" in p for p in problems)
    assert any("unknown ds4 setting 'colour'" in p for p in problems)
    both, problems = read_settings({"endpoint": "http://127.0.0.1:8484"}, settings)
    assert both.model is None and both.endpoint and "exclusive" in problems[0]
    assert read_settings([1, 2], settings) == (settings, ["ds4 settings must be an object, not list"])
    assert read_settings({"budget": None}, settings)[0].budget == Settings().budget
    assert read_settings({"budget": True}, settings)[1]  # a boolean is not an integer here


def test_positions_count_utf16_units():
    [edit] = line_edits("😀", "😀x")
    assert edit.range == types.Range(types.Position(0, 0), types.Position(0, 2))  # one emoji: 2 units
