"""The agent's errors: every failure a user can act on derives from AgentError, so each boundary (the CLI's
`main`, the HTTP handlers, the LSP handlers, the fix loop) catches one family. Messages say what to do.

The index's IndexDatabaseError (agent/index/store.py) and the HTTP layer's APIError (agent/api/errors.py)
derive from AgentError where they are defined.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every user-facing agent error: the CLI prints it as one line and exits 2."""


class InputError(AgentError, ValueError):
    """A value the user gave (a flag, a file name, a setting, a request field) that cannot be used;
    `param` names the field when one is at fault. A ValueError too: callers that refuse bad values by
    catching ValueError keep doing so."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(InputError):
    """A settings file that cannot be read, or has an unknown key or a value of the wrong type."""


class PathRefused(InputError):
    """A path outside the allowed roots, with `..`, through an escaping symlink, or not a folder."""


class Cancelled(AgentError):
    """A fix its client cancelled (an API job, an editor's request): raised from the loop's event hook."""


class FixError(AgentError):
    """The loop cannot run at all (not a git repository, no test command, the model unreachable)."""


class BackendError(AgentError):
    """The model could not be reached or answered with an error."""


class PatchError(AgentError):
    """The answer cannot be applied; the message is feedback for the model (and the user)."""


class WriteRefused(AgentError):
    """A path an edit may not write; the message is feedback for the model."""


class RunFolderError(AgentError):
    """The run's data folder cannot be used (a symlink, or not a folder)."""


class SandboxError(AgentError):
    """No sandbox can run here and running unsandboxed was not allowed."""


class SweBenchError(AgentError):
    """A malformed or missing instance file, or a repository that is not where it should be."""


class GitHubError(AgentError):
    """The issue could not be fetched; the message says why and what to do instead."""


class JobsDatabaseError(AgentError):
    """The jobs database cannot be opened (not an SQLite file, unreadable, from another program)."""


class BenchError(AgentError):
    """A benchmark could not measure: a server it started did not come up, or every request failed."""
