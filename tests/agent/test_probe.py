"""The endpoint probe (agent/probe.py) against real loopback servers, and `ds4-agent fix` ending on each
failure it finds (nothing listening, a refused key, an unknown model) in one line, exit 2, before its test
command has run: the test command would write a marker file, and none is written."""

from __future__ import annotations

import json
import os
import subprocess
from http.server import BaseHTTPRequestHandler

import pytest

from ds4.agent.backends import OpenAIBackend
from ds4.agent.errors import BackendError
from ds4.agent.probe import ListedModel, choose_model, list_models, models_url
from tests.fakes import RIGHT, ScriptedChatServer
from tests.servers import EXE, free_port, serve_in_thread


class RefusingKey(BaseHTTPRequestHandler):
    """Test double: a server that refuses every key with 401, and counts the requests it was sent."""

    num_requests = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).num_requests += 1
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": {"message": "invalid api key", "type": "invalid_request_error"}}')

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture()
def chat():
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [RIGHT], []
    listed = ScriptedChatServer.models
    ScriptedChatServer.models = [
        {"id": "deepseek-v4", "object": "model", "max_model_len": 16384},
        {"id": "deepseek-v4-flash", "object": "model"},
    ]
    server = serve_in_thread(ScriptedChatServer)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    ScriptedChatServer.models = listed


@pytest.fixture()
def env(tmp_path):
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "DS4_API_KEY": "k", "OPENAI_API_KEY": ""}


def test_models_url_from_any_spelling_of_the_endpoint():
    urls = {
        models_url(e)
        for e in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions")
    }
    assert urls == {"http://h:1/v1/models"}


def test_the_listed_models_with_their_context_and_the_one_chosen(chat):
    models = list_models(chat, None)
    assert models == [ListedModel("deepseek-v4", 16384), ListedModel("deepseek-v4-flash", None)]
    assert choose_model(models, None, chat).id == "deepseek-v4"
    assert choose_model(models, "deepseek-v4-flash", chat).id == "deepseek-v4-flash"
    with pytest.raises(BackendError, match=r"serves no model 'gpt-4'.*\(deepseek-v4, deepseek-v4-flash\)"):
        choose_model(models, "gpt-4", chat)


def test_a_probed_backend_asks_for_the_model_chosen_and_knows_its_context(chat):
    backend = OpenAIBackend(chat)
    backend.probe()
    assert (backend.model, backend.max_model_len) == ("deepseek-v4", 16384)
    assert backend.name == f"openai:deepseek-v4@{chat}"
    unnamed = OpenAIBackend(chat)  # not probed: the first request asks for the list first
    from ds4.agent.backends import GenerationParams

    unnamed.complete([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=8))
    assert ScriptedChatServer.bodies[-1]["model"] == "deepseek-v4"


def _fix(repo, endpoint, env, *more):
    marker = repo.parent / "tests-ran"
    done = subprocess.run(
        [EXE, "fix", "--issue-text", "add(2, 3) returns -1", "--repo", str(repo), "--endpoint", endpoint]
        + ["--test-cmd", f"touch {marker}", "--no-sandbox", "--rounds", "1", *more],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return done, marker.exists()


def test_fix_with_nothing_listening_ends_before_the_tests(repo, env):
    done, tests_ran = _fix(repo, f"http://127.0.0.1:{free_port()}", env)
    assert (done.returncode, tests_ran) == (2, False), done.stderr
    assert done.stderr.count("\n") == 1
    assert "cannot reach" in done.stderr and "start the server or correct --endpoint" in done.stderr


def test_fix_with_a_refused_key_ends_before_the_tests(repo, env):
    RefusingKey.num_requests = 0
    server = serve_in_thread(RefusingKey)
    try:
        done, tests_ran = _fix(repo, f"http://127.0.0.1:{server.server_port}", env)
    finally:
        server.shutdown()
        server.server_close()
    assert (done.returncode, tests_ran, RefusingKey.num_requests) == (2, False, 1), done.stderr
    assert done.stderr.count("\n") == 1
    assert "refused the API key (401): set DS4_API_KEY or OPENAI_API_KEY" in done.stderr


def test_fix_with_an_unknown_model_ends_before_the_tests(repo, env, chat):
    done, tests_ran = _fix(repo, chat, env, "--model-name", "deepseek-v3")
    assert (done.returncode, tests_ran) == (2, False), done.stderr
    assert done.stderr.count("\n") == 1
    assert "serves no model 'deepseek-v3': pass --model-name with one it serves" in done.stderr
    assert ScriptedChatServer.bodies == []  # no chat request either


def test_fix_without_a_model_name_asks_for_the_first_listed(repo, env, chat):
    done, tests_ran = _fix(repo, chat, env, "--json")
    assert tests_ran, done.stderr
    assert [body["model"] for body in ScriptedChatServer.bodies] == ["deepseek-v4"]
    assert json.loads(done.stdout)["status"] == "resolved"


def test_fix_with_a_prompt_over_the_listed_context_ends_before_the_tests(repo, env, chat):
    ScriptedChatServer.models = [{"id": "small", "object": "model", "max_model_len": 1000}]
    done, tests_ran = _fix(repo, chat, env, "--budget", "4000")
    assert (done.returncode, tests_ran) == (2, False), done.stderr
    line = done.stderr.strip().splitlines()[-1]  # after the progress lines
    assert line.startswith("ds4-agent: error: the prompt has ") and "tests-ran" not in done.stderr
    assert "more than the model's context of 1,000; lower --max-tokens, or leave --budget unset" in line
    assert ScriptedChatServer.bodies == []
