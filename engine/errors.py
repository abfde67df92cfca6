"""Typed errors the engine raises for problems a user can act on (bad checkpoint, bad config, bad request)."""


class EngineError(Exception):
    """Base class of every user-facing engine error."""


class ConfigError(EngineError):
    """config.json describes a model ds4 cannot build (unknown model_type, inconsistent geometry)."""


class CheckpointError(EngineError):
    """Tensors that do not fit the config: missing, unexpected, misshaped, unsupported, truncated."""


class RequestError(EngineError):
    """A generate/score request ds4 cannot serve (empty prompt, token id out of range, too long)."""
