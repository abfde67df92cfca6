"""The server under uvicorn, and how it stops: on SIGTERM (or Ctrl-C) the fix job and every generation in
flight are cancelled at once, their answers go out within a few seconds, then the app's shutdown hooks
stop the job worker and the engine thread and checkpoint the jobs database; all within 10 s."""

from __future__ import annotations

import logging

import uvicorn
from litestar import Litestar

log = logging.getLogger("ds4.api")

GRACE_S = 5.0  # for answers in flight once their generations are cancelled; then their tasks are cancelled


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app's work first when asked to exit: uvicorn alone waits for every
    open response, and a long generation or an SSE stream would keep the process up."""

    def __init__(self, config: uvicorn.Config, app: Litestar):
        super().__init__(config)
        self.litestar = app

    async def shutdown(self, sockets=None) -> None:
        drain(self.litestar)
        await super().shutdown(sockets)


def drain(app: Litestar) -> None:
    """Cancels the work in flight without waiting for it: the running fix job, then every generation."""
    runner = app.state.runner
    if runner is not None:
        runner.cancel_all()
    loop = getattr(app.state.model, "loop", None)
    if loop is not None:
        loop.stop()
    log.info("draining: fix jobs and generations in flight cancelled")


def serve(app: Litestar, host: str, port: int) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S)
    DrainingServer(config, app).run()
