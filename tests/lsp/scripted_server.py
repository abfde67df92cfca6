"""`python -m tests.lsp.scripted_server SCRIPT.json`: ds4's language server over stdio with a scripted
backend, the named test double for the model. SCRIPT.json: {"answers": [...], "infill": "...",
"max_model_len": N (optional)}; each chat request takes the next answer, each fill-in-the-middle request
gets `infill`. What it was asked
is appended to SCRIPT.json.asked.jsonl, for the test to read."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ds4.agent.backends import Completion
from ds4.lsp.server import create_server


class ScriptedBackend:
    name = "scripted"
    tokenizer_file = None
    max_model_len = None
    can_run_concurrently = False

    def __init__(self, script: Path):
        data = json.loads(script.read_text())
        self.answers, self.infill_text = list(data.get("answers", [])), data.get("infill", "")
        self.max_model_len = data.get("max_model_len")  # the model's context, when the script gives one
        self.log = script.with_suffix(".asked.jsonl")

    def _record(self, kind: str, payload) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"kind": kind, "payload": payload}) + "\n")

    def complete(self, messages, params, on_text=None) -> Completion:
        self._record("chat", messages)
        return Completion(self.answers.pop(0) if self.answers else "I have nothing more to add.")

    def infill(self, prefix, suffix, params) -> Completion:
        self._record("infill", {"prefix": prefix, "suffix": suffix})
        return Completion(self.infill_text)


def main() -> None:
    script = Path(sys.argv[1])
    log = os.open(script.with_suffix(".stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)  # the client reads stdout only: an undrained stderr pipe would block the server
    if os.environ.get("DS4_LSP_DEBUG"):
        import logging

        logging.basicConfig(level=logging.INFO)
    backend = ScriptedBackend(script)
    create_server(lambda settings: backend).start_io()


if __name__ == "__main__":
    main()
