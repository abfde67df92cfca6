"""The repository index on real temporary git repositories: what is listed, skipped, re-parsed and
removed, what survives a killed run, and how the database copes with old or foreign files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds4.agent.index.indexer import index_repo
from ds4.agent.index.query import search, symbols
from ds4.agent.index.store import SCHEMA_VERSION, open_index
from tests.fakes import BASE, git, make_repo


@pytest.fixture()
def repo(tmp_path):
    return make_repo(tmp_path / "repo", BASE)


def names(db_path: Path) -> set[tuple[str, str, str]]:
    return {(r["path"], r["name"], r["kind"]) for r in symbols(open_index(db_path, write=False))}


def test_first_run_indexes_tracked_files_and_honours_gitignore(repo):
    report = index_repo(repo)
    db = repo / ".ds4" / "index.db"
    assert report.parsed == 4 and report.files == 4  # .gitignore, README.md and the two sources
    assert names(db) == {
        ("app/main.py", "main", "function"),
        ("app/main.py", "helper", "function"),
        ("app/models.py", "User", "class"),
        ("app/models.py", "name", "method"),
    }
    hits = search(open_index(db), "helper")
    assert hits[0]["path"] == "app/main.py" and hits[0]["line"] == 8


def test_untracked_files_are_indexed_but_ignored_ones_are_not(repo):
    (repo / "app" / "new.py").write_text("def fresh(): pass\n")
    (repo / "build" / "more.py").write_text("def hidden(): pass\n")
    index_repo(repo)
    found = {n for _, n, _ in names(repo / ".ds4" / "index.db")}
    assert "fresh" in found and "hidden" not in found


def test_ds4ignore_removes_files_from_the_index(repo):
    (repo / ".ds4ignore").write_text("app/models.py\n")
    index_repo(repo)
    assert all(p != "app/models.py" for p, _, _ in names(repo / ".ds4" / "index.db"))


def test_editing_one_file_reparses_exactly_that_file(repo):
    index_repo(repo)
    time.sleep(0.01)
    (repo / "app" / "models.py").write_text(
        "class User:\n    def name(self):\n        return 'y'\n\n\nclass Admin(User): pass\n"
    )
    report = index_repo(repo)
    assert report.parsed_paths == ["app/models.py"]
    assert ("app/models.py", "Admin", "class") in names(repo / ".ds4" / "index.db")


def test_touching_without_changes_reparses_nothing(repo):
    index_repo(repo)
    os.utime(repo / "app" / "main.py", ns=(time.time_ns(), time.time_ns() + 10**9))
    report = index_repo(repo)
    assert report.parsed == 0 and report.unchanged == 4


def test_renames_deletions_and_gitignore_changes_are_reflected(repo):
    index_repo(repo)
    git(repo, "mv", "app/models.py", "app/people.py")
    (repo / "app" / "main.py").unlink()
    (repo / ".gitignore").write_text("build/\n*.log\nREADME.md\n")
    git(repo, "rm", "-q", "--cached", "README.md")
    report = index_repo(repo)
    paths = {p for p, _, _ in names(repo / ".ds4" / "index.db")}
    assert paths == {"app/people.py"} and report.removed == 3  # models.py, main.py, README.md
    assert report.parsed_paths == ["app/people.py"] or set(report.parsed_paths) == {
        ".gitignore",
        "app/people.py",
    }


def test_outside_git_a_gitignore_matcher_is_used(tmp_path):
    root = make_repo(
        tmp_path / "plain",
        {
            **BASE,
            "sub/.gitignore": "secret.py\n",
            "sub/secret.py": "x = 1\n",
            "sub/ok.py": "def ok(): pass\n",
        },
        use_git=False,
    )
    report = index_repo(root)
    paths = {r[0] for r in open_index(root / ".ds4" / "index.db").execute("SELECT path FROM files")}
    assert "sub/ok.py" in paths and "sub/secret.py" not in paths and "build/out.py" not in paths
    assert "debug.log" not in paths and report.files == len(paths)


def test_bad_inputs_are_skipped_or_indexed_with_their_reason(tmp_path, monkeypatch):
    files = {
        "latin1.py": "def caf\xe9(): pass\n".encode("latin-1"),
        "blob.bin": bytes(range(256)) * 4,
        "min.js": "var a=1;" * 400,
        "broken.py": "def ok():\n    pass\n\ndef broken(:\n",
        "locked.py": "def locked(): pass\n",
    }
    root = make_repo(tmp_path / "bad", files)
    (root / "big.txt").write_bytes(b"")
    os.truncate(root / "big.txt", 50 << 20)  # a 50 MB file
    os.symlink("loop", root / "loop")  # a symlink to itself
    os.symlink(".", root / "sub")  # a directory symlink loop
    real_read = Path.read_bytes

    def read_bytes(self):  # as root every file is readable: fail this one read as a permission error would
        if self.name == "locked.py":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    index_repo(root)
    db = open_index(root / ".ds4" / "index.db")
    reasons = dict(db.execute("SELECT path, skipped FROM files").fetchall())
    assert reasons["blob.bin"] == "binary"
    assert reasons["min.js"].startswith("minified")
    assert reasons["big.txt"].startswith("over")
    assert reasons["loop"] == "symlink" and reasons["sub"] == "symlink"
    assert reasons["locked.py"].startswith("unreadable")
    assert reasons["latin1.py"] is None and reasons["broken.py"] is None
    errors = dict(db.execute("SELECT path, syntax_errors FROM files").fetchall())
    assert errors["broken.py"] == 1
    text = db.execute(
        "SELECT text FROM contents JOIN files ON files.id = contents.file_id WHERE path = 'latin1.py'"
    ).fetchone()[0]
    assert text.startswith("def caf\ufffd()")  # non-UTF-8 bytes are indexed with replacement characters
    assert {r["name"] for r in symbols(db, "broken.py")} >= {"ok"}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_killed_indexer_leaves_a_usable_database(tmp_path):
    files = {f"pkg/m{i}.py": f"def f{i}():\n    return {i}\n" * 40 for i in range(3000)}
    root = make_repo(tmp_path / "many", files)
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from ds4.agent.index.indexer import index_repo; index_repo({str(root)!r})"],
        start_new_session=True,  # its workers share its process group: we can see whether they outlive it
    )
    db_path = root / ".ds4" / "index.db"
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once some batches are committed
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as conn:
                    if conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] >= 400:
                        break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _group_alive(proc.pid):
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "the killed indexer's workers did not exit"
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        partial = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert 0 < partial < 3000
    report = index_repo(root)
    assert report.parsed == 3000 - partial and report.files == 3000


def test_readers_work_while_a_writer_runs(repo):
    index_repo(repo)
    writer = open_index(repo / ".ds4" / "index.db")
    writer.conn.execute("BEGIN IMMEDIATE")
    writer.conn.execute("DELETE FROM definitions")
    reader = open_index(repo / ".ds4" / "index.db", write=False)
    assert len(symbols(reader)) == 4  # the reader sees the last committed state
    writer.conn.rollback()


def test_old_schema_is_rebuilt_and_foreign_file_is_kept(tmp_path, repo, caplog):
    index_repo(repo)
    db_path = repo / ".ds4" / "index.db"
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION - 1)])
    report = index_repo(repo)
    assert report.parsed == 4 and "rebuilding" in caplog.text
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (x)")
        conn.execute("INSERT INTO notes VALUES (42)")
    index_repo(repo, db_path=foreign)
    kept = list(tmp_path.glob("foreign.db.foreign-*"))
    assert len(kept) == 1 and sqlite3.connect(kept[0]).execute("SELECT x FROM notes").fetchone()[0] == 42
