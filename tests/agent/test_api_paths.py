"""Repository paths from clients stay under the allowed roots: `..`, symlink escapes, relative paths
and paths elsewhere are refused; real folders under a root (through symlinks inside it) pass."""

from __future__ import annotations

import pytest

from ds4.agent.api.paths import PathRefused, confine


@pytest.fixture()
def roots(tmp_path):
    root = tmp_path / "repos"
    (root / "app" / "src").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "alias").symlink_to(root / "app")
    (root / "file.txt").write_text("x")
    return root, tmp_path


def test_folders_under_a_root_pass(roots):
    root, _ = roots
    assert confine(str(root / "app"), [root]) == (root / "app").resolve()
    assert confine(str(root / "alias"), [root]) == (root / "app").resolve()  # a symlink that stays inside


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r, t: str(r / "app" / ".." / ".." / "secret"), "'..' is not allowed"),
        (lambda r, t: str(r / "escape"), "outside the repository roots"),
        (lambda r, t: str(t / "secret"), "outside the repository roots"),
        (lambda r, t: "repos/app", "absolute path"),
        (lambda r, t: str(r / "file.txt"), "not a folder"),
        (lambda r, t: str(r) + "-sibling", "outside the repository roots"),
        (lambda r, t: "", "empty"),
    ],
)
def test_escapes_are_refused(roots, make, message):
    root, tmp = roots
    (tmp / "repos-sibling").mkdir(exist_ok=True)
    with pytest.raises(PathRefused, match=message):
        confine(make(root, tmp), [root])


def test_no_roots_means_no_repositories(roots):
    with pytest.raises(PathRefused, match="--repo-root"):
        confine(str(roots[0] / "app"), [])
