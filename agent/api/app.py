"""The Litestar application: routes, OpenAI-shaped errors, bearer tokens, the body limit, web-origin
checks (guard.py), health and the order things stop in."""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass, field

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Schema

from ds4.agent.api.agent_api import BODIES as AGENT_BODIES
from ds4.agent.api.agent_api import ROUTES as AGENT_ROUTES
from ds4.agent.api.errors import HANDLERS, APIError
from ds4.agent.api.guard import WebPolicy, guard
from ds4.agent.api.job_runner import JobRunner
from ds4.agent.api.jobs import JobStore
from ds4.agent.api.metrics import Metrics, RateLimiter
from ds4.agent.api.openai_api import BODIES as OPENAI_BODIES
from ds4.agent.api.openai_api import ROUTES as OPENAI_ROUTES
from ds4.agent.config import FixConfig
from ds4.agent.errors import InputError

OPEN_PATHS = ("/health", "/schema", "/metrics")  # reachable without a token


@dataclass
class ServerConfig:
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 * 1024 * 1024  # real diffs and packed prompts fit
    rate_limit: int = 0  # requests a minute per API key (per client address without keys); 0 = off
    repo_roots: list[str] = field(default_factory=list)  # the agent API is on when there are roots
    jobs_db: str = ".ds4/server/jobs.db"
    test_cmd: str | None = None  # for fix jobs; else the repository's .ds4.toml, else detected
    allow_request_test_cmd: bool = False  # a request's test_cmd runs commands on this machine
    test_timeout: float = FixConfig.test_timeout
    allow_unsandboxed_tests: bool = False  # where bubblewrap cannot run: run tests bare, or refuse them
    bind: str = "127.0.0.1"  # the address served: its name is one the Host header may carry
    allowed_hosts: list[str] = field(default_factory=list)  # more names for Host ("*": any)
    cors_origins: list[str] = field(default_factory=list)  # web origins allowed to call ("*": any)
    max_queued_jobs: int = 16  # fix jobs waiting for the worker; more are refused with 429

    def __post_init__(self):
        check_keys(self.api_keys)
        if self.max_queued_jobs < 1:
            raise InputError(f"max_queued_jobs must be >= 1, got {self.max_queued_jobs}", "max_queued_jobs")


def keys_from_env(flags: list[str] | None) -> list[str]:
    keys = list(flags or [])
    check_keys(keys)
    keys += [k.strip() for k in os.environ.get("DS4_API_KEYS", "").split(",") if k.strip()]
    return keys


def check_keys(keys: list[str]) -> None:
    """A blank key would let `Authorization: Bearer ` in: refuse it before serving anything."""
    if any(not k.strip() for k in keys):
        raise InputError(
            "an API key must not be empty: pass --api-key KEY with a real key, or no --api-key", "api_key"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: list[str]) -> None:
    """Anything but loopback needs bearer tokens: the server runs models and, for fix jobs, tests."""
    if not is_loopback(host) and not keys:
        raise InputError(
            f"refusing to listen on {host} without API keys: pass --api-key KEY (or DS4_API_KEYS=k1,k2), "
            "or bind 127.0.0.1"
        )


def _authorize(request: Request) -> None:
    config: ServerConfig = request.app.state.config
    if request.url.path.startswith(OPEN_PATHS):
        return
    who = request.client.host if request.client else "unknown"
    if config.api_keys:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not _is_key(token, config.api_keys):
            raise APIError(
                401, "a valid API key is required: send Authorization: Bearer KEY", None, "invalid_api_key"
            )
        who = token
    limiter: RateLimiter | None = request.app.state.limiter
    if limiter is not None:
        wait = limiter.allow(who)
        if wait > 0:
            raise APIError(
                429,
                f"rate limit of {config.rate_limit} requests a minute: retry in {wait:.1f}s",
                None,
                "rate_limit_exceeded",
                {"Retry-After": str(max(1, round(wait)))},
            )


def _is_key(token: str, keys: list[str]) -> bool:
    """Compared as bytes: the header arrives as latin-1 text, any character at all (hmac refuses
    non-ASCII str), the keys as the UTF-8 they were typed in."""
    sent = token.encode("latin-1", "replace")
    return any(hmac.compare_digest(sent, k.encode()) for k in keys)


def _count(app):
    """ASGI middleware: every HTTP response's status, by route, for /metrics (errors included)."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, capture)
        finally:
            scope["app"].state.metrics.count_request(scope["path"], status)

    return middleware


@get("/metrics", summary="Prometheus metrics", media_type=MediaType.TEXT)
async def metrics(request: Request) -> str:
    served = request.app.state.model
    jobs = request.app.state.jobs
    return request.app.state.metrics.render(
        served.stats(), served.num_in_flight, jobs.counts() if jobs else None
    )


# No generated example: litestar's would hold a datetime drawn relative to now, so the document changed by the
# second.
HEALTH_503 = ResponseSpec(
    data_container=dict, description="the engine thread is not running", generate_examples=False
)


@get(
    "/health", summary="Liveness: the served model, its engine thread and queue", responses={503: HEALTH_503}
)
async def health(request: Request) -> Response[dict]:
    served = request.app.state.model
    body = {"status": "ok", "model": served.name}
    loop = getattr(served, "loop", None)  # none in front of an endpoint
    if loop is None:
        return Response(body)
    body["engine"] = {"alive": loop.is_alive, "in_flight": loop.num_in_flight}
    if not loop.is_alive:
        return Response({**body, "status": "engine stopped"}, status_code=503)
    return Response(body)


def create_app(model, config: ServerConfig | None = None, backend=None) -> Litestar:
    """`backend`: what fix jobs ask; by default the served model through its engine thread."""
    config = config or ServerConfig()
    store = runner = None
    if config.repo_roots:
        from ds4.agent.api.served import LoopBackend

        store = JobStore(config.jobs_db)
        runner = JobRunner(store, backend or LoopBackend(model), config)
    shutdown = [runner.shutdown] if runner else []  # the jobs stop asking the engine before it stops
    if hasattr(model, "shutdown"):
        shutdown.append(model.shutdown)
    if store is not None:
        shutdown.append(store.close)
    policy = WebPolicy.for_bind(config.bind, config.allowed_hosts, config.cors_origins)
    app = Litestar(
        route_handlers=[health, metrics, *OPENAI_ROUTES, *AGENT_ROUTES],
        state=State(
            {
                "model": model,
                "config": config,
                "metrics": Metrics(),
                "limiter": RateLimiter(config.rate_limit) if config.rate_limit > 0 else None,
                "jobs": store,
                "runner": runner,
            }
        ),
        middleware=[_count, guard(policy)],
        cors_config=CORSConfig(allow_origins=config.cors_origins) if config.cors_origins else None,
        exception_handlers=HANDLERS,
        before_request=_authorize,
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(title="ds4", version="0.1.0", path="/schema"),
        on_shutdown=shutdown,
        debug=False,
    )
    _declare_bodies(app, model)
    _declare_streams(app)
    return app


STREAMS = {  # route -> its 2xx answers: JSON, or SSE when it streams (the completions: with stream=true)
    "/v1/chat/completions": ("application/json", "text/event-stream"),
    "/v1/completions": ("application/json", "text/event-stream"),
    "/v1/jobs/{job_id}/events": ("text/event-stream",),
}


SSE_EVENT = Schema(  # each event: a `data:` line holding one JSON chunk, then "[DONE]"
    type=OpenAPIType.OBJECT,
    properties={"data": Schema(type=OpenAPIType.STRING), "event": Schema(type=OpenAPIType.STRING)},
    required=["data"],
)


def _declare_streams(app: Litestar) -> None:
    """Litestar declares a streamed answer as JSON; clients and fuzzers must be told it is SSE."""
    for path, media_types in STREAMS.items():
        for operation in (
            op for op in (app.openapi_schema.paths[path].get, app.openapi_schema.paths[path].post) if op
        ):
            ok = next(r for status, r in operation.responses.items() if status.startswith("2"))
            json_schema = ok.content["application/json"]
            ok.content = {
                kind: json_schema if kind == "application/json" else OpenAPIMediaType(SSE_EVENT)
                for kind in media_types
            }


FORCED_CALL_NEEDS_TOOLS = {  # a tool_choice that forces a call ("required" or a named one) needs tools
    "if": {
        "properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
        "required": ["tool_choice"],
    },
    "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]},
}


def _declare_bodies(app: Litestar, model) -> None:
    """The request bodies' schemas as msgspec writes them: litestar drops the constraints inside unions
    (a token-id prompt's minItems, a stop list's maxItems), and the server enforces every one of them,
    as well as the served model's vocabulary for token-id prompts."""
    _, components = msgspec.json.schema_components(
        [*OPENAI_BODIES, *AGENT_BODIES], ref_template="#/components/schemas/{name}"
    )
    vocab = getattr(getattr(model, "tokenizer", None), "vocab_size", None)
    if isinstance(vocab, int):
        for member in components["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
            if member.get("type") == "array":
                member["items"]["maximum"] = vocab - 1
    components["ChatCompletionRequest"].update(FORCED_CALL_NEEDS_TOOLS)
    schemas = app.openapi_schema.components.schemas
    for name, schema in components.items():
        if name not in schemas:
            raise RuntimeError(f"litestar did not name the request body {name!r} as msgspec does")
        schemas[name] = schema
