"""The main LSP flow driven by a real editor: Neovim headless (Debian's 0.7.2 in CI) runs
tests/lsp/neovim_flow.lua, which starts ds4's language server (scripted backend) with
`vim.lsp.start_client`, finds a symbol, runs ds4.fix and lets Neovim apply the edit and write the
buffer. The repository's own tests then pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import BUGGY, RIGHT, make_repo

ROOT = Path(__file__).resolve().parents[2]
NVIM = shutil.which("nvim")


@pytest.fixture()
def nvim() -> str:
    if NVIM is None:
        pytest.fail("Neovim is needed for this test: apt-get install neovim (.ci/run installs it)")
    return NVIM


def test_neovim_finds_a_symbol_runs_ds4_fix_and_writes_the_fixed_buffer(nvim, tmp_path):
    repo = make_repo(tmp_path / "repo", BUGGY)
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"answers": [RIGHT]}))
    args = {
        "repo": str(repo),
        "cmd": [sys.executable, "-m", "tests.lsp.scripted_server", str(script)],
        "cwd": str(ROOT),
        "issue": "add(2, 3) returns -1 instead of 5",
        "test_command": "python -m pytest -q -rf",
        "out": str(tmp_path / "out.json"),
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    run = subprocess.run(
        [nvim, "--headless", "--clean", "-u", "NONE", "-c", f"luafile {ROOT / 'tests/lsp/neovim_flow.lua'}"],
        env={**os.environ, "DS4_FLOW_ARGS": str(tmp_path / "args.json")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (tmp_path / "out.json").exists(), run.stdout + run.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["error"] is None, out
    assert out["progress"][:1] == ["begin"] and "end" in out["progress"]
    assert out["symbols"][0]["name"] == "mul" and out["symbols"][0]["uri"].endswith("/calc.py")
    assert out["fix"]["status"] == "resolved" and out["fix"]["applied"] is True, out
    assert "return a + b" in out["buffer"]
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"].replace("a - b", "a + b")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout
