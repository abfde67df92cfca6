"""Settings for `fix` and `swebench predict` from TOML files, below the command line in precedence:

    command-line flags  >  REPO/.ds4.toml  >  ~/.config/ds4/config.toml ($XDG_CONFIG_HOME)

Keys (all optional, top level): model, endpoint, model_name, tokenizer, test_cmd, rounds, samples,
budget, max_tokens, test_timeout. Relative paths (model, tokenizer) are relative to the file's folder.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

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
}
PATHS = ("model", "tokenizer")


class ConfigError(ValueError):
    """A settings file that cannot be read, or has an unknown key or a value of the wrong type."""


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
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise ConfigError(f"{path}: {key} must be {expected}, not {value!r}")
        if key in PATHS:
            data[key] = str((path.parent / os.path.expanduser(value)).resolve())
    return data


def settings(repo: str | Path | None) -> dict:
    """The merged file settings; a repository's file wins over the user's. model and endpoint are one
    choice: whichever the nearer file names replaces the other."""
    merged: dict = {}
    files = [user_config_path()] + ([Path(repo) / ".ds4.toml"] if repo is not None else [])
    for path in files:
        data = read_config(path)
        if "model" in data or "endpoint" in data:
            merged.pop("model", None)
            merged.pop("endpoint", None)
        merged.update(data)
    return merged


def merge_args(args, repo: str | Path | None, defaults: dict) -> None:
    """Fills the flags left unset (None) on `args` from the files, then from `defaults`."""
    found = settings(repo)
    if getattr(args, "model", None) or getattr(args, "endpoint", None):
        found.pop("model", None)
        found.pop("endpoint", None)
    for key in KEYS:
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, found.get(key, defaults.get(key)))
    if not getattr(args, "model", None) and not getattr(args, "endpoint", None):
        raise ConfigError(
            "no model: pass --model DIR (weights run in this process) or --endpoint URL "
            "(an OpenAI-compatible server), or set model or endpoint in "
            f"{Path(repo or '.') / '.ds4.toml'} or {user_config_path()}"
        )
