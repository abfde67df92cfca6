"""The agent API for CI bots: register a repository under an allowed root, index and search it, start
fix jobs, follow their events as SSE, read their verdict and diff, cancel them.

Jobs run one at a time on a worker thread (they share the model); their state lives in SQLite. Their
tests run in the sandbox (or, only with --allow-unsandboxed-tests where none exists, bare); a
repository's own test command never runs bare. Registered paths are re-checked at every use."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import anyio
import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent

from ds4.agent.api.errors import APIError, responses, strict_body
from ds4.agent.api.jobs import ACTIVE, JobStore
from ds4.agent.api.paths import PathRefused, confine, recheck, repo_data_dir
from ds4.agent.backends import GenerationParams
from ds4.agent.config import ConfigError, FixConfig
from ds4.agent.errors import FixError
from ds4.agent.events import describe
from ds4.agent.fit import MIN_BUDGET, budget_for, prompt_room

log = logging.getLogger("ds4.api")


class RepoRequest(msgspec.Struct):
    path: Annotated[str, msgspec.Meta(min_length=1)]


BUDGET_HELP = "prompt tokens to pack; unset: what the model's context leaves beside the answers"


class FixRequest(msgspec.Struct, kw_only=True):
    repo_id: str
    issue: Annotated[str, msgspec.Meta(pattern=r"\S", description="the issue text; not blank")]
    rounds: Annotated[int, msgspec.Meta(ge=1, le=20)] = FixConfig.rounds
    samples: Annotated[int, msgspec.Meta(ge=1, le=16)] = FixConfig.samples
    budget: Annotated[int, msgspec.Meta(ge=256, le=1_048_576, description=BUDGET_HELP)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = GenerationParams.max_tokens
    test_cmd: str | None = None


def _state(request: Request):
    store, runner = request.app.state.jobs, request.app.state.runner
    if store is None:
        raise APIError(
            404, "the agent API is off: start the server with --repo-root DIR", None, "agent_api_off"
        )
    return store, runner


def _repo(request: Request, store: JobStore, repo_id: str) -> dict:
    """A registered repository, its path confined again now."""
    repo = store.repo(repo_id)
    if repo is None:
        raise APIError(
            404, f"no repository {repo_id!r}: register it with POST /v1/repos", "repo_id", "not_found"
        )
    try:
        recheck(repo["path"], request.app.state.config.repo_roots)
    except PathRefused as e:
        raise APIError(403, str(e), "repo_id", "path_refused") from None
    return repo


def _index_path(request: Request, repo_id: str) -> Path:
    return repo_data_dir(request.app.state.config.jobs_db, repo_id) / "index.db"


@post(
    "/v1/repos",
    summary="Register a repository under an allowed root",
    responses=responses(400, 401, 403, 404, 413, 415, 429, 500),
)
async def register_repo(request: Request, data: JSONBody[RepoRequest]) -> dict:
    data = await strict_body(request, RepoRequest)
    store, _ = _state(request)
    try:
        path = confine(data.path, request.app.state.config.repo_roots)
    except PathRefused as e:
        raise APIError(403, str(e), "path", "path_refused") from None
    except OSError as e:  # a name too long, a loop of links: the path cannot name a repository
        raise APIError(400, f"path: {e.strerror or e}", "path", "invalid_path") from None
    return store.add_repo(path)


@post(
    "/v1/repos/{repo_id:str}/index",
    summary="Index (incrementally) a registered repository",
    status_code=200,
    responses=responses(400, 401, 404, 409, 429, 500),
)
async def index(request: Request, repo_id: FromPath[str]) -> dict:
    from ds4.agent.index.indexer import index_repo
    from ds4.agent.index.store import IndexDatabaseError

    store, _ = _state(request)
    repo = _repo(request, store, repo_id)
    try:
        report = await anyio.to_thread.run_sync(index_repo, repo["path"], _index_path(request, repo_id))
    except IndexDatabaseError as e:
        raise APIError(409, str(e), None, "index_unusable") from None
    return {k: v for k, v in asdict(report).items() if k != "parsed_paths"}


@get(
    "/v1/repos/{repo_id:str}/search",
    summary="Search symbols and text in a repository's index",
    responses=responses(400, 401, 404, 409, 429, 500),
)
async def search(
    request: Request,
    repo_id: FromPath[str],
    q: FromQuery[str],
    kind: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 20,
) -> dict:
    from ds4.agent.index.query import search as search_index
    from ds4.agent.index.store import IndexDatabaseError, open_index

    store, _ = _state(request)
    _repo(request, store, repo_id)
    db_path = _index_path(request, repo_id)
    if not db_path.exists():
        raise APIError(
            409, "the repository is not indexed yet: POST /v1/repos/{id}/index", None, "not_indexed"
        )
    try:
        with open_index(db_path, write=False) as db:
            return {"results": search_index(db, q, kind, limit)}
    except (IndexDatabaseError, sqlite3.DatabaseError) as e:
        raise APIError(
            409, f"{e}; re-index it: POST /v1/repos/{{id}}/index", None, "index_unusable"
        ) from None


@post(
    "/v1/fix",
    summary="Start a fix job",
    status_code=202,
    responses=responses(400, 401, 403, 404, 413, 415, 429, 500),
)
async def start_fix(request: Request, data: JSONBody[FixRequest]) -> dict:
    data = await strict_body(request, FixRequest)
    store, runner = _state(request)
    repo = _repo(request, store, data.repo_id)
    config = request.app.state.config
    if data.test_cmd is not None and not config.allow_request_test_cmd:
        raise APIError(
            403,
            "test_cmd from a request is off: it comes from the server (--test-cmd) or the repo's .ds4.toml",
            "test_cmd",
            "test_cmd_not_allowed",
        )
    spec = {
        "issue": data.issue,
        "rounds": data.rounds,
        "samples": data.samples,
        "budget": job_budget(runner.backend, data),
        "max_tokens": data.max_tokens,
        **_test_cmd(data.test_cmd, config.test_cmd, repo["path"]),
    }
    queued = store.counts()["queued"]
    if queued >= config.max_queued_jobs:
        raise APIError(
            429,
            f"{queued} fix jobs are queued already (at most {config.max_queued_jobs}): retry when one ends",
            None,
            "job_queue_full",
            {"Retry-After": "30"},
        )
    job_id = store.create_job(data.repo_id, data.issue, spec)
    runner.submit(job_id)
    return {"id": job_id, "status": "queued"}


def job_budget(backend, data: FixRequest) -> int | None:
    """A fix job's budget, settled at submission as the CLI settles it (fit.py): the request's, or what
    the model's context leaves beside the instructions, the answers and later rounds' feedback (None
    while the context is not known: the loop fits it). A 400 with the numbers when the prompt cannot fit
    the context, instead of a job that fails later."""
    from ds4.agent.pack import PROMPTS
    from ds4.agent.tokens import ApproxCounter, TokenCounter

    context = backend.max_model_len
    if context is None:  # not known yet: the loop fits the budget once it knows (fit.DEFAULT_BUDGET else)
        return data.budget
    counter = TokenCounter(backend.tokenizer_file) if backend.tokenizer_file else ApproxCounter()
    instructions = counter.count((PROMPTS / "fix.md").read_text())
    room = prompt_room(context, data.max_tokens, instructions)
    if data.budget is not None and data.budget > room:
        raise APIError(
            400,
            f"a prompt of up to {data.budget:,} tokens, the instructions' {instructions:,} and an answer of "
            f"up to {data.max_tokens:,} exceed the model's context of {context:,} tokens: ask for a budget "
            f"of at most {room:,}, or leave it unset to fit the context",
            "budget",
            "context_exceeded",
        )
    if data.budget is not None:
        return data.budget
    try:
        return budget_for(context, data.max_tokens, instructions, data.rounds)
    except FixError:
        raise APIError(
            400,
            f"the model's context of {context:,} tokens leaves {max(room, 0):,} for a prompt beside the "
            f"instructions' {instructions:,} and answers of up to {data.max_tokens:,} (at least "
            f"{MIN_BUDGET:,} needed): lower max_tokens",
            "max_tokens",
            "context_exceeded",
        ) from None


def _test_cmd(requested: str | None, served: str | None, path: str) -> dict:
    """The job's test command and who chose it: the request, the server, the repository, or detection."""
    from ds4.agent.config import read_config

    if requested or served:
        return {"test_cmd": requested or served, "test_cmd_from": "request" if requested else "server"}
    try:
        chosen = read_config(Path(path) / ".ds4.toml").get("test_cmd")
    except ConfigError as e:
        raise APIError(400, str(e), None, "repo_settings_invalid") from None
    return {"test_cmd": chosen, "test_cmd_from": "repo" if chosen else None}


def _job(request: Request, job_id: str) -> dict:
    """The job `job_id` of the store (a 404 when there is none)."""
    store, _ = _state(request)
    job = store.job(job_id)
    if job is None:
        raise APIError(404, f"no job {job_id!r}", "job_id", "not_found")
    return job


@get(
    "/v1/jobs/{job_id:str}",
    summary="A job's status, verdict, diff and timings",
    responses=responses(400, 401, 404, 429, 500),
)
async def get_job(request: Request, job_id: FromPath[str]) -> dict:
    return _job(request, job_id)


@post(
    "/v1/jobs/{job_id:str}/cancel",
    summary="Cancel a queued or running job",
    status_code=200,
    responses=responses(400, 401, 404, 429, 500),
)
async def cancel_job(request: Request, job_id: FromPath[str]) -> dict:
    _job(request, job_id)
    store, runner = _state(request)
    status = store.cancel(job_id)
    running = runner.running.get(job_id)
    if running is not None:
        running.set()  # a test run in progress stops now, not when it ends
    return {"id": job_id, "status": status}


@get(
    "/v1/jobs/{job_id:str}/events",
    summary="The job's loop events as SSE, until it ends",
    responses=responses(400, 401, 404, 429, 500),
)
async def job_events(request: Request, job_id: FromPath[str]) -> ServerSentEvent:
    _job(request, job_id)
    store, _ = _state(request)

    async def stream():
        seen = -1
        while True:
            events = store.events(job_id, after=seen)
            for seq, event in events:
                seen = seq
                yield json.dumps({**event, "text": describe(event)})
            if not events and store.job(job_id)["status"] not in ACTIVE:
                yield json.dumps({"event": "end", "status": store.job(job_id)["status"]})
                return
            if not events:
                await asyncio.sleep(0.2)

    return ServerSentEvent(stream())


ROUTES = [register_repo, index, search, start_fix, get_job, cancel_job, job_events]
BODIES = [RepoRequest, FixRequest]
