"""The job store on real SQLite: repositories are registered once, jobs move through their states,
events keep their order, and a restart (a new store on the same file) keeps every job: finished ones
as they were, running and queued ones marked interrupted."""

from __future__ import annotations

import pytest

from ds4.agent.api.jobs import JobStore


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def test_a_repository_is_registered_once(store, tmp_path):
    first = store.add_repo(tmp_path / "app")
    assert store.add_repo(tmp_path / "app")["id"] == first["id"]
    assert store.repo(first["id"])["path"] == str(tmp_path / "app") and store.repo("nope") is None


def test_a_job_goes_from_queued_to_finished_with_its_events(store, tmp_path):
    repo = store.add_repo(tmp_path)
    job = store.create_job(repo["id"], "add() subtracts")
    assert store.job(job)["status"] == "queued" and store.start(job)
    for n in range(3):
        store.add_event(job, {"event": "ask", "round": n + 1})
    store.finish(job, "finished", "resolved", "--- a/x\n+++ b/x\n", {"rounds": 2})
    got = store.job(job)
    assert (got["status"], got["verdict"], got["result"]) == ("finished", "resolved", {"rounds": 2})
    assert [e["round"] for _, e in store.events(job)] == [1, 2, 3]
    assert [seq for seq, _ in store.events(job, after=0)] == [1, 2]
    assert store.counts()["finished"] == 1


def test_a_cancelled_job_does_not_start(store, tmp_path):
    job = store.create_job(store.add_repo(tmp_path)["id"], "issue")
    assert store.cancel(job) == "cancelled" and not store.start(job)
    assert store.cancel("missing") is None


def test_a_restart_keeps_jobs_and_marks_the_unfinished_interrupted(tmp_path):
    first = JobStore(tmp_path / "jobs.db")
    repo = first.add_repo(tmp_path)["id"]
    done, running, queued = (first.create_job(repo, f"issue {i}") for i in range(3))
    first.start(done)
    first.finish(done, "finished", "unresolved", "", {"rounds": 3})
    first.start(running)
    first.add_event(running, {"event": "ask"})
    first.close()

    second = JobStore(tmp_path / "jobs.db")
    assert second.job(done)["status"] == "finished" and second.job(done)["verdict"] == "unresolved"
    for job in (running, queued):
        assert second.job(job)["status"] == "interrupted" and "stopped" in second.job(job)["message"]
    assert second.events(running) == [(0, {"event": "ask"})]
    second.close()
