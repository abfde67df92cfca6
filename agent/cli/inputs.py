"""What commands read from the user: folders that must exist, the issue (text, file, standard input or a
GitHub URL) and files of edits; a name that names nothing is an InputError."""

from __future__ import annotations

import os
import re
import sys

from ds4.agent.errors import InputError

LOOKS_LIKE_PATH = re.compile(r"\S*/\S*|\S+\.(md|txt|rst|json|ya?ml|org)")


def require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise InputError(f"{path} is not a folder")


def read_issue(value: str, literal: str | None = None) -> str:
    """The issue from `literal` text, a GitHub URL, standard input (-) or a file; a value that looks like
    a file name but names none is an error (a typo must not become the issue's text)."""
    from ds4.agent.github import fetch_issue, is_issue_url

    if literal is not None:
        return literal
    if is_issue_url(value):
        return fetch_issue(value)
    if value == "-":
        return sys.stdin.read()
    if value and os.path.isfile(value):
        with open(value, encoding="utf-8", errors="replace") as f:
            return f.read()
    if LOOKS_LIKE_PATH.fullmatch(value.strip()):
        raise InputError(f"{value}: no such file; to give the issue as text, use --issue-text", "issue")
    return value


def read_text(path: str) -> str:
    """A file's text, or standard input's for -."""
    if path == "-":
        return sys.stdin.read()
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
