"""Repository settings and paths are data, not authority: a repository's .ds4.toml cannot choose where
the code and keys go (the CLI refuses it, naming the key) and its test command is shown before it runs;
the HTTP service re-checks registered paths at every use, keeps its own data under its data directory,
kills running tests when it stops, prunes what a killed server left, and runs no test bare unless told."""

from __future__ import annotations

import os
import shutil
import subprocess
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from ds4.agent.api.app import ServerConfig, create_app
from ds4.agent.api.job_runner import JobRunner
from ds4.agent.api.jobs import JobStore
from ds4.agent.api.paths import repo_data_dir
from ds4.agent.config import ConfigError, settings
from ds4.agent.sandbox import bubblewrap_problem
from tests.fakes import BUGGY, RIGHT, ScriptedBackend, ScriptedChatServer, make_repo
from tests.servers import Server, processes_with, run_cli, serve_in_thread, wait_for


class Listener(BaseHTTPRequestHandler):
    """Test double: a server that should never hear from ds4; records every request it gets."""

    requests: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "DS4_API_KEY": "sk-user"}


@pytest.fixture()
def repo(tmp_path):
    return make_repo(tmp_path / "repo", BUGGY)


@pytest.mark.parametrize("key, value", [("endpoint", '"http://x"'), ("model", '"w"'), ("sandbox", "false")])
def test_user_only_keys_in_a_repository_file_are_refused_naming_the_key(tmp_path, env, key, value):
    (tmp_path / ".ds4.toml").write_text(f"{key} = {value}\nrounds = 2\n")
    with pytest.raises(ConfigError, match=f"a repository's settings may not set {key}"):
        settings(tmp_path)


def test_a_repository_endpoint_gets_nothing_and_the_cli_says_why(repo, env):
    Listener.requests = []
    evil = serve_in_thread(Listener)
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [RIGHT], []
    good = serve_in_thread(ScriptedChatServer)
    user = Path(env["XDG_CONFIG_HOME"]) / "ds4" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text(f'endpoint = "http://127.0.0.1:{good.server_port}"\n')
    (repo / ".ds4.toml").write_text(f'endpoint = "http://127.0.0.1:{evil.server_port}"\n')
    try:
        done = run_cli("fix", "add(2, 3) returns -1", "--repo", str(repo), timeout=120, env=env)
    finally:
        evil.shutdown()
        good.shutdown()
    assert done.returncode == 2
    assert (
        "a repository's settings may not set endpoint" in done.stderr
        and str(repo / ".ds4.toml") in done.stderr
    )
    assert Listener.requests == [] and ScriptedChatServer.bodies == []


def test_a_repository_test_command_is_shown_before_it_runs(repo, env):
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [RIGHT], []
    chat = serve_in_thread(ScriptedChatServer)
    (repo / ".ds4.toml").write_text('test_cmd = "python -m pytest -q -rf"\nbudget = 4000\n')
    try:
        done = run_cli(
            "fix",
            "add(2, 3) returns -1",
            "--repo",
            str(repo),
            "--endpoint",
            f"http://127.0.0.1:{chat.server_port}",
            timeout=120,
            env=env,
        )
    finally:
        chat.shutdown()
    assert done.returncode == 0, done.stderr
    shown = done.stderr.index(f"{repo / '.ds4.toml'} sets the test command")
    assert "python -m pytest -q -rf" in done.stderr[shown:] and shown < done.stderr.index("baseline tests")


@pytest.mark.parametrize("link", [".ds4", ".ds4/runs", ".ds4/index.db"])
def test_a_committed_ds4_symlink_is_refused_by_the_cli(repo, env, tmp_path, link):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / link).parent.mkdir(exist_ok=True)
    (repo / link).symlink_to(elsewhere / "target" if link.endswith(".db") else elsewhere)
    done = run_cli(
        "fix",
        "x",
        "--repo",
        str(repo),
        "--endpoint",
        "http://127.0.0.1:9",
        "--test-cmd",
        "true",
        timeout=120,
        env=env,
    )
    assert done.returncode == 2 and f"{link} is a symlink" in done.stderr
    assert list(elsewhere.iterdir()) == []


@pytest.fixture()
def roots(tmp_path):
    root = tmp_path / "repos"
    return root, make_repo(root / "calc", BUGGY)


def server_config(tmp_path, root, **kw) -> ServerConfig:
    return ServerConfig(repo_roots=[str(root)], jobs_db=str(tmp_path / "data" / "jobs.db"), **kw)


def test_a_registered_repository_swapped_for_a_symlink_is_refused(served, roots, tmp_path):
    root, repo = roots
    other = make_repo(root / "other", BUGGY)
    outside = make_repo(tmp_path / "outside", BUGGY)
    server = Server(create_app(served, server_config(tmp_path, root), backend=ScriptedBackend([])))
    try:
        _, registered = server.call("POST", "/v1/repos", {"path": str(repo)})
        repo_id = registered["id"]
        for target in (outside, other):
            shutil.rmtree(repo) if not repo.is_symlink() else repo.unlink()
            repo.symlink_to(target)
            for method, path, body in (
                ("POST", f"/v1/repos/{repo_id}/index", None),
                ("GET", f"/v1/repos/{repo_id}/search?q=add", None),
                ("POST", "/v1/fix", {"repo_id": repo_id, "issue": "add(2, 3) returns -1"}),
            ):
                status, answer = server.call(method, path, body)
                assert status == 403 and answer["error"]["code"] == "path_refused", (target, path, answer)
        assert not (outside / ".ds4").exists() and not (other / ".ds4").exists()
    finally:
        server.stop()


def test_the_server_keeps_its_data_out_of_the_repository(served, roots, tmp_path):
    root, repo = roots
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / ".ds4").symlink_to(elsewhere)
    subprocess.run(["git", "-C", str(repo), "add", ".ds4"], check=True)
    config = server_config(tmp_path, root, test_cmd="python -m pytest -q -rf")
    server = Server(create_app(served, config, backend=ScriptedBackend([RIGHT])))
    try:
        _, registered = server.call("POST", "/v1/repos", {"path": str(repo)})
        status, _ = server.call("POST", f"/v1/repos/{registered['id']}/index")
        assert status == 200
        status, job = server.call(
            "POST", "/v1/fix", {"repo_id": registered["id"], "issue": "add(2, 3) returns -1"}
        )
        events = server.events(f"/v1/jobs/{job['id']}/events")
        assert events[-1]["status"] == "finished", events
        _, done = server.call("GET", f"/v1/jobs/{job['id']}")
        assert done["verdict"] == "resolved"
    finally:
        server.stop()
    data = repo_data_dir(config.jobs_db, registered["id"])
    assert (data / "index.db").is_file() and len(list((data / "runs").iterdir())) == 1
    assert list(elsewhere.iterdir()) == []


def test_stopping_the_server_kills_a_running_test_command(served, roots, tmp_path):
    root, repo = roots
    marker = f"{34000 + os.getpid() % 1000}.5"
    config = server_config(tmp_path, root, test_cmd=f"sleep {marker}")
    server = Server(create_app(served, config, backend=ScriptedBackend([])))
    try:
        _, registered = server.call("POST", "/v1/repos", {"path": str(repo)})
        server.call("POST", "/v1/fix", {"repo_id": registered["id"], "issue": "x"})
        assert wait_for(lambda: processes_with(f"sleep {marker}"), 60)
    finally:
        server.stop()
    assert wait_for(lambda: not processes_with(f"sleep {marker}"), 10), processes_with(f"sleep {marker}")


def test_worktrees_a_killed_server_left_are_pruned_at_start_up(served, roots, tmp_path):
    root, repo = roots
    config = server_config(tmp_path, root)
    registered = JobStore(config.jobs_db).add_repo(repo.resolve())
    left = repo_data_dir(config.jobs_db, registered["id"]) / "runs" / "20260101-000000-dead00" / "sample-1"
    left.parent.mkdir(parents=True)
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(left), "HEAD"], check=True
    )
    app = create_app(served, config, backend=ScriptedBackend([]))
    listed = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True
    ).stdout
    app.state.runner.shutdown()
    assert not left.exists() and len(listed.splitlines()) == 1, listed


def wait_finished(store: JobStore, job_id: str) -> dict:
    assert wait_for(lambda: store.job(job_id)["status"] not in ("queued", "running"), 120)
    return store.job(job_id)


@pytest.fixture()
def no_bwrap(tmp_path, monkeypatch):
    """A PATH with git but no bubblewrap, as on a machine that lacks it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    bubblewrap_problem.cache_clear()
    yield
    bubblewrap_problem.cache_clear()


def test_without_a_sandbox_the_server_refuses_to_run_tests(roots, tmp_path, no_bwrap):
    root, repo = roots
    store = JobStore(tmp_path / "jobs.db")
    runner = JobRunner(store, ScriptedBackend([]), server_config(tmp_path, root, test_cmd="true"))
    job_id = store.create_job(store.add_repo(repo.resolve())["id"], "x", {"issue": "x", "test_cmd": "true"})
    runner.submit(job_id)
    failed = wait_finished(store, job_id)
    runner.shutdown()
    assert failed["status"] == "failed" and "--allow-unsandboxed-tests" in failed["message"]


def test_allowed_unsandboxed_a_repository_command_still_never_runs_bare(roots, tmp_path, no_bwrap):
    root, repo = roots
    store = JobStore(tmp_path / "jobs.db")
    config = server_config(tmp_path, root, allow_unsandboxed_tests=True)
    runner = JobRunner(store, ScriptedBackend([]), config)
    repo_id = store.add_repo(repo.resolve())["id"]
    spec = {"issue": "x", "rounds": 1, "samples": 1, "budget": 4000, "max_tokens": 64}
    from_repo = store.create_job(repo_id, "x", spec | {"test_cmd": "touch ran", "test_cmd_from": "repo"})
    from_server = store.create_job(
        repo_id, "x", spec | {"test_cmd": "test -f calc.py", "test_cmd_from": "server"}
    )
    runner.submit(from_repo)
    runner.submit(from_server)
    refused, ran = wait_finished(store, from_repo), wait_finished(store, from_server)
    runner.shutdown()
    assert refused["status"] == "failed" and "only in a sandbox" in refused["message"]
    assert ran["status"] == "finished", ran["message"]
    assert ran["result"]["candidates"][0]["rounds"] == 1
