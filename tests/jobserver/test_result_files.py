"""A job's result file as the job server reads it back: text JSON carries that the store cannot hold.

JSON spells a lone surrogate as an escape (`"\\udcff"`), and Python's json writes one so for a path whose bytes are
not UTF-8 (os.fsdecode's surrogateescape): a trainer's error naming such a file, or a result edited by hand. SQLite
refuses to store such text, and the run's end was never recorded."""

import json
import os
import signal
import time

import pytest

from trainmetrics.jobfiles import rank_result_path, read_result

from .server_process import Server, wait_job
from .test_server import job_pid, wait_logged
from .test_supervisor import odd_job_and_one_behind

# A result's text as the file holds it (escaped), and as the job's error shows it: the escape, as text.
LONE = "\\udcff"


def lone_surrogate_result(field: str) -> str:
    """A failed (or, for `reason`, paused) result whose `field` holds a lone surrogate, as the file's JSON text."""
    said = {"error_type": "OSError", "error": "OSError: cannot read /mnt/data.csv", "reason": None}
    said[field] = f"{said[field] or 'loss spike'} /mnt/{LONE}.csv"
    state, code = ("paused", 4) if field == "reason" else ("failed", 1)
    return json.dumps({"state": state, "exit_code": code, **said}).replace("\\\\udcff", "\\udcff")


@pytest.mark.parametrize("field, rank", [("error", 0), ("reason", 0), ("error", 1), ("error_type", 1)])
def test_a_results_text_with_a_lone_surrogate_ends_its_job_and_the_queue_goes_on(field, rank, tmp_path):
    """Recording the run's end raised UnicodeEncodeError at every tick: the job stayed `running` for good and no
    queued job behind it started."""
    store, supervisor = odd_job_and_one_behind(tmp_path, 2 if rank else 1)
    path = supervisor.result_path("odd")
    (path if rank == 0 else rank_result_path(path, rank)).write_text(lone_surrogate_result(field))
    assert json.loads(lone_surrogate_result(field))[field].endswith("\udcff.csv")        # what json reads
    supervisor.tick()
    job = store.get_job("odd")
    assert job.state == ("paused" if field == "reason" else "failed")
    said = job.reason if field == "reason" else job.error
    assert f"/mnt/{LONE}.csv" in said and said.encode("utf-8")
    assert store.get_job("behind").state == "running"
    store.close()


def test_a_result_read_back_holds_only_text_utf8_can_carry(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(lone_surrogate_result("error"))
    result = read_result(path)
    assert result["error"] == f"OSError: cannot read /mnt/data.csv /mnt/{LONE}.csv"
    assert json.dumps(result, ensure_ascii=False).encode("utf-8")


def test_a_server_restarted_over_a_result_holding_a_lone_surrogate_starts_and_records_its_end(tmp_path):
    """A run that ended while no server watched it is recorded from its result at the next start: a result whose
    error holds a lone surrogate raised out of recover(), and the server did not start at all (every restart)."""
    server = Server(tmp_path)
    server.start()
    client = server.client()
    client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 25, "batch_size": 16, "log_every": 10,
                                            "job_id": "odd-1"})
    wait_job(client, "odd-1", lambda j: j["state"] == "running")
    wait_logged(tmp_path / "jobs" / "odd-1" / "train.log", "step=")
    server.stop(signal.SIGKILL)
    os.kill(job_pid(tmp_path, "odd-1"), signal.SIGKILL)
    time.sleep(0.5)
    (tmp_path / "jobs" / "odd-1" / "result.json").write_text(lone_surrogate_result("error"))

    restarted = Server(tmp_path)
    restarted.start()
    try:
        client = restarted.client()
        job = client.get("/api/training/jobs/odd-1")
        assert job.status_code == 200, job.text
        assert (job.json()["state"], job.json()["exit_code"]) == ("failed", 1)
        assert job.json()["error"] == f"OSError: cannot read /mnt/data.csv /mnt/{LONE}.csv"
        assert client.get("/api/training/jobs").status_code == 200
        client.post("/api/training/jobs", json={"dataset": "blobs", "epochs": 1, "job_id": "after-1"})
        assert wait_job(client, "after-1", lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
    finally:
        restarted.stop()
