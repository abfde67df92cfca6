"""The fix loop's settings: FixConfig, whose defaults are the fix defaults of every face (the CLI's flags
and help, the API's FixRequest and ServerConfig, the LSP's settings), and the settings files of `fix`
and `swebench predict`, below the command line in precedence:

    command-line flags  >  REPO/.ds4.toml  >  ~/.config/ds4/config.toml ($XDG_CONFIG_HOME)

Keys (all optional, top level): model, endpoint, model_name, tokenizer, test_cmd, rounds, samples,
budget, max_tokens, test_timeout, sandbox. Relative paths (model, tokenizer) are relative to the file's
folder. A repository's file is data, not authority: it may choose how to test, never where the code and
keys go nor whether tests are sandboxed (USER_ONLY keys are refused there, naming the key).
"""

from __future__ import annotations

import os
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ds4.agent.backends import GenerationParams
from ds4.agent.errors import ConfigError
from ds4.agent.fit import CLI_SETTINGS

if TYPE_CHECKING:
    from ds4.agent.sandbox import Sandbox


@dataclass(kw_only=True)
class FixConfig:
    """One run of the fix loop. Its defaults are read, never restated, by every face: FixConfig.rounds,
    .samples and .test_timeout, GenerationParams.max_tokens for the tokens per answer, and fit.DEFAULT_BUDGET
    where a face needs a budget before it knows the model's context."""

    repo: Path
    issue: str
    test_cmd: str | None = None  # None: the repository's detected test command
    rounds: int = 3
    samples: int = 1
    budget: int | None = None  # prompt tokens for the repository and issue; None: what the context leaves
    test_timeout: float = 600.0  # seconds per test run
    apply: bool = False  # write the selected patch to the user's tree
    generation: GenerationParams = field(default_factory=GenerationParams)
    overlay: dict[str, str] = field(default_factory=dict)  # unsaved editor buffers, by relative path
    cancel: threading.Event | None = None  # set: a running test command is killed at once
    sandbox: Sandbox | None = None  # where tests run; None: bubblewrap, or unsandboxed with a warning
    data_dir: Path | None = None  # the index and run folders; None: REPO/.ds4 (never through a symlink)
    setting_names: dict[str, str] = field(default_factory=lambda: dict(CLI_SETTINGS))  # how errors name
    # the budget and max_tokens to this face's user (fit.CLI_SETTINGS, EDITOR_SETTINGS, API_SETTINGS)


KEYS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "endpoint": str,
    "model_name": str,
    "tokenizer": str,
    "test_cmd": str,
    "rounds": int,
    "samples": int,
    "budget": int,
    "max_tokens": int,
    "test_timeout": (int, float),
    "sandbox": bool,
}
PATHS = ("model", "tokenizer")
USER_ONLY = ("model", "endpoint", "model_name", "sandbox")
DEFAULTS = {  # what an unset flag and setting falls back to
    "rounds": FixConfig.rounds,
    "samples": FixConfig.samples,
    "max_tokens": GenerationParams.max_tokens,
    "test_timeout": FixConfig.test_timeout,
    "sandbox": True,
}


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ds4" / "config.toml"


def read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        kind = KEYS[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise ConfigError(f"{path}: {key} must be {expected}, not {value!r}")
        if key in PATHS:
            data[key] = str((path.parent / os.path.expanduser(value)).resolve())
    return data


def read_repo_config(path: Path) -> dict:
    """A repository's settings file: read_config, refusing the keys only the user may set."""
    data = read_config(path)
    refused = [key for key in USER_ONLY if key in data]
    if refused:
        raise ConfigError(
            f"{path}: a repository's settings may not set {', '.join(refused)} (where your code and keys "
            f"go, and whether its tests are sandboxed, are yours to choose): set it in {user_config_path()} "
            "or with a flag, and remove it from the repository's file"
        )
    return data


def sourced_settings(repo: str | Path | None) -> tuple[dict, dict[str, Path]]:
    """The merged file settings and the file each came from; a repository's file wins over the user's
    for the keys it may set."""
    merged: dict = {}
    sources: dict[str, Path] = {}
    for path in [user_config_path()] + ([Path(repo) / ".ds4.toml"] if repo is not None else []):
        data = read_config(path) if path == user_config_path() else read_repo_config(path)
        merged.update(data)
        sources.update(dict.fromkeys(data, path))
    return merged, sources


def settings(repo: str | Path | None) -> dict:
    return sourced_settings(repo)[0]


def merge_args(args, repo: str | Path | None) -> dict[str, Path]:
    """Fills the flags left unset (None) on `args` from the files, then from DEFAULTS. Returns the file
    each filled value came from."""
    found, sources = sourced_settings(repo)
    if getattr(args, "model", None) or getattr(args, "endpoint", None):
        found.pop("model", None)
        found.pop("endpoint", None)
    filled = {}
    for key in KEYS:
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, found.get(key, DEFAULTS.get(key)))
            if key in found:
                filled[key] = sources[key]
    if not getattr(args, "model", None) and not getattr(args, "endpoint", None):
        raise ConfigError(
            "no model: pass --model DIR (weights run in this process) or --endpoint URL "
            "(an OpenAI-compatible server), or set model or endpoint in "
            f"{user_config_path()}"
        )
    return filled
