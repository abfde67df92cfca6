"""SWE-bench in and out on an instance built from the pricing example: the gold patch resolves it, an
empty patch fails it, and predictions carry the harness's fields."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ds4.agent.loop import FixConfig
from ds4.agent.swebench import evaluate, load_jsonl, predict
from tests.fakes import EXAMPLES, GOLD, ScriptedBackend, ScriptedChatServer


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def instance(tmp_path):
    """base_commit: the pricing example without its tests; test_patch adds them, as SWE-bench does."""
    repos = tmp_path / "repos"
    repo = repos / "ds4__pricing-py"
    shutil.copytree(EXAMPLES / "pricing-py", repo)
    tests = (repo / "tests" / "test_pricing.py").read_text()
    (repo / "tests" / "test_pricing.py").unlink()
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    (repo / "tests" / "test_pricing.py").write_text(tests)
    git(repo, "add", "-A")
    test_patch = git(repo, "diff", "--cached", "HEAD")
    git(repo, "reset", "-q", "--hard", base)
    return repos, {
        "instance_id": "ds4__pricing-py-1",
        "repo": "ds4/pricing-py",
        "base_commit": base,
        "problem_statement": (EXAMPLES / "pricing-py" / "ISSUE.md").read_text(),
        "test_patch": test_patch,
        "patch": (GOLD / "pricing-py.diff").read_text(),
        "FAIL_TO_PASS": json.dumps(
            [
                "tests/test_pricing.py::test_tier_thresholds_are_inclusive",
                "tests/test_pricing.py::test_line_total_applies_the_tier",
                "tests/test_pricing.py::test_coupon_never_makes_an_order_negative",
            ]
        ),
        "PASS_TO_PASS": json.dumps(
            [
                "tests/test_pricing.py::test_no_discount_below_the_first_tier",
                "tests/test_pricing.py::test_tax_on_discounted_subtotal",
            ]
        ),
    }


def test_gold_patch_resolves_and_empty_patch_fails(instance):
    repos, inst = instance
    gold = evaluate([inst], [{"instance_id": inst["instance_id"], "model_patch": inst["patch"]}], repos)[0]
    assert gold.status == "resolved" and all(gold.fail_to_pass.values()) and all(gold.pass_to_pass.values())
    empty = evaluate([inst], [{"instance_id": inst["instance_id"], "model_patch": ""}], repos)[0]
    assert (
        empty.status == "failed" and not any(empty.fail_to_pass.values()) and all(empty.pass_to_pass.values())
    )


def test_half_a_fix_is_partial(instance):
    repos, inst = instance
    tiers_only = "diff --git a/pricing/tiers.py" + inst["patch"].split("diff --git a/pricing/tiers.py")[1]
    result = evaluate([inst], [{"instance_id": inst["instance_id"], "model_patch": tiers_only}], repos)[0]
    assert result.status == "partial"


def test_predict_writes_the_harness_fields(instance, tmp_path):
    repos, inst = instance
    right = (
        "pricing/tiers.py\n<<<<<<< SEARCH\n        if quantity > threshold:\n=======\n"
        "        if quantity >= threshold:\n>>>>>>> REPLACE\n"
    )
    out = tmp_path / "preds.jsonl"
    predict(
        [inst],
        repos,
        ScriptedBackend([right]),
        out,
        lambda repo, issue: FixConfig(
            repo=repo, issue=issue, test_cmd="python -m pytest -q -rf", rounds=1, budget=3000
        ),
    )
    preds = load_jsonl(out)
    assert set(preds[0]) == {"instance_id", "model_name_or_path", "model_patch"}
    assert "if quantity >= threshold:" in preds[0]["model_patch"]
    result = evaluate([inst], preds, repos)[0]
    assert result.status == "partial"  # the tier fix alone: the coupon test still fails


def test_cli_predict_against_an_endpoint_then_evaluate(instance, tmp_path):
    """Both subcommands as a user runs them: predictions from an OpenAI-compatible server on loopback,
    then the local evaluation of those predictions."""
    import sys
    import threading
    from http.server import ThreadingHTTPServer

    repos, inst = instance
    instances = tmp_path / "instances.jsonl"
    instances.write_text(json.dumps(inst) + "\n")
    exe = str(Path(sys.executable).parent / "ds4-agent")
    both = (
        "pricing/tiers.py\n<<<<<<< SEARCH\n        if quantity > threshold:\n=======\n"
        "        if quantity >= threshold:\n>>>>>>> REPLACE\n\n"
        "pricing/order.py\n<<<<<<< SEARCH\n"
        "        discounted = self.subtotal_cents() - self.coupon_cents\n=======\n"
        "        discounted = max(0, self.subtotal_cents() - self.coupon_cents)\n>>>>>>> REPLACE\n"
    )
    ScriptedChatServer.answers, ScriptedChatServer.bodies = [both], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    preds = tmp_path / "preds.jsonl"
    try:
        done = subprocess.run(
            [
                exe,
                "swebench",
                "predict",
                str(instances),
                "--repos-dir",
                str(repos),
                "--out",
                str(preds),
                "--endpoint",
                f"http://127.0.0.1:{server.server_port}",
                "--rounds",
                "1",
                "--budget",
                "3000",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert "1 predictions written" in done.stdout and "(1 with a patch)" in done.stdout
    assert git(repos / "ds4__pricing-py", "status", "--porcelain") == ""  # the user's clone is untouched
    done = subprocess.run(
        [exe, "swebench", "evaluate", str(instances), str(preds), "--repos-dir", str(repos), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["status"] == "resolved" and all(result["fail_to_pass"].values())


def test_malformed_instances_file_is_a_clear_error(tmp_path):
    import sys

    bad = tmp_path / "instances.jsonl"
    bad.write_text('{"instance_id": "a"}\nnot json\n')
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "ds4-agent"),
            "swebench",
            "evaluate",
            str(bad),
            str(bad),
            "--repos-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "instances.jsonl:2: not JSON" in done.stderr
