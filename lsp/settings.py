"""The server's settings: from `initializationOptions`, then `workspace/didChangeConfiguration` (either
flat or under a "ds4" section). A bad value is reported and ignored; the last good value stays."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ds4.agent.backends import GenerationParams
from ds4.agent.config import FixConfig


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # a checkpoint folder: the engine runs in the server's process
    endpoint: str | None = None  # or an OpenAI-compatible server
    model_name: str | None = None  # with endpoint
    api_key: str | None = None  # with endpoint
    budget: int | None = None  # prompt tokens the packer fills; None: what the model's context leaves
    test_command: str | None = None  # else the repository's .ds4.toml, else detected
    rounds: int = FixConfig.rounds
    max_tokens: int = GenerationParams.max_tokens  # per answer in the fix loop
    debounce_ms: int = 150  # inline completion waits this long for newer keystrokes
    completion_tokens: int = 64  # per inline completion


FIELDS = {  # the client's name -> (ours, type, least value)
    "model": ("model", str, None),
    "endpoint": ("endpoint", str, None),
    "modelName": ("model_name", str, None),
    "apiKey": ("api_key", str, None),
    "budget": ("budget", int, 256),
    "testCommand": ("test_command", str, None),
    "rounds": ("rounds", int, 1),
    "maxTokens": ("max_tokens", int, 1),
    "debounceMs": ("debounce_ms", int, 0),
    "completionTokens": ("completion_tokens", int, 1),
}


def read_settings(raw, current: Settings) -> tuple[Settings, list[str]]:
    """The settings `raw` describes on top of `current`, and a message for each value refused."""
    if raw is None:
        return current, []
    if isinstance(raw, dict) and isinstance(raw.get("ds4"), dict):
        raw = raw["ds4"]
    if not isinstance(raw, dict):
        return current, [f"ds4 settings must be an object, not {type(raw).__name__}"]
    changes, problems = {}, []
    for key, value in raw.items():
        if key not in FIELDS:
            problems.append(f"unknown ds4 setting {key!r} (known: {', '.join(FIELDS)})")
            continue
        name, kind, least = FIELDS[key]
        if value is None or value == "":
            changes[name] = getattr(Settings(), name)  # back to the default
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"ds4 setting {key!r} must be an integer, not {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"ds4 setting {key!r} must be a string, not {value!r}")
        elif least is not None and value < least:
            problems.append(f"ds4 setting {key!r} must be at least {least}, not {value}")
        else:
            changes[name] = value
    settings = replace(current, **changes)
    if settings.model and settings.endpoint:
        problems.append("ds4 settings 'model' and 'endpoint' are exclusive: keeping 'endpoint'")
        settings = replace(settings, model=None)
    return settings, problems
