"""On a large real tree (this machine's Python standard library, copied into a git repository), ds4's
Python classes and functions agree with the `ast` module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sysconfig
import warnings
from pathlib import Path

import pytest

from ds4.agent.index.indexer import index_repo
from ds4.agent.index.query import symbols
from ds4.agent.index.store import open_index


@pytest.mark.slow
def test_python_definitions_agree_with_ast(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    repo = tmp_path / "stdlib"
    shutil.copytree(
        stdlib, repo, ignore=shutil.ignore_patterns("site-packages", "__pycache__", "*.pyc", "*.so")
    )
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    report = index_repo(repo, max_bytes=4 << 20)
    assert report.languages.get("python", 0) > 1000

    ours: dict[str, set[tuple[str, int, str]]] = {}
    for row in symbols(open_index(repo / ".ds4" / "index.db", write=False)):
        if row["kind"] in ("function", "method", "class"):
            group = "class" if row["kind"] == "class" else "function"
            ours.setdefault(row["path"], set()).add((row["name"], row["line"], group))
    total = agree = 0
    for path in sorted(repo.rglob("*.py")):
        rel = path.relative_to(repo).as_posix()
        try:
            with warnings.catch_warnings():  # stdlib test data has invalid escapes on purpose
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue  # files ast rejects (test data, Python 2 grammar) are out of the comparison
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                group = "class" if isinstance(node, ast.ClassDef) else "function"
                total += 1
                agree += (node.name, node.lineno, group) in ours.get(rel, set())
    assert total > 50_000
    assert agree / total >= 0.99, f"{agree}/{total} = {agree / total:.4f}"
