"""The fix-job worker behind the agent API: one job at a time on a thread (jobs share the model), its
state in SQLite, its tests in the sandbox; stops what runs at shutdown."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from ds4.agent.api.jobs import JobStore
from ds4.agent.api.paths import PathRefused, recheck, repo_data_dir
from ds4.agent.backends import GenerationParams
from ds4.agent.config import FixConfig
from ds4.agent.errors import Cancelled
from ds4.agent.fit import API_SETTINGS
from ds4.agent.sandbox import SandboxError

log = logging.getLogger("ds4.api")


SHUTDOWN_WAIT_S = 3.0  # for the job worker to record how its job ended


class JobRunner:
    """One worker thread; `backend` is what fix jobs ask (the served model, or an endpoint)."""

    def __init__(self, store: JobStore, backend, config):
        self.store, self.backend, self.config = store, backend, config
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.running: dict[str, threading.Event] = {}  # job id -> set on cancel: stops generation, tests
        self.stopping = threading.Event()
        self.sandbox, self.no_sandbox = self._choose_sandbox()
        self._prune()
        self.thread = threading.Thread(target=self._run, name="ds4-jobs", daemon=True)
        self.thread.start()

    def submit(self, job_id: str) -> None:
        self.queue.put(job_id)

    def cancel_all(self) -> None:
        """The server stops: the running job is interrupted now, queued ones never start."""
        self.stopping.set()
        for cancel in list(self.running.values()):
            cancel.set()

    def shutdown(self) -> None:
        """cancel_all(), then waits a little for the worker (a litestar shutdown hook: no arguments)."""
        self.cancel_all()
        self.queue.put(None)
        self.thread.join(SHUTDOWN_WAIT_S)

    def _choose_sandbox(self):
        """The sandbox jobs' tests run in, or None and why there is none."""
        from ds4.agent.sandbox import choose

        hidden = (Path(self.config.jobs_db).resolve().parent,)  # other jobs, indexes, run folders
        try:
            return choose(allow_unsandboxed=self.config.allow_unsandboxed_tests, hidden=hidden), ""
        except SandboxError as e:
            return None, f"{e}; or start the server with --allow-unsandboxed-tests"

    def _prune(self) -> None:
        """Worktrees a killed server left behind, in every registered repository that is still valid."""
        from ds4.agent.runs import prune_stale

        for repo in self.store.repos():
            folder = repo_data_dir(self.config.jobs_db, repo["id"])
            try:
                path = recheck(repo["path"], self.config.repo_roots)
            except PathRefused:
                continue  # refused again when a request names it
            if folder.is_dir():
                prune_stale(path, folder)

    def _job_sandbox(self, spec: dict):
        if self.sandbox is None:
            raise SandboxError(self.no_sandbox)
        if self.sandbox.name == "none" and spec.get("test_cmd_from") == "repo":
            raise SandboxError(
                "the repository's .ds4.toml sets the test command, and this server runs a repository's "
                "own command only in a sandbox, which this machine does not have"
            )
        return self.sandbox

    def _fail(self, job_id: str, message: str) -> None:
        self.store.add_event(job_id, {"event": "error", "message": message})
        self.store.finish(job_id, "failed", "error", "", None, message)

    def _run(self) -> None:
        while (job_id := self.queue.get()) is not None and not self.stopping.is_set():
            try:
                if self.store.start(job_id):
                    self._fix(job_id)
            except Exception:  # the worker's boundary: the next job still runs
                if self.stopping.is_set():
                    log.warning("job %s stopped with the server", job_id)
                    return
                log.exception("job %s could not be recorded", job_id)

    def _fix(self, job_id: str) -> None:
        from ds4.agent.loop import fix

        job = self.store.job(job_id)
        spec = job["spec"]
        try:
            path = recheck(self.store.repo(job["repo_id"])["path"], self.config.repo_roots)
            sandbox = self._job_sandbox(spec)
        except (PathRefused, SandboxError) as e:
            self._fail(job_id, str(e))
            return

        cancel = self.running.setdefault(job_id, threading.Event())

        def on_event(event: dict) -> None:
            self.store.add_event(job_id, event)
            if cancel.is_set() or self.store.job(job_id)["status"] == "cancelled":
                raise Cancelled

        backend = self.backend.with_cancel(cancel) if hasattr(self.backend, "with_cancel") else self.backend
        config = FixConfig(
            repo=path,
            issue=spec["issue"],
            test_cmd=spec.get("test_cmd"),
            rounds=spec["rounds"],
            samples=spec["samples"],
            budget=spec["budget"],
            test_timeout=self.config.test_timeout,
            apply=False,  # a service never writes to the registered tree
            generation=GenerationParams(max_tokens=spec["max_tokens"]),
            cancel=cancel,  # a running test command dies with it, its whole process tree
            sandbox=sandbox,
            data_dir=repo_data_dir(self.config.jobs_db, job["repo_id"]),
            setting_names=API_SETTINGS,
        )
        try:
            result = fix(config, backend, on_event)
        except Exception as e:  # the job fails, the server goes on; the reason is kept with the job
            self._ended(job_id, cancel, e)
            return
        finally:
            self.running.pop(job_id, None)
        if cancel.is_set():
            self._ended(job_id, cancel, Cancelled())
            return
        status = "failed" if result.status == "error" else "finished"
        self.store.finish(job_id, status, result.status, result.diff, result.as_json(), result.message)

    def _ended(self, job_id: str, cancel: threading.Event, error: Exception) -> None:
        """A job that ended early: cancelled by its client, interrupted by shutdown, or failed."""
        if self.store.job(job_id)["status"] == "cancelled":
            self.store.add_event(job_id, {"event": "cancelled"})
        elif cancel.is_set():
            self.store.finish(job_id, "interrupted", None, "", None, "the server stopped while the job ran")
        else:
            self._fail(job_id, f"{type(error).__name__}: {error}")
