"""Edits stay in the working tree: a model's answer cannot write under .git/ (or another VCS's folder)
nor through a symlink, a write that fails half-way puts every file back and leaves no temporary file,
and an edit the file system refuses becomes feedback in the loop instead of a crash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ds4.agent.cli import main
from ds4.agent.loop import fix
from ds4.agent.patch import PatchError, apply
from ds4.agent.writes import WriteRefused, write_all
from tests.fakes import BUGGY, RIGHT, ScriptedBackend, edit, fix_config, make_repo


def block(path: str, old: str, new: str) -> str:
    return f"{path}\n<<<<<<< SEARCH\n{old}=======\n{new}>>>>>>> REPLACE\n"


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


@pytest.fixture()
def repo(tmp_path):
    return make_repo(tmp_path / "repo", BUGGY)


def test_an_edit_of_git_config_is_refused_and_git_is_untouched(repo):
    config = (repo / ".git" / "config").read_text()
    answer = block(".git/config", "[core]\n", '[core]\n\tfsmonitor = "touch /tmp/pwned"\n')
    with pytest.raises(PatchError, match=r"inside \.git/, which edits may not touch"):
        apply(answer, repo)
    assert (repo / ".git" / "config").read_text() == config


@pytest.mark.parametrize(
    "path", [".git/hooks/pre-commit", ".GIT/HEAD", "sub/.hg/hgrc", ".ds4/index.db", ".git"]
)
def test_vcs_and_ds4_folders_are_refused_for_new_files(repo, path):
    with pytest.raises(PatchError, match="which edits may not touch"):
        apply(block(path, "", "#!/bin/sh\necho owned\n"), repo, lint=False)
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()


def test_the_cli_apply_refuses_an_edit_of_git_config(repo, capsys):
    answer = repo.parent / "answer.md"
    answer.write_text(block(".git/config", "[core]\n", '[core]\n\tfsmonitor = "id"\n'))
    assert main(["apply", str(answer), "--repo", str(repo)]) == 1
    assert "refused" in capsys.readouterr().out
    assert "fsmonitor" not in (repo / ".git" / "config").read_text()


def test_a_symlinked_file_is_refused_and_its_target_untouched(repo, tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("SECRET = 1\n")
    (repo / "link.py").symlink_to(outside)
    with pytest.raises(PatchError, match="goes through the symlink link.py"):
        apply(block("link.py", "SECRET = 1\n", "SECRET = 2\n"), repo)
    assert outside.read_text() == "SECRET = 1\n"


def test_a_new_file_under_a_symlinked_folder_is_refused(repo, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / "pkg").symlink_to(elsewhere)
    with pytest.raises(PatchError, match="goes through the symlink pkg"):
        apply(block("pkg/evil.py", "", "x = 1\n"), repo)
    assert list(elsewhere.iterdir()) == []


def test_a_path_swapped_for_a_symlink_after_matching_is_refused_at_write_time(repo, tmp_path):
    result = apply(edit("    return a - b", "    return a + b"), repo, write=False)
    outside = tmp_path / "outside.py"
    outside.write_text("kept\n")
    (repo / "calc.py").unlink()
    (repo / "calc.py").symlink_to(outside)
    with pytest.raises(WriteRefused, match="goes through the symlink"):
        write_all(repo, result.files)
    assert outside.read_text() == "kept\n"


def test_a_failing_second_write_leaves_the_first_file_untouched_and_no_temporary_files(repo):
    (repo / "pkg").mkdir()  # the second edit "creates" a file where a folder is: its rename fails
    before = tree_files(repo)
    answer = edit("    return a - b", "    return a + b") + "\n" + block("pkg", "", "x = 1\n")
    with pytest.raises(PatchError, match="nothing was written"):
        apply(answer, repo, lint=False)
    assert tree_files(repo) == before  # calc.py as it was; no .ds4-*.tmp or .bak beside anything


def test_a_deleted_file_comes_back_when_a_later_write_fails(repo):
    (repo / "pkg").mkdir()
    before = tree_files(repo)
    answer = (
        "--- a/calc.py\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-def add(a, b):\n-    return a - b\n"
        "--- /dev/null\n+++ b/pkg\n@@ -0,0 +1 @@\n+x = 1\n"
    )
    with pytest.raises(PatchError, match="nothing was written"):
        apply(answer, repo, lint=False)
    assert tree_files(repo) == before


def test_a_new_file_in_new_folders_is_undone_with_its_folders(repo):
    (repo / "pkg").mkdir()
    answer = block("deep/er/new.py", "", "x = 1\n") + "\n" + block("pkg", "", "y = 2\n")
    with pytest.raises(PatchError):
        apply(answer, repo, lint=False)
    assert not (repo / "deep").exists()


def test_a_file_name_too_long_is_a_refusal_not_an_os_error(repo):
    with pytest.raises(PatchError, match="too long"):
        apply(block("x" * 300 + ".py", "", "x = 1\n"), repo)


def test_os_errors_from_edits_become_feedback_in_the_loop(repo):
    too_long = block("y" * 300 + ".py", "", "x = 1\n")
    hook = block(".git/hooks/post-checkout", "", "#!/bin/sh\ntouch /tmp/owned\n")
    backend = ScriptedBackend([too_long, hook, RIGHT])
    result = fix(fix_config(repo), backend)
    assert result.status == "resolved" and result.rounds == 3
    assert "too long" in backend.asked[1][-1]["content"]
    assert "which edits may not touch" in backend.asked[2][-1]["content"]
    hooks = subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-path", "hooks"], capture_output=True)
    assert not (repo / hooks.stdout.decode().strip() / "post-checkout").exists()
