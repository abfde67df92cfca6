"""The fix loop with a scripted backend (a test double that plays back answers) and with a scripted
OpenAI-compatible server on loopback: rounds, feedback, timeouts, selection, and the user's tree."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from ds4.agent.backends import GenerationParams, OpenAIBackend
from ds4.agent.loop import FixConfig, fix
from tests.fakes import (
    BUGGY,
    ISSUE,
    RIGHT,
    RIGHT_AFTER_WRONG,
    WRONG,
    ScriptedBackend,
    ScriptedChatServer,
    edit,
    fix_config,
)
from tests.servers import run_cli, serve_in_thread


def test_a_correct_patch_in_round_two_resolves(repo):
    backend = ScriptedBackend([WRONG, RIGHT_AFTER_WRONG])
    result = fix(fix_config(repo), backend)
    assert result.status == "resolved" and result.rounds == 2
    assert "-    return a - b\n+    return a + b" in result.diff  # the whole patch, against HEAD
    round_two = backend.asked[1][-1]["content"]
    assert "the tests fail" in round_two and "test_add" in round_two  # the failure was fed back
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"]  # the user's tree is untouched
    assert not subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_malformed_answers_become_feedback(repo):
    backend = ScriptedBackend(["I would change the subtraction.", edit("return a * b * 2", "x"), RIGHT])
    result = fix(fix_config(repo), backend)
    assert result.status == "resolved" and result.rounds == 3
    assert "no edits found" in backend.asked[1][-1]["content"]
    assert (
        "not in the file" in backend.asked[2][-1]["content"]
        and "closest lines" in backend.asked[2][-1]["content"]
    )


def test_a_hanging_test_command_times_out_and_is_reported(repo):
    result = fix(fix_config(repo, test_cmd="sleep 30", test_timeout=1.0, rounds=1), ScriptedBackend([RIGHT]))
    assert result.status == "unresolved" and result.tests["timed_out"] is True


def test_apply_writes_the_selected_patch_to_the_user_tree(repo):
    result = fix(fix_config(repo, apply=True), ScriptedBackend([RIGHT]))
    assert result.status == "resolved" and result.applied
    assert "return a + b" in (repo / "calc.py").read_text()


def test_the_passing_sample_is_selected(repo):
    backend = ScriptedBackend([WRONG, RIGHT])
    result = fix(fix_config(repo, rounds=1, samples=2), backend)
    assert result.status == "resolved" and [c.passed for c in result.candidates] == [False, True]
    assert "return a + b" in result.diff


def test_the_run_folder_keeps_the_trajectory(repo):
    result = fix(fix_config(repo), ScriptedBackend([WRONG, RIGHT_AFTER_WRONG]))
    run = Path(result.run_dir)
    names = {p.name for p in run.iterdir()}
    assert {
        "prompt.txt",
        "manifest.json",
        "baseline-tests.log",
        "trajectory.json",
        "result.json",
        "sample-1-round-1-answer.md",
        "sample-1-round-2.diff",
        "sample-1-round-2-tests.log",
    } <= names
    events = [e["event"] for e in json.loads((run / "trajectory.json").read_text())["events"]]
    assert events[:3] == ["index", "baseline", "baseline_done"] and events[-1] == "done"
    assert not list((repo / ".ds4" / "runs").glob("*/sample-1/*"))  # worktrees are removed


def test_uncommitted_user_changes_are_part_of_the_starting_point(repo):
    (repo / "calc.py").write_text(BUGGY["calc.py"].replace("a * b", "b * a"))
    result = fix(fix_config(repo), ScriptedBackend([RIGHT]))
    assert result.status == "resolved" and "b * a" not in result.diff
    assert (repo / "calc.py").read_text().count("b * a") == 1  # still the user's, unmodified


def test_against_an_openai_compatible_endpoint_on_loopback(repo):
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [WRONG, RIGHT_AFTER_WRONG], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_port}", "deepseek", api_key="k")
        result = fix(fix_config(repo), backend)
    finally:
        server.shutdown()
    assert result.status == "resolved" and result.rounds == 2
    first = ScriptedChatServer.bodies[0]
    assert (
        first["stream"] is True and first["model"] == "deepseek" and first["messages"][0]["role"] == "system"
    )
    trajectory = json.loads((Path(result.run_dir) / "trajectory.json").read_text())
    answers = [e for e in trajectory["events"] if e["event"] == "answer"]
    assert answers[0]["cached_tokens"] == 512


def test_unreachable_endpoint_is_an_error_not_a_crash(repo):
    backend = OpenAIBackend("http://127.0.0.1:9", retries=0, timeout=2)
    result = fix(fix_config(repo), backend)
    assert result.status == "error" and "cannot reach" in result.message


def test_fix_cli_json(repo):
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [RIGHT], []
    server = serve_in_thread(ScriptedChatServer)
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        done = run_cli(
            "fix", ISSUE, "--repo", repo, "--endpoint", endpoint, "--budget", "4000", "--json", timeout=120
        )
    finally:
        server.shutdown()
    out = json.loads(done.stdout)
    assert done.returncode == 0 and out["status"] == "resolved"
    assert {"status", "diff", "rounds", "tests", "run_dir"} <= out.keys()


@pytest.mark.slow
def test_local_engine_end_to_end_on_a_tiny_checkpoint(repo, tiny_v3):
    from ds4.agent.backends import LocalBackend

    backend = LocalBackend(tiny_v3)
    result = fix(
        FixConfig(
            repo=repo,
            issue=ISSUE,
            test_cmd="python -m pytest -q -rf",
            budget=1200,
            rounds=1,
            generation=GenerationParams(max_tokens=48),
        ),
        backend,
    )
    assert result.status == "unresolved"  # a tiny random model cannot be expected to fix anything
    trajectory = json.loads((Path(result.run_dir) / "trajectory.json").read_text())
    [answer] = [e for e in trajectory["events"] if e["event"] == "answer"]
    assert answer["prompt_tokens"] > 500 and 1 <= answer["tokens"] <= 48  # generated ids, not re-encoded text


def test_a_backend_failure_in_a_later_round_ends_that_candidate_only(repo):
    class FailsLater(ScriptedBackend):
        def complete(self, messages, params, on_text=None):
            if len(self.asked) == 1:
                from ds4.agent.backends import BackendError

                self.asked.append(messages)
                raise BackendError("the prompt has 2104 tokens; the model's limit is 2048")
            return super().complete(messages, params, on_text)

    result = fix(fix_config(repo), FailsLater([WRONG]))
    assert result.status == "unresolved" and "limit" in result.candidates[0].error


def test_unsaved_buffers_are_what_is_packed_tested_and_diffed(repo):
    """An editor's unsaved text (here: calc.py with a new function, the bug still in it) is packed,
    tested and diffed against; the file on disk stays as it was."""
    buffer = BUGGY["calc.py"] + "\n\ndef unsaved_helper():\n    return 41\n"
    backend = ScriptedBackend([RIGHT])
    result = fix(fix_config(repo, overlay={"calc.py": buffer}), backend)
    assert result.status == "resolved"
    assert "def unsaved_helper():" in backend.asked[0][-1]["content"]  # the buffer was packed
    assert "unsaved_helper" not in result.diff  # the diff is against the buffer, not against disk
    assert "-    return a - b\n+    return a + b" in result.diff
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"]


def test_an_unsaved_buffer_outside_the_repository_is_refused(repo):
    result = fix(fix_config(repo, overlay={"../escape.py": "x = 1\n"}), ScriptedBackend([RIGHT]))
    assert result.status == "error" and "outside the repository" in result.message
    assert not (repo.parent / "escape.py").exists()


def test_a_passing_baseline_is_reported_as_unable_to_confirm_a_fix(repo):
    from ds4.agent.events import describe

    events = []
    result = fix(fix_config(repo, test_cmd="true"), ScriptedBackend([RIGHT]), events.append)
    assert "cannot confirm this fix" in result.message
    baseline = next(e for e in events if e["event"] == "baseline_done")
    assert "cannot confirm a fix" in describe(baseline)
    assert describe({**baseline, "exit_code": 1}) == "baseline: the tests fail (exit code 1)"


LONG_FAILURE = (  # a test command whose failure log is far longer than a small context
    "python -c \"import sys; print('\\n'.join(f'line {i}: AssertionError: add(2, 3) == -1, expected 5' "
    'for i in range(400))); sys.exit(1)"'
)


def test_the_budget_fits_the_context_and_later_rounds_are_trimmed_not_ended(repo):
    from ds4.agent.fit import budget_for, message_tokens
    from ds4.agent.loop import PROMPTS
    from ds4.agent.tokens import ApproxCounter

    counter, context, max_tokens = ApproxCounter(), 2500, 200
    answers = [WRONG, edit("    return a - b + 0", "    return a - b + 1")]
    answers.append(edit("    return a - b + 1", "    return a - b + 2"))
    backend = ScriptedBackend(answers, max_model_len=context)
    config = fix_config(
        repo, budget=None, test_cmd=LONG_FAILURE, generation=GenerationParams(max_tokens=max_tokens)
    )
    result = fix(config, backend)
    assert (result.status, result.rounds, result.candidates[0].error) == ("unresolved", 3, None)
    manifest = json.loads((Path(result.run_dir) / "manifest.json").read_text())
    instructions = counter.count((PROMPTS / "fix.md").read_text())
    assert manifest["budget"] == budget_for(context, max_tokens, instructions, 3)
    sizes = [message_tokens(asked, counter) for asked in backend.asked]
    assert len(sizes) == 3 and max(sizes) <= context - max_tokens, sizes
    assert all(asked[:2] == backend.asked[0] for asked in backend.asked)  # the packed prompt whole
    assert "characters cut to fit the model's context" in backend.asked[1][-1]["content"]
    assert len(backend.asked[2]) == 4  # round 3: round 1's answer and feedback dropped, round 2's kept
    trajectory = json.loads((Path(result.run_dir) / "trajectory.json").read_text())
    assert [e["round"] for e in trajectory["events"] if e["event"] == "trimmed"] == [2, 3]


def test_a_prompt_over_the_context_ends_before_any_test_runs(repo, tmp_path):
    marker = tmp_path / "tests-ran"
    backend = ScriptedBackend([RIGHT], max_model_len=1000)
    result = fix(fix_config(repo, budget=4000, test_cmd=f"touch {marker}"), backend)
    assert result.status == "error" and not marker.exists() and backend.asked == []
    assert "more than the model's context of 1,000; lower --max-tokens" in result.message


@pytest.mark.slow
def test_the_tiny_model_gets_prompts_that_fit_its_context_every_round(repo, tiny_v3):
    from ds4.agent.backends import LocalBackend

    backend = LocalBackend(tiny_v3)
    config = fix_config(
        repo, budget=None, test_cmd=LONG_FAILURE, rounds=2, generation=GenerationParams(max_tokens=32)
    )
    result = fix(config, backend)
    trajectory = json.loads((Path(result.run_dir) / "trajectory.json").read_text())
    answers = [e for e in trajectory["events"] if e["event"] == "answer"]
    assert result.status == "unresolved" and len(answers) == 2, trajectory["events"]
    assert all(a["prompt_tokens"] + 32 <= backend.max_model_len for a in answers)
    assert not [e for e in trajectory["events"] if e["event"] == "backend_error"]


class SeededChatServer(ScriptedChatServer):
    """Test double: answers by the request's seed (sample 1 asks without one) once `expect` requests are
    in flight (or after 10 s), and records the most requests it held at once."""

    by_seed = {None: WRONG, 2: RIGHT, 3: RIGHT}
    num_in_flight = max_in_flight = 0
    expect = 1
    lock = threading.Lock()

    def answer_for(self, body: dict) -> str:
        cls = type(self)
        with cls.lock:
            cls.num_in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.num_in_flight)
        deadline = time.monotonic() + 10  # the other samples' requests arrive, however slow the machine
        while cls.max_in_flight < cls.expect and time.monotonic() < deadline:
            time.sleep(0.01)
        with cls.lock:
            cls.num_in_flight -= 1
        return cls.by_seed[body.get("seed")]


def test_samples_against_an_endpoint_run_at_once_with_the_same_results(repo):
    server = ThreadingHTTPServer(("127.0.0.1", 0), SeededChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results, max_in_flight = [], []
    try:
        for concurrent in (True, False):
            SeededChatServer.max_in_flight, SeededChatServer.expect = 0, 3 if concurrent else 1
            backend = OpenAIBackend(f"http://127.0.0.1:{server.server_port}", "deepseek", retries=0)
            backend.can_run_concurrently = concurrent
            results.append(fix(fix_config(repo, rounds=1, samples=3), backend))
            max_in_flight.append(SeededChatServer.max_in_flight)
    finally:
        server.shutdown()
    assert max_in_flight == [3, 1]
    concurrent, sequential = results
    assert concurrent.status == "resolved" and "return a + b" in concurrent.diff

    def content(result):
        return result.status, result.diff, [(c.sample, c.diff, c.passed, c.failed) for c in result.candidates]

    assert content(concurrent) == content(sequential)
    assert [c.passed for c in concurrent.candidates] == [False, True, True]
