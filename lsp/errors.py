"""What a request can fail with, as the editor sees it: LSP's RequestFailed with a message the user can
act on, and the never-blank reason of an underlying error."""

from __future__ import annotations

from pygls.exceptions import JsonRpcException


class RequestFailed(JsonRpcException):
    """A request that cannot be served as asked (no model configured, the model failed): LSP's
    RequestFailed code, with a message the editor shows."""

    CODE = -32803


def reason(error: BaseException) -> str:
    """What went wrong, never blank: some errors (a timeout, a dropped connection) carry no message."""
    text = str(error).strip()
    if not text and error.__cause__ is not None:
        return f"{type(error).__name__}: {reason(error.__cause__)}"
    return text or type(error).__name__
