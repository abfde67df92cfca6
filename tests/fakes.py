"""Test doubles and sample data shared by test modules: temporary git repositories, the small buggy
repository the fix loop works on, scripted model answers (a backend and an OpenAI-compatible server),
and where the example repositories and their gold patches live."""

from __future__ import annotations

import json
import subprocess
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from ds4.agent.backends import Completion
from ds4.agent.config import FixConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GOLD = ROOT / "tests" / "agent" / "fixtures" / "examples_gold"  # the examples' fixing patches


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def make_repo(root: Path, files: dict[str, str | bytes], use_git: bool = True) -> Path:
    """`files` written under `root` and, with `use_git`, committed as the first commit."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if use_git:
        git(root, "init", "-q")
        git(root, "add", "-A")
        git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return root


# A repository for the indexer: two sources, a README, and what .gitignore leaves out.
BASE = {
    "app/main.py": "import os\n\n\ndef main():\n    return helper()\n\n\ndef helper():\n    return 1\n",
    "app/models.py": "class User:\n    def name(self):\n        return 'x'\n",
    "README.md": "# demo\n",
    ".gitignore": "build/\n*.log\n",
    "build/out.py": "def generated(): pass\n",
    "debug.log": "noise\n",
}

# A repository with a bug its own test shows, for the fix loop and the faces around it.
BUGGY = {
    "calc.py": "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n",
    "tests/test_calc.py": (
        "from calc import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
        "def test_mul():\n    assert mul(2, 3) == 6\n"
    ),
    "pytest.ini": "[pytest]\npythonpath = .\n",
}
ISSUE = "add(2, 3) returns -1 instead of 5"


def edit(old: str, new: str) -> str:
    """A model's answer: one SEARCH/REPLACE block on calc.py."""
    block = f"<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"
    return f"The bug is in calc.py.\n\ncalc.py\n```python\n{block}```\n"


WRONG = edit("    return a - b", "    return a - b + 0")
RIGHT = edit("    return a - b", "    return a + b")
RIGHT_AFTER_WRONG = edit("    return a - b + 0", "    return a + b")  # round 2 sees round 1's edit


def fix_config(repo: Path, **kw) -> FixConfig:
    """The fix of ISSUE in `repo` with pytest and a small budget; `kw` overrides."""
    return FixConfig(
        repo=repo,
        issue=ISSUE,
        test_cmd=kw.pop("test_cmd", "python -m pytest -q -rf"),
        budget=kw.pop("budget", 4000),
        **kw,
    )


class ScriptedBackend:
    """Test double: plays back scripted answers in order and records what it was asked."""

    name = "scripted"
    tokenizer_file = None
    can_run_concurrently = False  # it plays its answers back in order

    def __init__(self, answers: list[str], max_model_len: int | None = None):
        self.answers, self.asked, self.max_model_len = list(answers), [], max_model_len

    def complete(self, messages, params, on_text=None) -> Completion:
        self.asked.append([dict(m) for m in messages])
        return Completion(self.answers.pop(0) if self.answers else "I have nothing more to add.")


class ScriptedChatServer(BaseHTTPRequestHandler):
    """Test double: an OpenAI-compatible server on loopback: /v1/chat/completions streams scripted answers,
    /v1/models lists `models`."""

    answers: list[str] = []
    bodies: list[dict] = []
    models: list[dict] = [{"id": "deepseek-v4", "object": "model"}, {"id": "deepseek-v4-flash"}]

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") != "/v1/models":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"object": "list", "data": type(self).models}).encode())

    def answer_for(self, body: dict) -> str:
        return type(self).answers.pop(0)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        answer = self.answer_for(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in (answer[: len(answer) // 2], answer[len(answer) // 2 :]):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {
            "choices": [],
            "usage": {
                "prompt_tokens": 900,
                "completion_tokens": 40,
                "prompt_tokens_details": {"cached_tokens": 512},
            },
        }
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass
