"""What users and clients see stays put: every `ds4-agent` command's --help and the HTTP service's OpenAPI
document, compared with the files in tests/golden/. A deliberate change rewrites them:
DS4_UPDATE_GOLDEN=1 pytest tests/agent/test_golden.py, and the diff goes into the same commit."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import urllib.request
from pathlib import Path

import pytest

from ds4.agent.cli import build_parser, main
from tests.servers import serving

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("DS4_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} is missing: run with DS4_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: if on purpose, DS4_UPDATE_GOLDEN=1"


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of `parser`, depth first, as argv prefixes."""
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += command_paths(child, (*path, name))
    return found


def help_text(argv: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def test_every_command_help_is_unchanged(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    monkeypatch.setenv("NO_COLOR", "1")
    paths = command_paths(build_parser())
    assert len(paths) > 20, paths
    for path in paths:
        check_golden(f"cli/{'_'.join(('ds4-agent',) + path)}.txt", help_text(path))
    written = {p.name for p in (GOLDEN / "cli").iterdir()}
    assert written == {f"{'_'.join(('ds4-agent',) + p)}.txt" for p in paths}, "a stale golden file"


def test_openapi_document_is_unchanged(tiny_v3, tmp_path):
    root = tmp_path / "repos"
    root.mkdir()
    flags = ["--api-key", "k", "--repo-root", str(root), "--jobs-db", str(tmp_path / "jobs.db")]
    with serving(tiny_v3, tmp_path / "serve.log", *flags, "--max-model-len", "640") as base:
        with urllib.request.urlopen(base + "/schema/openapi.json", timeout=60) as r:
            schema = json.loads(r.read())
    check_golden("openapi.json", json.dumps(schema, indent=2, sort_keys=True) + "\n")
