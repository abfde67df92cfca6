"""`ds4-agent index`, `search` and `symbols` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fakes import BASE, make_repo

EXE = Path(sys.executable).parent / "ds4-agent"


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(EXE), *args], capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_index_summary_then_symbols_and_search_as_json(tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    summary = json.loads(run("index", "--repo", str(repo), "--json").stdout)
    assert summary["files"] == 4 and summary["definitions"] == 4 and summary["languages"]["python"] == 2
    rows = json.loads(run("symbols", "app/models.py", "--repo", str(repo), "--json").stdout)
    assert [(r["path"], r["name"], r["kind"], r["line"], r["end_line"]) for r in rows] == [
        ("app/models.py", "User", "class", 1, 3),
        ("app/models.py", "name", "method", 2, 3),
    ]
    hits = json.loads(run("search", "User", "--repo", str(repo), "--kind", "class", "--json").stdout)
    assert hits[0]["name"] == "User" and hits[0]["path"] == "app/models.py"
    assert (
        json.loads(run("search", "nothing_like_this", "--repo", str(repo), "--json", ok=False).stdout) == []
    )


def test_search_tolerates_fts_syntax_in_queries(tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    run("index", "--repo", str(repo))
    hits = json.loads(run("search", 'help" OR (', "--repo", str(repo), "--json").stdout)
    assert [h["name"] for h in hits] == ["helper"]


def test_search_without_an_index_says_what_to_do(tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    done = run("search", "x", "--repo", str(repo), ok=False)
    assert done.returncode == 2 and "run `ds4-agent index" in done.stderr and "Traceback" not in done.stderr


def test_index_refuses_a_committed_ds4_symlink_and_writes_nothing_there(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for link in (".ds4", ".ds4/index.db"):
        repo = make_repo(tmp_path / link.replace("/", "-"), BASE)
        if link == ".ds4":
            (repo / ".ds4").symlink_to(elsewhere)
        else:
            (repo / ".ds4").mkdir()
            (repo / link).symlink_to(elsewhere / "index.db")
        done = run("index", "--repo", str(repo), ok=False)
        assert done.returncode == 2 and "is a symlink" in done.stderr and "Traceback" not in done.stderr
        assert list(elsewhere.iterdir()) == []


def test_search_ranks_source_definitions_above_test_helpers_and_exact_names_first(tmp_path):
    files = {
        "tests/test_help.py": "def get_help(x):\n    return x\n\n\ndef get_help_text():\n    return ''\n",
        "src/core.py": "def get_help_text(ctx):\n    return ctx\n\n\ndef get_help(ctx):\n    return ctx\n",
    }
    repo = make_repo(tmp_path / "repo", files)
    run("index", "--repo", str(repo))
    rows = json.loads(run("search", "get_help", "--repo", str(repo), "--json").stdout)
    assert [(r["path"], r["name"]) for r in rows[:3]] == [
        ("src/core.py", "get_help"),
        ("tests/test_help.py", "get_help"),
        ("src/core.py", "get_help_text"),
    ]


def test_a_search_or_symbols_without_a_result_exits_1(tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    run("index", "--repo", str(repo))
    assert run("search", "nothing_like_this", "--repo", str(repo), ok=False).returncode == 1
    assert run("symbols", "no/such.py", "--repo", str(repo), ok=False).returncode == 1


def test_the_index_folder_stays_out_of_git_status(tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    for _ in range(2):
        run("index", "--repo", str(repo))
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
    assert ".ds4" not in status.stdout
    assert (repo / ".git" / "info" / "exclude").read_text().splitlines().count("/.ds4/") == 1
    assert not (repo / ".gitignore").read_text().count(".ds4")
