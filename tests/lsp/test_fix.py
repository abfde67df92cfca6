"""fix.py's pure parts called directly: the issue text with the user's selection, the loop's configuration
from the editor's settings (the test command falling back to .ds4.toml), progress messages, and the
system prompts read from agent/prompts/ exactly as they were written in the server."""

from __future__ import annotations

from lsprotocol import types

from ds4.lsp.fix import fix_config, instructions, issue_text
from ds4.lsp.settings import Settings

SOURCE = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"


def selection(first: int, last: int, character: int = 0) -> types.Range:
    return types.Range(types.Position(first, 0), types.Position(last, character))


def test_issue_text_quotes_the_selected_lines_or_names_the_file():
    assert issue_text("wrong sum", None, SOURCE, None) == "wrong sum"
    assert (
        issue_text("wrong sum", "calc.py", SOURCE, None) == "wrong sum\n\n(The user is looking at calc.py.)"
    )
    quoted = issue_text("wrong sum", "calc.py", SOURCE, selection(0, 2))  # the end line's column 0: excluded
    assert (
        quoted
        == "wrong sum\n\nThe user points at calc.py, lines 1-2:\n```\ndef add(a, b):\n    return a - b\n```"
    )
    assert issue_text("x", "calc.py", SOURCE, selection(1, 1, 5)).endswith(
        "lines 2-2:\n```\n    return a - b\n```"
    )


def test_fix_config_takes_the_settings_and_falls_back_to_the_repository_test_command(tmp_path):
    (tmp_path / ".ds4.toml").write_text('test_cmd = "make check"\n')
    config = fix_config(tmp_path, "issue", Settings(rounds=2, budget=5000, max_tokens=99), {"a.py": "x"})
    assert (config.repo, config.issue, config.test_cmd) == (tmp_path, "issue", "make check")
    assert (config.rounds, config.budget, config.generation.max_tokens) == (2, 5000, 99)
    assert config.overlay == {"a.py": "x"}
    assert config.setting_names["max_tokens"] == "the ds4 `maxTokens` setting"  # what the loop's errors name
    assert fix_config(tmp_path, "issue", Settings(test_command="pytest -x"), {}).test_cmd == "pytest -x"


def test_without_a_budget_setting_the_loop_fits_the_budget_to_the_models_context(tmp_path):
    """No fixed 32K: the loop computes what the context leaves (fit.budget_for), as the CLI's fix does."""
    assert Settings().budget is None and fix_config(tmp_path, "issue", Settings(), {}).budget is None


def test_the_system_prompts_read_as_written():
    assert instructions("explain") == (
        "You explain code to a developer who works in this repository. Answer in Markdown: what the "
        "selected code does, how it fits with the rest of the repository (name the files), and anything "
        "surprising in it. Be brief."
    )
    assert instructions("ask") == (
        "You answer questions about this repository. Answer in Markdown and name the files (path:line) "
        "your answer rests on."
    )
