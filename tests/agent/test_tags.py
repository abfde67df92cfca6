"""Tag queries per language: fixture files with hand-written expected definitions (name, kind, line),
checked exactly, plus the details the extractor adds (parents, docs, signatures, references)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds4.agent.index.tags import extract, has_tags

FIXTURES = Path(__file__).parent / "fixtures" / "tags"
REQUIRED = (
    "python",
    "javascript",
    "typescript",
    "tsx",
    "go",
    "rust",
    "java",
    "c",
    "cpp",
    "csharp",
    "ruby",
    "php",
    "kotlin",
    "scala",
    "swift",
    "lua",
    "bash",
)
CASES = [
    (lang.name, name)
    for lang in sorted(FIXTURES.iterdir())
    if (lang / "expected.json").is_file()
    for name in json.loads((lang / "expected.json").read_text())
]


def test_every_required_language_has_a_query_and_a_fixture():
    assert all(has_tags(lang) for lang in REQUIRED)
    assert {lang for lang, _ in CASES} >= set(REQUIRED)


@pytest.mark.parametrize("language, name", CASES)
def test_fixture_definitions_are_exact(language, name):
    expected = json.loads((FIXTURES / language / "expected.json").read_text())[name]
    definitions, _, errors = extract(language, (FIXTURES / language / name).read_bytes())
    assert not errors, "fixtures are valid source"
    assert [[d.name, d.kind, d.line] for d in definitions] == expected


def test_python_details():
    source = (FIXTURES / "python" / "shapes.py").read_bytes()
    definitions, references, _ = extract("python", source)
    by_name = {d.name: d for d in definitions}
    area = by_name["area"]
    assert area.kind == "method" and definitions[area.parent].name == "Circle"
    assert area.signature == "def area(self) -> float:" and area.doc == "The area, in square units."
    assert by_name["Circle"].doc == "A circle around the origin."
    assert by_name["Circle"].end_line > by_name["Circle"].line
    assert ("math", 1) in {(r.name, r.line) for r in references}
    assert all(r.name != "Circle" or r.line != by_name["Circle"].line for r in references)  # not its own name
