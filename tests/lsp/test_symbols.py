"""symbols.py and completion.py called directly, over a freshly indexed folder: an unsaved buffer's
definitions stand in for its indexed file's, exact names come first, outlines come from the buffer or the
index, an answer's file references resolve, and completion context names definitions in other files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pygls.uris import to_fs_path

from ds4.agent.index.indexer import index_repo
from ds4.lsp import completion
from ds4.lsp.symbols import buffer_definitions, document_symbols, references, workspace_symbols

CALC = "def add(a, b):\n    return a - b\n\n\ndef adder_table(n):\n    return [add(i, i) for i in range(n)]\n"
SHOP = "from calc import add\n\n\ndef checkout(prices):\n    return add(prices[0], prices[1])\n"


@pytest.fixture()
def root(tmp_path):
    for rel, text in {"calc.py": CALC, "shop.py": SHOP}.items():
        (tmp_path / rel).write_text(text)
    index_repo(tmp_path)
    return tmp_path.resolve()


def names(found) -> list[tuple[str, str]]:
    return [(s.name, Path(to_fs_path(s.location.uri)).name) for s in found]


def test_workspace_symbols_put_exact_names_first_and_take_unsaved_buffers_instead_of_the_index(root):
    assert names(workspace_symbols("add", {root: {}})) == [("add", "calc.py"), ("adder_table", "calc.py")]
    unsaved = {"calc.py": buffer_definitions("calc.py", CALC + "\n\ndef add_more(a):\n    return a\n")}
    found = workspace_symbols("add", {root: unsaved})
    assert names(found) == [("add", "calc.py"), ("adder_table", "calc.py"), ("add_more", "calc.py")]
    assert found[2].location.range.start.line == CALC.count("\n") + 2
    assert names(workspace_symbols("", {root: {}})) == [
        ("add", "calc.py"),
        ("adder_table", "calc.py"),
        ("checkout", "shop.py"),
    ]


def test_document_symbols_come_from_the_buffer_when_open_else_from_the_index(root, tmp_path_factory):
    assert [s.name for s in document_symbols(root, "shop.py", None)] == ["checkout"]
    buffer = buffer_definitions("shop.py", SHOP + "\n\ndef refund():\n    pass\n")
    assert [s.name for s in document_symbols(root, "shop.py", buffer)] == ["checkout", "refund"]
    assert document_symbols(tmp_path_factory.mktemp("unindexed"), "shop.py", None) == []
    assert buffer_definitions("notes.unknown", "def x(): pass") == []


def test_references_name_existing_repository_files_once(root):
    found = references(root, "See calc.py:2, calc.py:2 again, shop.py and missing.py:4.")
    assert [(Path(to_fs_path(r["uri"])).name, r["range"]["start"]["line"]) for r in found] == [
        ("calc.py", 1),
        ("shop.py", 0),
    ]


def test_completion_context_lists_definitions_from_other_files(root):
    prefix, suffix = completion.infill_inputs(root, "shop.py", SHOP, SHOP.index("add(prices"))
    assert prefix.startswith(
        "# Related definitions elsewhere in the repository:\n# calc.py:1: def add(a, b):\n"
    )
    assert prefix.endswith("# shop.py\n" + SHOP[: SHOP.index("add(prices")])
    assert suffix == SHOP[SHOP.index("add(prices") :]
    assert completion.context(root, "calc.py", "return add(") == ""  # defined in the file itself
