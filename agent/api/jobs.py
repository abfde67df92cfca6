"""Fix jobs and registered repositories in SQLite, so a restart loses nothing: finished jobs keep their
verdict and diff, jobs that were queued or running when the server stopped are marked `interrupted`,
and every loop event a job emitted stays readable (for `GET /v1/jobs/{id}/events`)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ds4.agent.errors import JobsDatabaseError

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    id TEXT PRIMARY KEY, path TEXT UNIQUE NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, repo_id TEXT NOT NULL REFERENCES repos(id), issue TEXT NOT NULL, spec TEXT,
    status TEXT NOT NULL, verdict TEXT, diff TEXT, result TEXT, message TEXT,
    created REAL NOT NULL, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id), seq INTEGER NOT NULL, event TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
ACTIVE = ("queued", "running")
STATES = ("queued", "running", "finished", "failed", "cancelled", "interrupted")


class JobStore:
    """One connection guarded by a lock: the server's threads (HTTP handlers, job runners) share it."""

    def __init__(self, path: str | Path):
        self.lock = threading.Lock()
        self.closed = False
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            self._interrupt_active()  # the previous process ended while these ran
        except (sqlite3.Error, OSError) as e:
            raise JobsDatabaseError(
                f"cannot use the jobs database {path}: {e} (move it aside, or pass --jobs-db FILE)"
            ) from None

    def _interrupt_active(self) -> None:
        """Jobs of a process that stopped never stay "running" forever."""
        self.db.execute(
            "UPDATE jobs SET status='interrupted', finished=?, "
            f"message='the server stopped while the job ran' WHERE status IN {ACTIVE}",
            (time.time(),),
        )

    # -- repositories ---------------------------------------------------------------------------

    def add_repo(self, path: Path) -> dict:
        with self.lock:
            row = self.db.execute("SELECT id, path, created FROM repos WHERE path=?", (str(path),)).fetchone()
            if row is None:
                row = (uuid.uuid4().hex[:12], str(path), time.time())
                self.db.execute("INSERT INTO repos VALUES (?, ?, ?)", row)
        return {"id": row[0], "path": row[1], "created": row[2]}

    def repos(self) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT id, path, created FROM repos ORDER BY created").fetchall()
        return [{"id": row[0], "path": row[1], "created": row[2]} for row in rows]

    def repo(self, repo_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT id, path, created FROM repos WHERE id=?", (repo_id,)).fetchone()
        return {"id": row[0], "path": row[1], "created": row[2]} if row else None

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, repo_id: str, issue: str, spec: dict | None = None) -> str:
        """`spec`: how to run it (rounds, samples, budget, test command), kept with the job."""
        job_id = uuid.uuid4().hex
        with self.lock:
            self.db.execute(
                "INSERT INTO jobs (id, repo_id, issue, spec, status, created) "
                "VALUES (?, ?, ?, ?, 'queued', ?)",
                (job_id, repo_id, issue, json.dumps(spec or {}), time.time()),
            )
        return job_id

    def start(self, job_id: str) -> bool:
        """queued -> running; False when the job was cancelled before it started."""
        with self.lock:
            done = self.db.execute(
                "UPDATE jobs SET status='running', started=? WHERE id=? AND status='queued'",
                (time.time(), job_id),
            )
        return done.rowcount == 1

    def finish(
        self, job_id: str, status: str, verdict: str | None, diff: str, result: dict | None, message=""
    ):
        assert status in STATES
        with self.lock:
            self.db.execute(
                "UPDATE jobs SET status=?, verdict=?, diff=?, result=?, message=?, finished=? WHERE id=?",
                (status, verdict, diff, json.dumps(result) if result else None, message, time.time(), job_id),
            )

    def cancel(self, job_id: str) -> str | None:
        """Marks an active job cancelled; returns its status after the call (None: no such job)."""
        with self.lock:
            self.db.execute(
                f"UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND status IN {ACTIVE}",
                (time.time(), job_id),
            )
            row = self.db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row[0] if row else None

    def add_event(self, job_id: str, event: dict) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO job_events VALUES (?, (SELECT COUNT(*) FROM job_events WHERE job_id=?), ?)",
                (job_id, job_id, json.dumps(event, default=str)),
            )

    def events(self, job_id: str, after: int = -1) -> list[tuple[int, dict]]:
        with self.lock:
            rows = self.db.execute(
                "SELECT seq, event FROM job_events WHERE job_id=? AND seq>? ORDER BY seq", (job_id, after)
            ).fetchall()
        return [(seq, json.loads(text)) for seq, text in rows]

    def job(self, job_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute(
                "SELECT id, repo_id, issue, spec, status, verdict, diff, result, message, created, started, "
                "finished FROM jobs WHERE id=?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        keys = (
            "id",
            "repo_id",
            "issue",
            "spec",
            "status",
            "verdict",
            "diff",
            "result",
            "message",
            "created",
            "started",
            "finished",
        )
        job = dict(zip(keys, row, strict=True))
        job["result"] = json.loads(job["result"]) if job["result"] else None
        job["spec"] = json.loads(job["spec"]) if job["spec"] else {}
        return job

    def counts(self) -> dict[str, int]:
        with self.lock:
            rows = self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATES} | dict(rows)

    def close(self) -> None:
        """Marks the jobs still active interrupted, folds the WAL into the database file, closes."""
        with self.lock:
            if self.closed:
                return
            self._interrupt_active()
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
            self.closed = True
