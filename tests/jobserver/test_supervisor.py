"""The supervisor's state machine with real processes, real signals, a real store and real result files, but a
scripted stand-in for `trainmetrics train` (no torch: each case takes a fraction of a second)."""

import json
import signal
import sys
import textwrap
import time

import pytest

from trainmetrics.jobserver.local import LocalExecutor
from trainmetrics.jobserver.store import JobRecord, JobStore
from trainmetrics.jobserver.supervisor import StopRefused, Supervisor

# Stops on the FIRST signal it gets, like a trainer at a step boundary, but takes its time writing the outcome:
# a second signal arrives while it is still alive and changes nothing in what it writes.
SCRIPTED_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    result = sys.argv[sys.argv.index("--result-file") + 1]
    first = []
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda s, f: first.append(s) if not first else None)
    mode = sys.argv[sys.argv.index("--model") + 1]
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        time.sleep(0.01)
        if mode == "cnn":         # "completes" at once
            break
    time.sleep(0.5)
    state = {signal.SIGUSR1: "paused", signal.SIGTERM: "cancelled"}.get(first[0] if first else None, "completed")
    if mode != "transformer":     # the transformer "dies" without a result
        with open(result, "w") as handle:
            json.dump({"state": state, "exit_code": {"paused": 4, "cancelled": 3}.get(state, 0)}, handle)
    sys.exit({"paused": 4, "cancelled": 3}.get(state, 0) if mode != "transformer" else 9)
""")


class ScriptedExecutor(LocalExecutor):
    """Runs the scripted trainer instead of `trainmetrics train`, with the same arguments."""

    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        return [sys.executable, "-c", SCRIPTED_TRAINER, "train", *train_args]


@pytest.fixture
def supervisor(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=4, executor=ScriptedExecutor())
    yield supervisor
    for run in supervisor.runs.values():
        if run.process is not None and run.process.poll() is None:
            run.process.kill()
            run.process.wait()
    store.close()


def queue(supervisor: Supervisor, job_id: str, model: str = "mlp", **spec) -> None:
    supervisor.store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                       spec={"model": model, "dataset": "blobs", "dataset_path": "blobs", "nproc": 1,
                                             **spec}))


def submit(supervisor: Supervisor, job_id: str, model: str = "mlp") -> JobRecord:
    queue(supervisor, job_id, model)
    supervisor.tick()
    job = supervisor.store.get_job(job_id)
    assert job.state == "running"
    return job


def settle(supervisor: Supervisor, job_id: str, timeout: float = 20) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.tick()
        job = supervisor.store.get_job(job_id)
        if job.state != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} still running")


def test_a_cancel_accepted_after_a_pause_wins_though_the_process_wrote_paused(supervisor):
    job = submit(supervisor, "pause-then-cancel")
    time.sleep(0.3)                                 # its handlers are installed
    supervisor.request_stop(job, "paused")
    supervisor.request_stop(supervisor.store.get_job(job.id), "cancelled")
    ended = settle(supervisor, job.id)
    assert json.loads(supervisor.result_path(job.id).read_text())["state"] == "paused"   # what the process said
    assert (ended.state, ended.resume, ended.requested) == ("cancelled", False, None)     # what was promised


def test_a_pause_after_a_cancel_is_refused_and_changes_nothing(supervisor):
    job = submit(supervisor, "cancel-then-pause")
    time.sleep(0.3)
    supervisor.request_stop(job, "cancelled")
    with pytest.raises(StopRefused, match="being cancelled"):
        supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    assert settle(supervisor, job.id).state == "cancelled"


def test_a_job_that_completes_before_its_stop_lands_is_completed(supervisor):
    job = submit(supervisor, "done-first", model="cnn")
    ended = settle(supervisor, job.id)
    assert ended.state == "completed" and ended.error is None


def test_a_process_that_ends_without_a_result_failed_whatever_its_log_says(supervisor):
    job = submit(supervisor, "no-result", model="transformer")
    supervisor.log_path(job.id).write_text('summary {"state": "paused", "rank": 0}\n')   # an old run's words
    time.sleep(0.3)
    supervisor.request_stop(job, "paused")
    ended = settle(supervisor, job.id)
    assert ended.state == "failed" and ended.error == "exit code 9 without a result"


def test_a_stale_result_of_an_earlier_run_is_never_read(supervisor):
    job = submit(supervisor, "stale")
    time.sleep(0.3)
    supervisor.request_stop(job, "paused")
    assert settle(supervisor, job.id).state == "paused"
    supervisor.store.update_job(job.id, state="queued", resume=True)
    supervisor.tick()                              # the resumed run starts: the old result is gone
    assert not supervisor.result_path(job.id).exists()
    run = supervisor.runs[job.id]
    run.process.send_signal(signal.SIGKILL)
    ended = settle(supervisor, job.id)
    assert ended.state == "failed" and "SIGKILL" in ended.error


def test_a_job_whose_start_fails_fails_alone_and_the_queue_goes_on(supervisor):
    queue(supervisor, "unstartable", target="la\x00bel")     # what the contract refuses now: a NUL in argv
    queue(supervisor, "behind-it")
    supervisor.tick()
    failed, behind = supervisor.store.get_job("unstartable"), supervisor.store.get_job("behind-it")
    assert failed.state == "failed" and "embedded null byte" in failed.error and "\n" not in failed.error
    assert behind.state == "running"
