"""The `ds4-agent` command line through real subprocesses: help, model init, generate, bench and the
one-line errors of the CLI boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds4.engine import LLM, SamplingParams
from tests.servers import ENV, run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "v32"
    result = run_cli(
        "model", "init", "--family", "deepseek_v32", "--preset", "tiny", "--out", out, "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    return out


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("model", "generate", "bench"):
        assert command in result.stdout


def test_parser_does_not_import_torch():
    code = "import sys, ds4.agent.cli as c; c.build_parser(); assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr


def test_a_command_imports_only_its_own_module():
    code = (
        "import contextlib, sys\nfrom ds4.agent.cli import main\n"
        "for argv in (['--help'], ['fix', '--help']):\n"
        "    with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    print(sorted(m for m in sys.modules if m.startswith('ds4.agent.cli.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[]"  # the top-level --help lists the commands without importing any
    assert lines[-1] == "['ds4.agent.cli.fix', 'ds4.agent.cli.flags', 'ds4.agent.cli.inputs']"


def test_model_init_writes_checkpoint(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32"
    assert (model_dir / "tokenizer.json").is_file()
    assert (model_dir / "model.safetensors").stat().st_size > 0


def test_model_init_is_deterministic(model_dir, tmp_path):
    args = ("model", "init", "--family", "deepseek_v32", "--preset", "tiny", "--seed", "3", "--out")
    assert run_cli(*args, tmp_path / "again").returncode == 0
    assert run_cli(*args[:-2], "4", "--out", tmp_path / "other").returncode == 0
    weights = (model_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != weights


@pytest.fixture(scope="module")
def expected_text(model_dir):
    return LLM(model_dir).generate("def f(x):", SamplingParams(temperature=0.0, max_tokens=8))[0].text


def test_generate_streams_the_completion(model_dir, expected_text):
    result = run_cli("generate", "--model", model_dir, "--max-tokens", "8", "def f(x):")
    assert result.returncode == 0, result.stderr
    assert expected_text
    assert result.stdout == expected_text + "\n"


def test_generate_no_stream_prints_the_same(model_dir, expected_text):
    result = run_cli("generate", "--model", model_dir, "--max-tokens", "8", "--no-stream", "def f(x):")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text + "\n"


def test_missing_model_is_one_line_error():
    result = run_cli("generate", "--model", "/nonexistent", "--max-tokens", "4", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("ds4-agent: error:")
    assert "/nonexistent" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_bad_sampling_option_is_one_line_error(model_dir):
    result = run_cli("generate", "--model", model_dir, "--temperature", "-1", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["ds4-agent: error: temperature must be >= 0, got -1.0"]


def test_bad_family_is_usage_error(tmp_path):
    result = run_cli("model", "init", "--family", "llama", "--preset", "tiny", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert "invalid choice: 'llama'" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bench_engine_json(model_dir):
    result = run_cli(
        "bench",
        "engine",
        "--model",
        model_dir,
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "12",
        "--runs",
        "2",
        "--batch",
        "3",
        "--batch-prompt-tokens",
        "8",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for engine in ("ds4", "transformers"):
        assert report[engine]["decode_tokens_per_s"] > 0 and report[engine]["batch_decode_tokens_per_s"] > 0
    assert set(report["ratio"]) == {
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "batch_decode_tokens_per_s",
    }
    assert all(v > 0 for v in report["ratio"].values())
    # the CPU path's decode step waits for nothing but copies its ids back; its aten calls are counted
    assert report["ds4"]["host_syncs_per_token"] >= 1 and report["ds4"]["aten_ops_per_token"] > 100


def test_device_mistakes_are_one_line_errors(model_dir):
    import torch

    result = run_cli("generate", "--model", model_dir, "--device", "gpu", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ds4-agent: error: --device gpu: not a device; use cpu, cuda or cuda:N (e.g. cuda:0)"
    ]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = run_cli("generate", "--model", model_dir, "--device", f"cuda:{count}", "hi")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if count == 0:  # this torch or this machine has no CUDA
        assert "--device cuda:0: no CUDA device here" in result.stderr and "use --device cpu" in result.stderr
    else:
        assert f"there are {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})" in result.stderr


def test_apply_json_says_which_edits_went_to_which_files(tmp_path):
    from tests.fakes import BUGGY, RIGHT, make_repo

    repo = make_repo(tmp_path / "r", BUGGY)
    (tmp_path / "answer.md").write_text(RIGHT)
    (tmp_path / "bad.md").write_text(RIGHT.replace("return a - b", "return a ^ b"))
    checked = run_cli("apply", tmp_path / "answer.md", "--repo", repo, "--check", "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {
        "status": "checked",
        "edits": [{"block": 1, "path": "calc.py", "how": "exact"}],
        "files": [{"path": "calc.py", "deleted": False}],
        "error": None,
    }
    assert "a - b" in (repo / "calc.py").read_text()
    applied = run_cli("apply", tmp_path / "answer.md", "--repo", repo, "--json")
    assert json.loads(applied.stdout)["status"] == "applied" and "a + b" in (repo / "calc.py").read_text()
    refused = run_cli("apply", tmp_path / "bad.md", "--repo", repo, "--json")
    answer = json.loads(refused.stdout)
    assert refused.returncode == 1 and (answer["status"], answer["edits"]) == ("refused", [])
    assert "block 1 (calc.py): the SEARCH lines are not in the file" in answer["error"]


def test_bench_compile_names_what_it_does_not_know():
    result = run_cli("bench", "compile", "--cards", "sm89,sm70")
    assert result.returncode == 2
    assert result.stderr.strip() == "ds4-agent: error: unknown sm70; choose from sm89, sm90"
    result = run_cli("bench", "compile", "--dtypes", "float16", "--no-engine")
    assert result.returncode == 2 and "unknown float16; choose from bfloat16, float32" in result.stderr
