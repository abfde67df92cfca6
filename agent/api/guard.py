"""What a web page must not reach: requests whose `Host` is not one of the server's names (DNS
rebinding), whose `Origin` is a foreign site the server was not told to allow (`--cors-origin`), and
bodies that are not JSON (a form or `text/plain` post needs no CORS preflight). Refused before routing,
with the API's usual error body; bearer tokens and rate limits are app.py's."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass

from ds4.agent.api.errors import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
BODY_METHODS = (b"POST", b"PUT", b"PATCH")


@dataclass(frozen=True)
class WebPolicy:
    """`hosts`: names the server answers to ("*" for any); an IP literal is always safe from rebinding
    but is accepted only when it is one the server is bound to (any, for a wildcard bind).
    `origins`: the web origins allowed to call (besides the server's own)."""

    hosts: frozenset[str]
    origins: frozenset[str]
    any_ip: bool = False

    @classmethod
    def for_bind(cls, bind: str, allowed_hosts: Iterable[str] = (), origins: Iterable[str] = ()) -> WebPolicy:
        bind = _hostname(bind)
        names = {bind, *LOOPBACK_NAMES, *(_hostname(h) for h in allowed_hosts)} - {""}
        return cls(frozenset(names), frozenset(o.rstrip("/") for o in origins), bind in WILDCARDS)

    def host_problem(self, host: str | None) -> str | None:
        if host is None or "*" in self.hosts:
            return None
        name = _hostname(host)
        if name in self.hosts or (self.any_ip and _is_ip(name)):
            return None
        return (
            f"the Host header {host!r} is not a name of this server: start it with --allowed-host "
            f"{name or 'NAME'} to answer to it"
        )

    def origin_problem(self, origin: str | None, host: str | None) -> str | None:
        if origin is None or "*" in self.origins or origin.rstrip("/") in self.origins:
            return None
        if host is not None and origin.rstrip("/") in (f"http://{host}", f"https://{host}"):
            return None  # the server's own pages (the schema's docs)
        return f"cross-origin requests from {origin!r} are refused: --cors-origin {origin} would allow it"


def _hostname(host: str) -> str:
    """`[::1]:8484` -> `::1`, `Example.COM:80` -> `example.com`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_json(content_type: str | None) -> bool:
    kind = (content_type or "").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _has_body(headers: dict[str, str]) -> bool:
    return headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers


def problem(scope: dict, policy: WebPolicy) -> tuple[int, str, str] | None:
    """(status, message, code) for a request to refuse; None to let it through."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    host = headers.get("host")
    if message := policy.host_problem(host):
        return 400, message, "host_not_allowed"
    if message := policy.origin_problem(headers.get("origin"), host):
        return 403, message, "origin_not_allowed"
    method = scope["method"].encode()
    if method in BODY_METHODS and _has_body(headers) and not _is_json(headers.get("content-type")):
        kind = headers.get("content-type", "none")
        return (
            415,
            f"request bodies must be JSON (Content-Type: application/json), not {kind}",
            "unsupported_media_type",
        )
    return None


def guard(policy: WebPolicy):
    """ASGI middleware factory: refuses what `problem` names, passes the rest on."""

    def middleware(app):
        async def checked(scope, receive, send):
            found = problem(scope, policy) if scope["type"] == "http" else None
            if found is None:
                return await app(scope, receive, send)
            status, message, code = found
            body = json.dumps(error_body(status, message, None, code)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return checked

    return middleware
