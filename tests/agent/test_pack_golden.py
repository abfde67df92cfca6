"""The packer's output for fixed inputs, recorded in tests/golden/pack.json: the example repositories and a
larger generated one, at budgets where everything fits, where files are listed, skeletons and bodies
chosen, and with unsaved buffers, feedback and a kept earlier selection. Each case keeps the digest of the
prompt and of every rendering, and the manifest. Token counts are the character estimate (ApproxCounter),
which does not depend on a trained tokenizer. DS4_UPDATE_GOLDEN=1 regenerates the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ds4.agent.index.indexer import default_db_path, index_repo
from ds4.agent.index.store import open_index
from ds4.agent.pack import pack, render
from ds4.agent.tokens import ApproxCounter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pack.json"
BUDGETS = (10**6, 1000, 700, 500, 400)
GENERATED_BUDGETS = (10**6, 3000, 1800, 1200, 900)
GENERATED_ISSUE = (
    "total_7 is wrong when the discount applies.\n"
    'Traceback (most recent call last):\n  File "shop/part3.py", line 14, in total_3\n'
)


def commit_all(repo: Path) -> None:
    stamp = {"GIT_AUTHOR_DATE": "2024-01-01T00:00:00", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00"}
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "base"],
    ):
        subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, env={**os.environ, **stamp}
        )


def generated_source(i: int) -> str:
    steps = "\n".join(f"    amount += price * {k}  # step {k}" for k in range(24))
    after = (i + 1) % 12
    return (
        f'"""Part {i} of the shop: totals."""\n\nfrom shop.part{after} import total_{after}\n\n\n'
        f'def total_{i}(price, discount=0):\n    """The total of part {i}."""\n    amount = 0\n{steps}\n'
        f"    return amount - discount\n\n\n"
        f"class Cart{i}:\n    def checkout(self, price):\n"
        f"        return total_{i}(price) + total_{after}(price)\n"
    )


def checkout(name: str, tmp_path: Path) -> Path:
    repo = tmp_path / name
    if name == "generated":
        (repo / "shop").mkdir(parents=True)
        for i in range(12):
            (repo / "shop" / f"part{i}.py").write_text(generated_source(i))
        (repo / "README.md").write_text("# shop\nTotals in shop/.\n")
    else:
        shutil.copytree(EXAMPLES / name, repo)
    commit_all(repo)
    index_repo(repo)
    return repo


def record(packed) -> dict:
    digests = {fmt: render(packed, fmt) for fmt in ("prompt", "markdown", "xml", "json")}
    return {
        "digests": {fmt: hashlib.sha256(text.encode()).hexdigest() for fmt, text in digests.items()},
        "manifest": packed.manifest(),
    }


def cases(name: str, repo: Path) -> dict:
    issue = GENERATED_ISSUE if name == "generated" else (repo / "ISSUE.md").read_text()
    counter = ApproxCounter()
    out = {}
    with open_index(default_db_path(repo)) as db:
        for budget in GENERATED_BUDGETS if name == "generated" else BUDGETS:
            out[f"budget {budget}"] = record(pack(db, repo, issue, budget, counter))
        budget = (GENERATED_BUDGETS if name == "generated" else BUDGETS)[2]
        first = pack(db, repo, issue, budget, counter)
        kept = pack(
            db,
            repo,
            issue,
            budget,
            counter,
            feedback="The tests fail:\nE  assert 1 == 2",
            previous=first.manifest(),
        )
        out[f"budget {budget}, feedback, previous selection"] = record(kept)
        edited = sorted(f.path for f in first.files if f.path.endswith((".py", ".js", ".rs")))[0]
        overlay = {edited: (repo / edited).read_text() + "\n# an unsaved edit\n"}
        out[f"budget {budget}, unsaved {edited}"] = record(
            pack(db, repo, issue, budget, counter, overlay=overlay)
        )
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack-golden")
    return {
        name: cases(name, checkout(name, tmp))
        for name in ("pricing-py", "slugify-js", "ringbuf-rs", "generated")
    }


def test_packed_prompts_match_the_golden_file(recorded):
    text = json.dumps(recorded, indent=1, sort_keys=True) + "\n"
    if os.environ.get("DS4_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert json.loads(text) == json.loads(GOLDEN.read_text())


def test_the_golden_cases_cover_every_mode(recorded):
    modes = {
        f["mode"] for repo in recorded.values() for case in repo.values() for f in case["manifest"]["files"]
    }
    assert modes == {"whole", "focused", "bodies", "skeleton", "listed"}
