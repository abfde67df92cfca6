"""Typed errors the engine raises for problems a user can act on (bad checkpoint, bad config, bad request)."""


class EngineError(Exception):
    """Base class of every user-facing engine error."""


class ConfigError(EngineError):
    """config.json describes a model ds4 cannot build (unknown model_type, inconsistent geometry)."""


class CheckpointError(EngineError):
    """Tensors that do not fit the config: missing, unexpected, misshaped, unsupported, truncated."""


class RequestError(EngineError):
    """A generate/score request ds4 cannot serve (empty prompt, token id out of range, too long)."""


class ParamError(EngineError, ValueError):
    """A sampling or engine setting out of its range; `param` names it (a request's field, a flag). A
    ValueError too, as the dataclasses' checks were."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineStopped(EngineError):
    """The engine thread is not running: a request submitted now would never be answered."""


class StepFailed(EngineError):
    """A step failed and these requests, run alone, are the ones that fail it: they are finished (reason
    "error"); every other request goes on."""

    def __init__(self, request_ids: list[int], cause: BaseException):
        super().__init__(f"requests {request_ids} failed the engine step: {cause!r}")
        self.request_ids, self.cause = request_ids, cause
