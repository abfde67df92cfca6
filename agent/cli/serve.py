"""`ds4-agent serve`: the HTTP service (OpenAI-compatible routes, and the agent API with --repo-root) over
a checkpoint run in this process or in front of another OpenAI-compatible server."""

from __future__ import annotations

import os
import sys

from ds4.agent.cli import DONE
from ds4.agent.cli.flags import add_device_flags, device_kwargs
from ds4.agent.config import DEFAULTS


def add_parser(sub) -> None:
    serve = sub.add_parser("serve")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8484)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a checkpoint folder: the engine runs in this process")
    where.add_argument(
        "--endpoint", help="or serve in front of an OpenAI-compatible server (vLLM, SGLang, hosted, ds4)"
    )
    serve.add_argument(
        "--model-name", default=None, help="with --endpoint: the upstream model (default: its first)"
    )
    serve.add_argument(
        "--endpoint-key", default=None, help="with --endpoint: its API key (default: $OPENAI_API_KEY)"
    )
    serve.add_argument(
        "--served-name", default=None, help="the model's id in /v1/models (default: folder or upstream name)"
    )
    serve.add_argument(
        "--api-key", action="append", default=[], help="a bearer token (repeatable; also DS4_API_KEYS=k1,k2)"
    )
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a name the Host header may carry besides the bound address and localhost (repeatable; *: any)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="a web origin allowed to call the API, e.g. https://ci.example.com (repeatable; * for any)",
    )
    serve.add_argument(
        "--max-queued-jobs", type=int, default=16, help="fix jobs waiting to run; more get 429 (default 16)"
    )
    serve.add_argument(
        "--rate-limit", type=int, default=0, help="requests a minute per API key (default 0: no limit)"
    )
    serve.add_argument(
        "--repo-root",
        action="append",
        default=[],
        help="repositories under here may be registered (repeatable)",
    )
    serve.add_argument("--jobs-db", default=".ds4/server/jobs.db", help="where fix jobs are kept")
    serve.add_argument("--test-cmd", default=None, help="for fix jobs (else .ds4.toml, else detected)")
    serve.add_argument(
        "--allow-request-test-cmd", action="store_true", help="let requests choose the test command"
    )
    serve.add_argument(
        "--test-timeout",
        type=float,
        default=DEFAULTS["test_timeout"],
        help="seconds per test run in fix jobs",
    )
    serve.add_argument(
        "--allow-unsandboxed-tests",
        action="store_true",
        help="where bubblewrap cannot run, run fix jobs' tests unsandboxed (default: refuse them)",
    )
    serve.add_argument("--num-cache-blocks", type=int, default=None)
    serve.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + completion (default: the model's)"
    )
    serve.add_argument("--prefix-cache-dir", default=None, help="keep prefix-cache blocks on disk here")
    add_device_flags(serve)


def run(args) -> int:
    from ds4.agent.api.app import ServerConfig, check_bind, keys_from_env

    keys = keys_from_env(args.api_key)
    check_bind(args.host, keys)  # before loading anything: a refused bind costs nothing
    from ds4.agent.api.app import create_app
    from ds4.agent.api.lifecycle import serve

    model, backend = _served(args)  # an endpoint that cannot be used is a BackendError, before serving
    app = create_app(
        model,
        ServerConfig(
            api_keys=keys,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            rate_limit=args.rate_limit,
            repo_roots=[os.path.abspath(r) for r in args.repo_root],
            jobs_db=args.jobs_db,
            test_cmd=args.test_cmd,
            allow_request_test_cmd=args.allow_request_test_cmd,
            test_timeout=args.test_timeout,
            allow_unsandboxed_tests=args.allow_unsandboxed_tests,
            bind=args.host,
            allowed_hosts=args.allowed_host,
            cors_origins=args.cors_origin,
            max_queued_jobs=args.max_queued_jobs,
        ),
        backend,
    )
    print(f"ds4 serving {model.name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(app, args.host, args.port)
    return DONE


def _served(args):
    """The model served and the backend fix jobs ask: an upstream endpoint (and its OpenAIBackend), or
    the checkpoint in this process (None: jobs ask the served model itself)."""
    if args.endpoint:
        from ds4.agent.api.proxied import ProxiedModel
        from ds4.agent.backends import OpenAIBackend

        key = args.endpoint_key or os.environ.get("OPENAI_API_KEY")
        model = ProxiedModel(args.endpoint, args.model_name, key, args.served_name)
        return model, OpenAIBackend(args.endpoint, model.upstream_model, key)
    from ds4.agent.api.served import ServedModel

    engine_kwargs = device_kwargs(args)
    for name in ("num_cache_blocks", "prefix_cache_dir", "max_model_len"):
        if getattr(args, name) is not None:
            engine_kwargs[name] = getattr(args, name)
    return ServedModel(args.model, args.served_name, **engine_kwargs), None
