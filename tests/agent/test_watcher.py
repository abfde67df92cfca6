"""The live index: edits, creates, deletes and a 2,000-file burst show up within seconds."""

from __future__ import annotations

import pytest

from ds4.agent.index.indexer import index_repo
from ds4.agent.index.query import symbols
from ds4.agent.index.store import open_index
from ds4.agent.index.watcher import RepoWatcher
from tests.fakes import BASE, make_repo
from tests.servers import wait_for


def defined(repo) -> set[str]:
    return {r["name"] for r in symbols(open_index(repo / ".ds4" / "index.db", write=False))}


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def watched(request, tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    index_repo(repo)
    watcher = RepoWatcher(repo, debounce=0.2, polling=request.param)
    watcher.start()
    yield repo
    watcher.stop()


def test_edit_create_delete_are_reflected(watched):
    repo = watched
    (repo / "app" / "models.py").write_text("class Account:\n    pass\n")
    assert wait_for(lambda: "Account" in defined(repo) and "User" not in defined(repo))
    (repo / "app" / "extra.py").write_text("def brand_new():\n    pass\n")
    assert wait_for(lambda: "brand_new" in defined(repo))
    (repo / "app" / "main.py").unlink()
    assert wait_for(lambda: "helper" not in defined(repo))


def test_a_burst_of_2000_files_is_reflected(watched):
    repo = watched
    burst = repo / "app" / "burst"
    burst.mkdir()
    for i in range(2000):
        (burst / f"m{i}.py").write_text(f"def burst_{i}():\n    pass\n")
    assert wait_for(lambda: sum(n.startswith("burst_") for n in defined(repo)) == 2000, seconds=60)


def test_a_new_top_level_folder_is_watched(tmp_path):
    repo = make_repo(tmp_path / "repo", BASE)
    index_repo(repo)
    watcher = RepoWatcher(repo, debounce=0.2)
    watcher.start()
    try:
        (repo / "lib").mkdir()
        (repo / "lib" / "a.py").write_text("def first(): pass\n")
        assert wait_for(lambda: "first" in defined(repo))
        (repo / "lib" / "a.py").write_text("def second(): pass\n")
        assert wait_for(lambda: "second" in defined(repo))
    finally:
        watcher.stop()
