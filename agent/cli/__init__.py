"""The `ds4-agent` command line: the table of commands, the parser built from it, and `main`, the one
boundary where typed errors become a line on standard error and an exit code.

Each command group is a module here with `add_parser(sub)` above `run(args)`. A group's module is
imported only when its command is parsed or run, and torch only by the commands that run a model, so
`ds4-agent --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ds4.agent.errors import AgentError

# command -> (the module in ds4.agent.cli that parses and runs it, its line in `ds4-agent --help`), in the
# order --help lists them; a module's commands are adjacent and it adds them in this order.
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("model", "create random checkpoints; size up presets and checkpoints"),
    "generate": ("model", "generate text from a checkpoint"),
    "index": ("index", "index a repository (incremental): files, symbols, references"),
    "search": ("index", "search the index for symbols"),
    "symbols": ("index", "definitions of a file, or of the whole repository"),
    "pack": ("pack", "pack the repository and an issue into one prompt within a token budget"),
    "apply": ("apply", "apply a model's edits (SEARCH/REPLACE or unified diff): all or nothing"),
    "fix": ("fix", "turn an issue into a tested patch (in git worktrees; your tree is untouched)"),
    "swebench": ("fix", "SWE-bench predictions and a local evaluation"),
    "serve": (
        "serve",
        "the HTTP service: OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models",
    ),
    "lsp": (
        "lsp",
        "the language server (stdio): workspace symbols, ds4.fix, code actions, inline completion",
    ),
    "plan": (
        "plan",
        "place a model on GPUs (+ host RAM for the routed experts when they do not fit); predict "
        "tokens/s; print the flags that run it",
    ),
    "bench": ("bench", "measure ds4 side by side with a peer"),
}
DESCRIPTION = "ds4: a local coding-agent backend on DeepSeek-family models run by its own engine."

# The exit codes of every command.
DONE = 0
NOT_RESOLVED = 1  # it ran, and the answer is no: tests still fail, it does not fit, nothing found
USAGE = 2  # a usage or input error, or an engine or agent error that stopped it (one line on stderr)


class _Commands:
    """What a module's `add_parser(sub)` is given: argparse's subparsers, with each command's help line
    taken from COMMANDS."""

    def __init__(self, action):
        self.action = action

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, help=COMMANDS[name][1], **kwargs)


def _module(name: str):
    return importlib.import_module(f"ds4.agent.cli.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given `command`, only that command's module is imported and the other commands
    are listed by name and help line (enough for --help and for refusing an unknown command)."""
    parser = argparse.ArgumentParser(prog="ds4-agent", description=DESCRIPTION)
    action = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module, help_line) in COMMANDS.items():
        if name in action.choices:
            continue  # added with an earlier command of its module
        if command is None or module == chosen:
            _module(module).add_parser(_Commands(action))
        else:
            action.add_parser(name, help=help_line)
    assert list(action.choices) == list(COMMANDS), f"commands out of order: {list(action.choices)}"
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help, in every command, ends with its default where it has one and does not say it
    already (an option whose default is computed says so in its own help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _show_defaults(command)
            continue
        default = action.default
        if default is None or isinstance(default, bool) or default in ("", [], argparse.SUPPRESS):
            continue
        if not action.option_strings or "default" in (action.help or ""):
            continue
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        said = f"default {shown}".replace("%", "%%")
        action.help = f"{action.help} ({said})" if action.help else said


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns DONE, NOT_RESOLVED or USAGE (argparse exits with USAGE itself). Engine
    and agent errors become one line on standard error; anything else is a bug and shows its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else "").parse_args(argv)
    _show_engine_progress()
    try:
        return _module(COMMANDS[args.command][0]).run(args)
    except Exception as e:
        if not isinstance(e, (AgentError, _engine_error())):
            raise
        print(f"ds4-agent: error: {e}", file=sys.stderr)
        return USAGE


def _show_engine_progress() -> None:
    """The engine's progress lines (its decode step compiling, graphs captured) on standard error, once."""
    engine_log = logging.getLogger("ds4.engine")
    if not engine_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ds4-agent: %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)


def _engine_error() -> type[Exception]:
    from ds4.engine.errors import EngineError  # imported this late: importing ds4.engine loads torch

    return EngineError


if __name__ == "__main__":
    sys.exit(main())
