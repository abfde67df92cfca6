"""Where `ds4-agent fix` gets its inputs: a GitHub issue URL (fetched from a scripted REST server on
loopback), settings files (.ds4.toml in the repository, the user's config.toml), and the progress view."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from ds4.agent.config import ConfigError, settings
from ds4.agent.events import describe
from ds4.agent.github import GitHubError, fetch_issue, is_issue_url
from tests.fakes import RIGHT, ScriptedChatServer
from tests.servers import run_cli, serve_in_thread


class ScriptedGitHub(BaseHTTPRequestHandler):
    """Test double: GitHub's REST API for one issue with one comment; records the headers it saw."""

    headers_seen: list[dict] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).headers_seen.append(dict(self.headers))
        path = self.path.split("?")[0]
        if path == "/repos/acme/calc/issues/7":
            body = {"title": "add() subtracts", "body": "add(2, 3) returns -1 instead of 5", "number": 7}
        elif path == "/repos/acme/calc/issues/7/comments":
            body = [{"user": {"login": "maria"}, "body": "Seen in calc.py, the sign is flipped."}]
        else:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"message": "Not Found"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """No user settings leak in from the machine running the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def test_issue_urls_are_recognized():
    assert is_issue_url("https://github.com/acme/calc/issues/7")
    assert is_issue_url("https://github.com/acme/calc.py/pull/12#issuecomment-1")
    assert not is_issue_url("https://gitlab.com/acme/calc/issues/7")
    assert not is_issue_url("add(2, 3) returns -1, see https://github.com/acme/calc/issues/7")


def test_fix_fetches_a_github_issue_with_its_comments(repo, env):
    github = serve_in_thread(ScriptedGitHub)
    ScriptedGitHub.headers_seen = []
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [RIGHT], []
    chat = serve_in_thread(ScriptedChatServer)
    env = {**env, "DS4_GITHUB_API": f"http://127.0.0.1:{github.server_port}", "GITHUB_TOKEN": "ghp_test"}
    try:
        done = run_cli(
            "fix",
            "https://github.com/acme/calc/issues/7",
            "--repo",
            str(repo),
            "--endpoint",
            f"http://127.0.0.1:{chat.server_port}",
            "--test-cmd",
            "python -m pytest -q -rf",
            "--budget",
            "4000",
            "--json",
            timeout=120,
            env=env,
        )
    finally:
        github.shutdown()
        chat.shutdown()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "resolved"
    prompt = json.dumps(ScriptedChatServer.bodies[0]["messages"])
    assert "add() subtracts (acme/calc#7)" in prompt and "the sign is flipped" in prompt
    assert all(h.get("Authorization") == "Bearer ghp_test" for h in ScriptedGitHub.headers_seen)


def test_a_missing_issue_is_a_clear_error(monkeypatch):
    github = serve_in_thread(ScriptedGitHub)
    monkeypatch.setenv("DS4_GITHUB_API", f"http://127.0.0.1:{github.server_port}")
    try:
        with pytest.raises(GitHubError, match="404.*no such issue"):
            fetch_issue("https://github.com/acme/calc/issues/8")
    finally:
        github.shutdown()


def test_an_unreachable_api_says_what_to_do_instead(monkeypatch):
    server = serve_in_thread(ScriptedGitHub)
    port = server.server_port
    server.shutdown()
    server.server_close()  # nothing listens on this port now
    monkeypatch.setenv("DS4_GITHUB_API", f"http://127.0.0.1:{port}")
    with pytest.raises(GitHubError, match="cannot reach .* save the issue text to a file"):
        fetch_issue("https://github.com/acme/calc/issues/7", timeout=5)


def test_the_user_settings_choose_the_endpoint_and_the_repository_how_to_test(repo, env):
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [RIGHT], []
    chat = serve_in_thread(ScriptedChatServer)
    user = Path(env["XDG_CONFIG_HOME"]) / "ds4" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text(f'endpoint = "http://127.0.0.1:{chat.server_port}"\nmodel_name = "deepseek-v4"\n')
    (repo / ".ds4.toml").write_text('test_cmd = "python -m pytest -q -rf"\nrounds = 1\nbudget = 4000\n')
    try:
        done = run_cli("fix", "add(2, 3) returns -1", "--repo", str(repo), "--json", timeout=120, env=env)
    finally:
        chat.shutdown()
    assert done.returncode == 0, done.stderr
    assert ScriptedChatServer.bodies[0]["model"] == "deepseek-v4"
    assert json.loads(done.stdout)["tests"]["command"] == "python -m pytest -q -rf"
    shown = f"{repo / '.ds4.toml'} sets the test command; it runs in the bubblewrap sandbox"
    assert shown in done.stderr or "no sandbox for test commands" in done.stderr


def test_the_repository_file_wins_over_the_user_file(tmp_path, env):
    user = tmp_path / "xdg" / "ds4" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('endpoint = "http://cluster:8000"\nrounds = 5\nsamples = 2\n')
    project = tmp_path / "project"
    project.mkdir()
    (project / ".ds4.toml").write_text('tokenizer = "weights/tokenizer.json"\nrounds = 2\n')
    merged = settings(project)
    tokenizer = str((project / "weights" / "tokenizer.json").resolve())
    assert merged == {"endpoint": "http://cluster:8000", "tokenizer": tokenizer, "rounds": 2, "samples": 2}


@pytest.mark.parametrize(
    "text, message",
    [
        ("round = 2\n", "unknown key 'round'"),
        ('rounds = "two"\n', "rounds must be int"),
        ("rounds = [\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, env, text, message):
    (tmp_path / ".ds4.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path)


def test_no_model_anywhere_says_how_to_choose_one(repo, env):
    done = run_cli("fix", "add(2, 3) returns -1", "--repo", str(repo), env=env)
    assert done.returncode == 2
    assert "no model: pass --model DIR" in done.stderr and "config.toml" in done.stderr


def test_progress_lines_say_what_happened():
    assert describe({"event": "baseline_done", "exit_code": 1, "failed": ["tests/t.py::test_add"]}) == (
        "baseline: 1 failing (test_add)"
    )
    answer = {
        "event": "answer",
        "sample": 1,
        "round": 2,
        "tokens": 312,
        "seconds": 7.1,
        "prompt_tokens": 9812,
        "cached_tokens": 9600,
    }
    assert describe(answer) == "sample 1 round 2: 312 tokens in 7.1s (prompt 9,812, 9,600 cached)"
    tested = {
        "event": "tested",
        "sample": 2,
        "round": 1,
        "passed": False,
        "timed_out": False,
        "failed": [f"t.py::test_{i}" for i in range(5)],
    }
    assert describe(tested) == "sample 2 round 1: 5 failing (test_0, test_1, test_2 and 2 more)"


def test_a_mistyped_issue_file_is_an_error_and_issue_text_is_literal(repo, env):
    done = run_cli("fix", "ISSSUE.md", "--repo", str(repo), "--endpoint", "http://127.0.0.1:9", env=env)
    assert (
        done.returncode == 2
        and "ISSSUE.md: no such file; to give the issue as text, use --issue-text" in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1
    from ds4.agent.cli.inputs import read_issue

    assert read_issue("", "ISSSUE.md") == "ISSSUE.md"
    assert read_issue("add() returns the wrong sign") == "add() returns the wrong sign"


@pytest.mark.parametrize(
    "commits, message",
    [
        (
            None,
            "is not a git repository: ds4 works in git worktrees; choose a repository, or run `git init`",
        ),
        (
            False,
            "has no commits yet: ds4 starts from your last commit; commit first (git add -A && git commit",
        ),
    ],
)
def test_a_repository_ds4_cannot_start_from_is_one_line_before_the_model(tmp_path, env, commits, message):
    from tests.fakes import BUGGY, git, make_repo

    repo = make_repo(tmp_path / "r", BUGGY, use_git=False)
    if commits is not None:
        git(repo, "init", "-q")
    # nothing listens at the endpoint: the repository is checked first
    done = run_cli(
        "fix",
        "--issue-text",
        "add is wrong",
        "--repo",
        str(repo),
        "--endpoint",
        "http://127.0.0.1:9",
        env=env,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"ds4-agent: error: {repo.resolve()} {message}")
