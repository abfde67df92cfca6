"""`bench pack --recall` on a real git history: which commits count as small fixes, the pre-image each
hunk must show, and coverage that ds4's pack reaches where whole files cannot (the named function of
a large module at a budget far below the module), and that nothing reaches at a budget that holds only
the fixed parts."""

from __future__ import annotations

import subprocess

import pytest

from ds4.agent.bench.recall import bench_recall, bm25_order, pre_image, shows, small_fixes
from ds4.agent.cli import main
from tests.fakes import git


def filler(i: int) -> str:
    body = "\n".join(f"    value = value * {k + 2} % 97 + {i}  # mix {k}" for k in range(14))
    return f'def helper_{i}(value):\n    """Helper {i} for the ledger."""\n{body}\n    return value\n'


CHECKS = "".join(
    f"        assert amount != {k}, 'amount {k} is reserved for the ledger'\n" for k in range(40)
)
ROUNDING = f'''def rounded_total(amounts):
    """The ledger's total in cents, rounded half up."""
    cents = 0
    for amount in amounts:
{CHECKS}        cents += amount * 100
    return int(cents)
'''
FIXED_ROUNDING = ROUNDING.replace("    return int(cents)\n", "    return int(cents + 0.5)\n")
UTIL = "def parse_header(line):\n    key, value = line.split(':')\n    return key.strip(), value.strip()\n"
FIXED_UTIL = UTIL.replace("line.split(':')", "line.split(':', 1)")
TEST_UTIL = "from ledger.util import parse_header\n\n\ndef test_plain():\n    assert parse_header('a: b')\n"


def commit(root, message: str, files: dict[str, str]) -> str:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)
    return subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def core(rounding: str, extra: str = "") -> str:
    funcs = [filler(i) for i in range(200)]
    funcs.insert(120, rounding)
    return "\n\n".join(funcs) + extra


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """A history of seven commits, two of them small fixes; returns (repo, {name: sha})."""
    root = tmp_path_factory.mktemp("ledger") / "repo"
    root.mkdir()
    git(root, "init", "-q")
    shas = {}
    shas["init"] = commit(
        root,
        "A ledger",
        {
            "ledger/core.py": core(ROUNDING),
            "ledger/util.py": UTIL,
            "tests/test_util.py": TEST_UTIL,
            "README.md": "# ledger\n\nTotals and headers.\n",
        },
    )
    shas["rounding"] = commit(
        root,
        "rounded_total drops half cents: round half up",
        {"ledger/core.py": core(FIXED_ROUNDING)},
    )
    shas["readme"] = commit(root, "Say what the ledger does", {"README.md": "# ledger\n\nTotals.\n"})
    big = "".join(f"\n\ndef extra_{i}(x):\n    return x + {i}\n" for i in range(20))  # 80 added lines
    shas["big"] = commit(root, "Many extras", {"ledger/core.py": core(FIXED_ROUNDING, big)})
    shas["added"] = commit(root, "A new module", {"ledger/io.py": "def read(path):\n    return path\n"})
    shas["header"] = commit(
        root,
        "parse_header splits values that hold a colon",
        {
            "ledger/util.py": FIXED_UTIL,
            "tests/test_util.py": TEST_UTIL + "\n\ndef test_colon():\n    assert parse_header('a: b:c')\n",
        },
    )
    shas["four"] = commit(
        root,
        "Touch four files",
        {
            "ledger/util.py": FIXED_UTIL + "\n",
            "ledger/io.py": "def read(path):\n    return str(path)\n",
            "README.md": "# ledger\n",
            "tests/test_util.py": TEST_UTIL,
        },
    )
    return root, shas


def test_the_selection_rule_keeps_small_fixes_of_existing_source_files(ledger):
    root, shas = ledger
    fixes = small_fixes(root, 10)  # fewer match than asked: all of them, newest first
    assert [f.sha for f in fixes] == [shas["header"], shas["rounding"]]
    assert fixes[0].paths == ["ledger/util.py", "tests/test_util.py"] and fixes[0].parent == shas["added"]
    assert [f.sha for f in small_fixes(root, 1)] == [shas["header"]]


def test_pre_image_is_the_removed_lines_or_the_insertion_point():
    old = ["a", "b", "", "", "c", ""]
    assert pre_image(old, 2, 1) == ("b",)  # one removed line
    assert pre_image(old, 1, 0) == ("a", "b")  # insertion after line 1: the lines around it
    assert pre_image(old, 0, 0) == ("a",)  # insertion at the top
    assert pre_image(old, 3, 1) == ("b",)  # a blank line: the nearest non-blank one instead
    assert pre_image(old, 5, 0) == ("c",)  # insertion before a blank line: blank ends left out
    assert pre_image(old, 2, 3) == ("b",)  # removed "b" and two blank lines
    assert shows("x\nb\n\n\nc\n", ("b", "", "", "c")) and not shows("x\nbb\n", ("b",))


def test_bm25_ranks_the_file_with_the_issues_rare_words_first():
    texts = {"a.py": "total total total", "b.py": "parse_header value", "c.py": "nothing here"}
    assert bm25_order(texts, "parse_header splits values")[0] == "b.py"


def test_recall_counts_what_the_pack_shows(ledger, tokenizer_file):
    root, shas = ledger
    report = bench_recall(root, tokenizer_file, 10, budgets=(700, 8_000))
    by_sha = {c["sha"]: c["budgets"] for c in report["commits"]}
    rounding, header = by_sha[shas["rounding"]], by_sha[shas["header"]]
    # at 8K the named function's body goes in inside core.py's skeleton; core.py whole does not fit
    assert rounding["8000"]["ds4"] and rounding["8000"]["ds4_modes"]["ledger/core.py"] in (
        "bodies",
        "focused",
    )
    assert not rounding["8000"]["bm25"]
    assert header["8000"]["ds4"] and header["8000"]["bm25"]
    # 700 tokens hold the fixed parts and little else: the function, 40 lines long, cannot go in
    assert not rounding["700"]["ds4"] and not rounding["700"]["bm25"]
    assert report["covered"]["8000"]["ds4"] == 2 and report["covered"]["8000"]["bm25"] == 1
    assert report["head"] == shas["four"] and report["asked"] == 10


def test_cli_says_what_is_wrong_in_one_line(tmp_path, ledger, tokenizer_file, capsys):
    (tmp_path / "plain").mkdir()
    argv = ["bench", "pack", "--recall", "--tokenizer", str(tokenizer_file), "--repo"]
    assert main(argv + [str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a git repository" in err and len(err.splitlines()) == 1
    assert main(argv + [str(ledger[0]), "--commits", "5", "--budgets", "8000"]) == 0
    out, err = capsys.readouterr()
    assert "only 2 commits match the selection rule (5 asked)" in err
    assert out.splitlines()[-1].split() == ["8,000", "2/2", "1/2", "2/2", "1/2"]
