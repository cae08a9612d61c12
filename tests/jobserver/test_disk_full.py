"""The job server on a full disk, in process: the writes that fail there fail as they do on a full disk (a write to
/dev/full, which the kernel answers ENOSPC; SQLite's own "database or disk is full"), at the call that fails, in the
real app with its supervision loop running."""

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import time

import httpx
import pytest

from trainmetrics.edge import build_app
from trainmetrics.jobserver import app as app_module, reports, uploads
from trainmetrics.jobserver.app import build_component
from trainmetrics.jobserver.auth import TokenAuth
from trainmetrics.jobserver.executors import Run
from trainmetrics.jobserver.jobs import ServerSettings
from trainmetrics.jobserver.store import JobRecord, JobStore

CSV = b"a,b,label\n" + b"".join(b"%d,%d,%d\n" % (i, 2 * i, i % 2) for i in range(2000))


def database_full_error() -> sqlite3.OperationalError:
    """SQLite's own error for a write that found no room (a database allowed one page, asked for a second)."""
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA max_page_count = 1")
    try:
        for table in ("a", "b"):
            db.execute(f"CREATE TABLE {table} (x)")
    except sqlite3.OperationalError as error:
        assert error.sqlite_errorcode == sqlite3.SQLITE_FULL
        return error
    finally:
        db.close()
    raise AssertionError("SQLite found room for a second page")


@contextlib.asynccontextmanager
async def served(data_dir, max_concurrent: int = 0, tokens: dict[bytes, str] | None = None):
    """The job server's app in its lifespan (store, supervision loop), a client of it, and its JobServer; its
    jobs stay queued (no slot, unless given). With tokens, its owners are theirs (`--tokens`)."""
    component = build_component(ServerSettings(data_dir=data_dir, max_concurrent=max_concurrent,
                                               owners=tokens is not None))
    app = build_app([component], authenticator=TokenAuth(tokens) if tokens else None)
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope, receive, send):      # as uvicorn passes the lifespan's state to each request
            await app({**scope, "state": dict(state)}, receive, send)

        server = component.extra["server"]
        async with asyncio.timeout(10):
            while server.last_tick is None:             # supervising, as a started server is
                await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=False, client=("127.0.0.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client, server


def insufficient_storage(answer) -> None:
    assert answer.status_code == 507, (answer.status_code, answer.text)
    assert answer.json()["error"] == {"code": "insufficient_storage",
                                      "message": "no space left on the server's disk: try again once space is freed"}


def test_an_upload_that_finds_the_disk_full_is_507_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    """It was a 500 `internal error: OSError`, with two tracebacks in the log."""
    mkstemp = uploads.tempfile.mkstemp

    def on_a_full_disk(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        if kwargs.get("prefix") == uploads.UPLOAD_PREFIX:
            full = os.open("/dev/full", os.O_WRONLY)      # every write answered ENOSPC, as on a full disk
            os.dup2(full, fd)
            os.close(full)
        return fd, name

    async def upload_twice():
        async with served(tmp_path) as (client, _):
            monkeypatch.setattr(uploads.tempfile, "mkstemp", on_a_full_disk)
            with caplog.at_level(logging.WARNING):
                insufficient_storage(await client.post("/api/training/datasets?name=d.csv", content=CSV))
            assert list((tmp_path / "datasets").iterdir()) == []
            monkeypatch.undo()                            # space freed
            assert (await client.post("/api/training/datasets?name=d.csv", content=CSV)).status_code == 201

    asyncio.run(upload_twice())
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == [
        "POST /api/training/datasets: no space left on the disk: [Errno 28] No space left on device"]
    assert not any(record.exc_info for record in caplog.records)


def test_a_full_database_is_507_and_the_supervision_goes_on(tmp_path, monkeypatch, caplog):
    """A submission was a 500 `internal error: OperationalError`; the server's "still up" note, which failed at
    every tick, cut each short (/healthz `not_supervising`) with a traceback, 5 a second. The note is said once
    while it fails, the ticks go on, and everything works again once there is room."""
    monkeypatch.setattr(reports, "ALIVE_NOTE_SECONDS", 0.5)
    full, execute = database_full_error(), JobStore._execute

    def writes_fail(self, sql, params=()):
        if sql.split()[0] in ("INSERT", "UPDATE", "DELETE"):
            raise full
        return execute(self, sql, params)

    async def on_a_full_disk():
        async with served(tmp_path) as (client, server):
            job = {"dataset": "blobs", "epochs": 1}
            assert (await client.post("/api/training/jobs", json={**job, "job_id": "before"})).status_code == 201
            monkeypatch.setattr(JobStore, "_execute", writes_fail)
            with caplog.at_level(logging.INFO):
                insufficient_storage(await client.post("/api/training/jobs", json={**job, "job_id": "full"}))
                insufficient_storage(await client.post("/api/training/jobs/before/cancel"))
                await asyncio.sleep(2)                    # 10 ticks, 4 notes due
                assert time.monotonic() - server.last_tick < 1.0
                assert (await client.get("/healthz")).json()["checks"]["jobs"]["status"] == "ok"
                failed = [record for record in caplog.records if record.levelno >= logging.WARNING]
                assert [record.getMessage() for record in failed] == [
                    "POST /api/training/jobs: no space left on the disk: database or disk is full",
                    "POST /api/training/jobs/before/cancel: no space left on the disk: database or disk is full",
                    "cannot note that the server is up (database or disk is full): tried again every 0.5 s"]
                assert not any(record.exc_info for record in failed)
                monkeypatch.setattr(JobStore, "_execute", execute)     # space freed
                await asyncio.sleep(1)
            assert time.time() - server.service.store.last_alive() < 1
            assert "the note that the server is up is written again" in caplog.messages
            assert (await client.post("/api/training/jobs", json={**job, "job_id": "after"})).status_code == 201

    asyncio.run(on_a_full_disk())


def test_a_round_that_fails_as_the_one_before_is_said_once_a_minute(monkeypatch, caplog):
    """A job that ended while the disk was full failed every supervisor tick until there was room (its end cannot
    be recorded): a traceback 5 times a second."""
    failures = [sqlite3.OperationalError("database or disk is full")] * 20 + [ValueError("another")]
    rounds = []

    async def work():
        rounds.append(1)
        if len(rounds) > len(failures):
            raise asyncio.CancelledError
        raise failures[len(rounds) - 1]

    with caplog.at_level(logging.INFO), pytest.raises(asyncio.CancelledError):
        asyncio.run(app_module.repeat(work, 0, "supervisor tick"))
    said = [(record.getMessage(), bool(record.exc_info)) for record in caplog.records]
    assert said == [("supervisor tick failed", True), ("supervisor tick failed", True)]
    monkeypatch.setattr(app_module, "REPEATED_FAILURE_LOG_SECONDS", 0.0)
    caplog.clear()
    rounds.clear()
    with caplog.at_level(logging.INFO), pytest.raises(asyncio.CancelledError):
        asyncio.run(app_module.repeat(work, 0, "supervisor tick"))
    assert [record.getMessage() for record in caplog.records][:2] == [
        "supervisor tick failed", "supervisor tick still failing: OperationalError: database or disk is full"]


@pytest.mark.parametrize("request_path,body", [("/api/training/jobs", {"job_id": "asked", "epochs": 1}),
                                               ("/api/training/jobs/asked/resume", None)])
def test_a_request_recorded_before_the_disk_filled_is_answered_as_recorded(tmp_path, monkeypatch, request_path, body):
    """The disk filled just after a submission (or a resume) was recorded, and the tick that starts queued jobs in
    the same request found another job's end to record: the request was answered 507 "try again once space is
    freed", though it was stored and the job would run. The retry was 409 (`'asked' exists`; one without a job_id
    was stored, and run, twice; a resume's retry: `is queued`). The tick's failure is the supervision loop's."""
    full, execute = database_full_error(), JobStore._execute
    disk = {"armed": False, "full": False}
    other = subprocess.Popen(["sleep", "60"])

    def fills_after_the_next_write(self, sql, params=()):
        write = sql.split()[0] in ("INSERT", "UPDATE", "DELETE")
        if write and disk["full"]:
            raise full
        rows = execute(self, sql, params)
        if write and disk["armed"]:
            disk["full"] = True
            other.kill()                # another job's process ends meanwhile: its end finds no room
            other.wait()
        return rows

    async def on_a_filling_disk():
        async with served(tmp_path) as (client, server):
            if body is None:
                assert (await client.post("/api/training/jobs", json={"job_id": "asked"})).status_code == 201
                await server.call(lambda: server.service.store.update_job("asked", state="paused"))

            def running_elsewhere():
                server.service.store.add_job(JobRecord(id="other", owner="default", name="other", spec={},
                                                       state="running", pid=other.pid, handle=str(other.pid)))
                server.service.supervisor.runs["other"] = Run("other", str(other.pid), tmp_path / "jobs" / "other",
                                                              other.pid, other)

            await server.call(running_elsewhere)
            monkeypatch.setattr(JobStore, "_execute", fills_after_the_next_write)
            disk["armed"] = True
            answer = await client.post(request_path, json=body)
            assert answer.status_code == (201 if body else 200), (answer.status_code, answer.text)
            assert answer.json()["state"] == "queued"
            monkeypatch.setattr(JobStore, "_execute", execute)     # space freed: the other job's end is recorded
            async with asyncio.timeout(5):
                while (await client.get("/api/training/jobs/other")).json()["state"] == "running":
                    await asyncio.sleep(0.1)
            jobs = (await client.get("/api/training/jobs")).json()["jobs"]
            assert sorted((job["job_id"], job["state"]) for job in jobs) == [("asked", "queued"), ("other", "failed")]

    try:
        asyncio.run(on_a_filling_disk())
    finally:
        other.kill()
        other.wait()


def test_a_full_disk_met_by_another_owners_start_names_nothing_of_that_job_to_you(tmp_path, monkeypatch):
    """The executor's words for a start that found the disk full were every queued job's `waiting_for`, whoever's:
    they name the job's files (`<data dir>/jobs/bob-secret/train.log`), so alice read the id of bob's queued job.
    Another owner's queued job now reads that the executor could not start a queued job, without its words."""
    import errno

    tokens = {b"alice-token-0123456789": "alice", b"bob-token-0123456789ab": "bob"}
    as_owner = {owner: {"authorization": f"Bearer {token.decode()}"} for token, owner in tokens.items()}

    async def with_bobs_start_failing():
        async with served(tmp_path, max_concurrent=1, tokens=tokens) as (client, server):
            def no_room(job_id, nproc, train_args, job_dir, env):     # what a full disk answers the log's creation
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(job_dir / "train.log"))

            monkeypatch.setattr(server.service.supervisor.executor, "start", no_room)
            job = {"dataset": "blobs", "epochs": 1}
            bobs = await client.post("/api/training/jobs", json={**job, "job_id": "bob-secret"},
                                     headers=as_owner["bob"])
            assert bobs.status_code == 201, bobs.text
            assert "No space left on device" in bobs.json()["waiting_for"]          # his own start's words: his
            answers = [await client.post("/api/training/jobs", json={**job, "job_id": "alice-1"},
                                         headers=as_owner["alice"]),
                       await client.get("/api/training/jobs/alice-1", headers=as_owner["alice"])]
            answers += [(await client.get("/api/training/jobs", headers=as_owner["alice"])).json()["jobs"][0]]
            for answer in answers:
                alices = answer if isinstance(answer, dict) else answer.json()
                assert alices["state"] == "queued", alices
                assert alices["waiting_for"].startswith("the local executor to start jobs again: it could not start "
                                                        "a queued job (since "), alices
                assert "bob" not in alices["waiting_for"] and "train.log" not in alices["waiting_for"], alices

    asyncio.run(with_bobs_start_failing())
