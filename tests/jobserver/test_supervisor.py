"""The supervisor's state machine with real processes, real signals, a real store and real result files, but a
scripted stand-in for `trainmetrics train` (no torch: each case takes a fraction of a second)."""

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from trainmetrics.jobfiles import GPUS_FILE_NAME, MAX_LISTED_ENTRIES
from trainmetrics.jobserver.executors import Run
from trainmetrics.jobserver.local import LocalExecutor
from trainmetrics.jobserver.store import JobRecord, JobStore
from trainmetrics.jobserver.supervisor import StopRefused, Supervisor

from .conftest import tick_until

# Stops on the FIRST signal it gets, like a trainer at a step boundary, but takes its time writing the outcome:
# a second signal arrives while it is still alive and changes nothing in what it writes (the result counts the
# signals it got). "late-kill" dies of SIGKILL just after writing its result, like a process a late signal
# killed on its way out.
SCRIPTED_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    result = sys.argv[sys.argv.index("--result-file") + 1]
    first, received = [], []
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda s, f: (received.append(s), first.append(s) if not first else None))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR1, signal.SIGTERM))    # started blocked, as a trainer
    mode = sys.argv[sys.argv.index("--model") + 1]
    if mode == "refused":         # refuses its arguments before it publishes anything, as a trainer does
        with open(result, "w") as handle:
            json.dump({"state": "failed", "exit_code": 2, "error": "--checkpoint-dir: bad", "published": False},
                      handle)
        sys.exit(2)
    if mode == "nopath":          # fails naming a file in the server's data dir, as a trainer's error may
        data_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(result))))
        with open(result, "w") as handle:
            json.dump({"state": "failed", "exit_code": 1, "error": f"--dataset: dataset {data_dir}/datasets/"
                       "ds-0123456789ab.csv: file not found"}, handle)
        sys.exit(1)
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        time.sleep(0.01)
        if mode == "cnn":         # "completes" at once
            break
    time.sleep(0.5)
    state = {signal.SIGUSR1: "paused", signal.SIGTERM: "cancelled"}.get(first[0] if first else None, "completed")
    if mode != "transformer":     # the transformer "dies" without a result
        with open(result, "w") as handle:
            json.dump({"state": state, "exit_code": {"paused": 4, "cancelled": 3}.get(state, 0),
                       "signals": len(received), "end_time": time.time()}, handle)
    if mode == "late-kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit({"paused": 4, "cancelled": 3}.get(state, 0) if mode != "transformer" else 9)
""")


class ScriptedExecutor(LocalExecutor):
    """Runs the scripted trainer instead of `trainmetrics train`, with the same arguments."""

    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        return [sys.executable, "-c", SCRIPTED_TRAINER, "train", *train_args]


# torchrun as far as the server sees it: a launcher that is no trainer, whose one worker (the scripted trainer, in
# a session of its own) starts a second later, with the stop signals blocked until its handlers exist.
SCRIPTED_LAUNCHER = textwrap.dedent(f"""
    import signal, subprocess, sys, time
    time.sleep(1.0)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGTERM))
    worker = subprocess.Popen([sys.executable, "-c", {SCRIPTED_TRAINER!r}, "train", *sys.argv[1:]],
                              start_new_session=True)
    sys.exit(worker.wait())
""")


class LaunchingExecutor(LocalExecutor):
    """Runs the scripted trainer under the scripted launcher, as torchrun runs a multi-rank job."""

    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        return [sys.executable, "-c", SCRIPTED_LAUNCHER, *train_args]


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


def gpu_supervisor(store: JobStore, data_dir, gpus: tuple[str, ...]) -> Supervisor:
    """A supervisor of scripted runs on the store, giving `gpus` to its jobs (room for 8)."""
    return Supervisor(store, data_dir, None, max_concurrent=8, executor=ScriptedExecutor(), gpus=gpus)


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
    job = tick_until(supervisor, job_id, timeout)
    if job.state == "running":
        raise AssertionError(f"{job_id} still running")
    return job


def test_a_run_that_ended_before_it_published_anything_is_published_by_the_server(supervisor, tmp_path):
    """Its result was taken as published (the job kept its handle): Prometheus and the analytics showed the job
    `queued` (or `paused`, cancelled while Ray could not place it) after it ended."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    queue(supervisor, "refused-1", "refused")
    job = settle(supervisor, "refused-1")
    assert (job.state, job.exit_code, job.handle) == ("failed", 2, None)
    waiting = JobService(ServerSettings(data_dir=tmp_path), supervisor.store, supervisor).waiting_jobs()
    assert [(w.job.id, w.state) for w in waiting] == [("refused-1", "failed")]


def test_a_jobs_error_shows_no_server_path(supervisor, tmp_path):
    """A trainer's error names the files it could not use: their paths in the server's data dir reached the
    job's `error` (a dataset removed after the job was submitted), where no answer may show a server path."""
    queue(supervisor, "nopath-1", "nopath")
    job = settle(supervisor, "nopath-1")
    assert job.state == "failed"
    assert job.error == "--dataset: dataset <data dir>/datasets/ds-0123456789ab.csv: file not found"


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


def restarted(supervisor: Supervisor, max_concurrent: int = 4) -> Supervisor:
    """A new server's supervisor on the same data dir and database, after recover()."""
    again = Supervisor(supervisor.store, supervisor.data_dir, None, max_concurrent=max_concurrent,
                       executor=ScriptedExecutor())
    again.recover()
    return again


def pending_signals(pid: int) -> set[int]:
    """The signals sent to the process that it has not taken yet (Linux's /proc/PID/status)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    mask = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


def crash(supervisor: Supervisor, job_id: str) -> None:
    """The job's process dies with the server (kill -9 of both): nothing is reaped or recorded."""
    process = supervisor.runs.pop(job_id).process
    process.kill()
    process.wait()


def test_a_job_whose_start_fails_fails_alone_and_the_queue_goes_on(supervisor):
    queue(supervisor, "unstartable", target="la\x00bel")     # what the contract refuses now: a NUL in argv
    queue(supervisor, "behind-it")
    supervisor.tick()
    failed, behind = supervisor.store.get_job("unstartable"), supervisor.store.get_job("behind-it")
    assert failed.state == "failed" and "embedded null byte" in failed.error and "\n" not in failed.error
    assert behind.state == "running"


def test_a_running_job_deleted_from_the_store_by_hand_frees_its_slot_when_its_run_ends(supervisor, tmp_path):
    """Its run's end was decided from a record that was gone: every tick raised (AttributeError) before it started
    anything, the run was never forgotten, and with it holding the one slot no queued job ever started again."""
    supervisor.max_concurrent = 1
    run = submit(supervisor, "deleted-1", "cnn")
    queue(supervisor, "behind-it")
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as db, db:
        db.execute("DELETE FROM jobs WHERE id = 'deleted-1'")
    supervisor.runs[run.id].process.wait()
    supervisor.tick()
    assert "deleted-1" not in supervisor.runs
    assert supervisor.store.get_job("behind-it").state == "running"


def test_a_pause_accepted_before_the_server_stops_ends_paused(supervisor):
    job = submit(supervisor, "user-paused")
    time.sleep(0.3)
    supervisor.request_stop(job, "paused")
    supervisor.shutdown(timeout=20)
    ended = supervisor.store.get_job(job.id)
    assert (ended.state, ended.resume, ended.exit_code) == ("paused", True, 4)    # not queued to run again


def test_the_shutdown_pause_of_a_job_that_stops_after_the_shutdown_is_kept_to_resume(supervisor):
    job = submit(supervisor, "slow-to-pause")
    time.sleep(0.3)
    supervisor.shutdown(timeout=0.05)                     # it takes 0.5 s to pause: still running
    assert supervisor.store.get_job(job.id).state == "running"
    adopting = restarted(supervisor, max_concurrent=0)    # adopts it; starts nothing
    assert job.id in adopting.runs
    deadline = time.monotonic() + 20
    while job.id in adopting.runs and time.monotonic() < deadline:
        adopting.tick()
        time.sleep(0.05)
    ended = supervisor.store.get_job(job.id)
    # Queued to resume, as a resume queues it: the run's outcome (a pause's exit code 4) is not the job's; it
    # stayed, and a job then cancelled while it waited showed exit code 4.
    assert (ended.state, ended.resume, ended.requested, ended.exit_code) == ("queued", True, None, None)


@pytest.mark.parametrize("outcome, state, resume, code", [("paused", "paused", True, 4),
                                                          ("cancelled", "cancelled", False, 3)])
def test_a_users_stop_during_the_servers_shutdown_pause_of_an_adopted_job_ends_it_as_the_user_asked(
        supervisor, tmp_path, outcome, state, resume, code):
    """No test held the job control table's shutdown-pause row: a user's pause of a job whose shutdown pause is
    under way (adopted after the restart) must end it paused as theirs, with no second signal, never queued to
    resume at the next start; a user's cancel must win over the shutdown's pause."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    job = submit(supervisor, f"shutdown-then-{outcome}")
    time.sleep(0.3)                                     # its handlers are installed
    pid = supervisor.runs[job.id].pid
    supervisor.shutdown(timeout=0.05)
    deadline = time.monotonic() + 10
    while signal.SIGUSR1 in pending_signals(pid):       # the shutdown's pause reaches the run
        assert time.monotonic() < deadline, "the run never took the shutdown's pause"
        time.sleep(0.01)
    # Frozen (within the 0.5 s it takes to pause), the run cannot end before the user's stop; a second signal
    # sent meanwhile waits for it, and is counted.
    os.kill(pid, signal.SIGSTOP)
    try:
        adopting = restarted(supervisor, max_concurrent=0)
        assert adopting.store.get_job(job.id).requested == "shutdown"
        service = JobService(ServerSettings(data_dir=tmp_path), adopting.store, adopting)
        status, view = service.stop(None, job.id, outcome)
        assert (status, view["state"], view["stop_requested"]) == (202, "running", outcome)
    finally:
        os.kill(pid, signal.SIGCONT)
    ended = settle(adopting, job.id)
    assert (ended.state, ended.resume, ended.exit_code, ended.requested, ended.error) == (state, resume, code, None,
                                                                                         None)
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == (1 if outcome == "paused" else 2)
    restarted(supervisor).tick()                        # the next start runs no job the user stopped
    assert supervisor.store.get_job(job.id).state == state


@pytest.mark.parametrize("outcome", ["paused", "cancelled"])
def test_a_stop_accepted_before_the_server_and_the_job_crashed_stands_after_the_restart(supervisor, outcome):
    job = submit(supervisor, f"crashed-{outcome}")
    time.sleep(0.3)
    supervisor.checkpoint_dir(job.id).joinpath("step-000000010.pt").write_bytes(b"weights")
    supervisor.store.set_endpoint(job.id, 0, "127.0.0.1:9999", "http")
    supervisor.request_stop(job, outcome)
    crash(supervisor, job.id)                             # before it wrote a result
    assert not supervisor.result_path(job.id).exists()
    again = restarted(supervisor)
    again.tick()
    ended = supervisor.store.get_job(job.id)
    assert (ended.state, ended.resume, ended.requested) == (outcome, outcome == "paused", None)
    assert job.id not in again.runs and supervisor.store.endpoints() == []


@pytest.mark.parametrize("outcome", ["paused", "cancelled"])
def test_a_run_lost_after_an_accepted_stop_ends_in_that_stop(supervisor, outcome):
    """Ray's head lost after a 202: the run ended with neither a result nor an exit code, and the job failed
    ("adopted after a server restart, or its Ray submission stopped or lost") though its stop was promised."""
    job = submit(supervisor, f"lost-{outcome}", model="transformer")     # it never writes a result
    time.sleep(0.3)
    supervisor.request_stop(job, outcome)
    run = supervisor.runs.pop(job.id)
    run.process.kill()
    run.process.wait()
    supervisor._ended(job.id, None)             # what a Ray run lost with its head reports
    ended = supervisor.store.get_job(job.id)
    assert (ended.state, ended.resume, ended.error, ended.requested) == (outcome, outcome == "paused", None, None)


@pytest.mark.parametrize("outcome, workers", [("paused", "after the restart"), ("cancelled", "while it was down"),
                                               ("paused", "before the stop")])
def test_a_stop_accepted_before_the_workers_started_reaches_them_after_a_server_crash(tmp_path, outcome, workers):
    """A pause accepted (202) while torchrun had not started its workers yet was held in the server's memory, to
    be sent once they exist; the server killed -9 then, the restart adopted the job without it, and it trained on
    (a second pause was "already under way"). Whether the workers start after the restart or while the server is
    down, the held stop reaches them, once; a stop they got before the crash is not sent again."""
    from trainmetrics.jobserver.local import kill_processes, run_processes

    store = JobStore(tmp_path / "db.sqlite")
    first = Supervisor(store, tmp_path, None, max_concurrent=1, executor=LaunchingExecutor())
    queue(first, "held", nproc=2)
    first.tick()
    run = first.runs["held"]
    try:
        if workers == "before the stop":        # the stop goes to the workers themselves
            time.sleep(1.8)
        first.request_stop(store.get_job("held"), outcome)
        assert (run.undelivered is None) == (workers == "before the stop")
        if workers == "while it was down":
            time.sleep(1.8)
        again = Supervisor(store, tmp_path, None, max_concurrent=1, executor=LaunchingExecutor())
        again.recover()                         # the server killed -9 and restarted: `first` is gone, unpolled
        assert "held" in again.runs
        ended = tick_until(again, "held", 15)
        assert (ended.state, ended.requested) == (outcome, None)
        assert json.loads(again.result_path("held").read_text())["signals"] == 1
    finally:
        kill_processes(run_processes(run))
        run.process.wait()
        store.close()


@pytest.mark.parametrize("end_time", ["its own", "in the future", "before its start", "NaN", "yesterday", None])
def test_a_run_that_ended_while_the_server_was_down_ends_when_its_result_says(supervisor, end_time):
    """Its end was the restart's time, hours late after a long outage, though its result says when it ended; an end
    the result cannot have right (not a number, in the future, before the job started) is not taken."""
    job = submit(supervisor, "ended-while-down", "cnn")        # "completes" after ~0.5 s
    supervisor.runs.pop(job.id).process.wait(timeout=10)        # the server is down: nobody reaps it
    path = supervisor.result_path(job.id)
    result = json.loads(path.read_text())
    told = result["end_time"]
    if end_time != "its own":
        wrong = {"in the future": time.time() + 3600, "before its start": job.started - 60}.get(end_time, end_time)
        path.write_text(json.dumps({**result, "end_time": wrong}).replace('"NaN"', "NaN"))
    time.sleep(1)
    back = time.time()
    restarted(supervisor)
    ended = supervisor.store.get_job(job.id)
    assert ended.state == "completed"
    if end_time == "its own":
        assert ended.ended == told < back
    else:
        assert back <= ended.ended <= time.time()


@pytest.mark.parametrize("state", ["completed", "failed", "cancelled", "paused"])
def test_a_job_ended_or_paused_is_no_discovery_target_though_its_endpoint_was_never_forgotten(supervisor, state):
    """A job's end is written before its endpoints are forgotten: a server killed between the two listed the ended
    job in /api/training/sd for good (the restart looks at running jobs only), for Prometheus to scrape and fail."""
    job = submit(supervisor, f"left-{state}")
    supervisor.store.set_endpoint(job.id, 0, "127.0.0.1:9999", "http")
    assert [row[0] for row in supervisor.store.endpoints()] == [job.id]
    supervisor.store.update_job(job.id, state=state)
    assert supervisor.store.endpoints() == []


def test_a_job_gone_with_the_server_before_its_first_checkpoint_fails_and_leaves_the_discovery(supervisor):
    job = submit(supervisor, "gone-early")
    supervisor.store.set_endpoint(job.id, 0, "127.0.0.1:9999", "http")
    crash(supervisor, job.id)
    restarted(supervisor)
    assert supervisor.store.get_job(job.id).state == "failed"
    assert supervisor.store.endpoints() == []


def test_a_job_gone_with_the_server_whose_checkpoint_directory_is_too_full_to_read_through_resumes(supervisor):
    """The restart read the job's whole checkpoint directory on the state thread, which a job's process can fill
    (every owner's requests waited). Read up to a bound now, its checkpoints may lie past it: such a directory
    counts as holding one (the job failed "before its first checkpoint"), queued to resume, and its run looks."""
    job = submit(supervisor, "too-full")
    for index in range(MAX_LISTED_ENTRIES + 100):
        os.close(os.open(supervisor.checkpoint_dir(job.id) / f"junk-{index}", os.O_WRONLY | os.O_CREAT, 0o644))
    crash(supervisor, job.id)
    restarted(supervisor, max_concurrent=0)
    ended = supervisor.store.get_job(job.id)
    assert (ended.state, ended.resume) == ("queued", True)


@pytest.mark.parametrize("outcome", ["paused", "cancelled"])
def test_a_repeated_stop_sends_no_second_signal(supervisor, outcome):
    job = submit(supervisor, f"twice-{outcome}")
    time.sleep(0.3)
    supervisor.request_stop(job, outcome)
    supervisor.request_stop(supervisor.store.get_job(job.id), outcome)      # accepted: no change
    assert settle(supervisor, job.id).state == outcome
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def unsent_stop(supervisor: Supervisor, job: JobRecord, outcome: str) -> None:
    """A stop whose signal found the disk full, and so did the undo of its record: recorded, never sent."""
    send, update, before = supervisor.executor.signal, supervisor.store.update_job, job.requested

    def full_disk(run, outcome):
        raise OSError(28, "No space left on device")

    def undo_fails(job_id, **fields):
        if fields.get("requested", "") == before:
            raise sqlite3.OperationalError("database or disk is full")
        return update(job_id, **fields)

    supervisor.executor.signal, supervisor.store.update_job = full_disk, undo_fails
    try:
        with pytest.raises(sqlite3.OperationalError):
            supervisor.request_stop(job, outcome)
    finally:
        supervisor.executor.signal, supervisor.store.update_job = send, update
    assert supervisor.store.get_job(job.id).requested == outcome


@pytest.mark.parametrize("retried", [False, True])
def test_a_pause_under_way_ends_paused_after_a_cancel_that_was_never_sent(supervisor, retried):
    """A cancel after a pause was recorded and never sent (the disk full for its signal and its undo): the job,
    paused, was recorded cancelled, never to resume (the unsent cancel's record taken for an accepted one), and the
    pause's retry was answered 202 as the stop under way, its `stop_requested` the cancel."""
    job = submit(supervisor, f"unsent-cancel-{int(retried)}")
    time.sleep(0.3)                                     # its handlers are installed
    supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    unsent_stop(supervisor, supervisor.store.get_job(job.id), "cancelled")
    if retried:
        supervisor.request_stop(supervisor.store.get_job(job.id), "paused")       # 202: under way
        assert supervisor.store.get_job(job.id).requested == "paused"             # as its answer says
    ended = settle(supervisor, job.id)
    assert (ended.state, ended.resume, ended.exit_code) == ("paused", True, 4)
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_the_shutdown_pauses_a_job_whose_pause_was_never_sent(supervisor):
    """The server's shutdown pauses every running job, but one whose stop was recorded and never sent: taken for a
    user's stop under way, it was left training, and adopted at the next start with that stop still recorded (its
    retry then answered 202 with nothing sent, and an unsent cancel's grace killed it)."""
    job = submit(supervisor, "unsent-shutdown")
    time.sleep(0.3)                                     # its handlers are installed
    unsent_stop(supervisor, supervisor.store.get_job(job.id), "paused")
    supervisor.shutdown(timeout=5)
    ended = supervisor.store.get_job(job.id)
    assert (ended.state, ended.resume) == ("queued", True), ended      # paused by the shutdown, to resume


@pytest.mark.parametrize("outcome", ["paused", "cancelled"])
def test_a_stop_never_sent_is_sent_by_its_retry_after_a_server_crash(supervisor, outcome):
    """A stop recorded and never sent (the disk full for its signal and its undo) was kept unsent in memory only:
    after a crash of the server (its job left training) the next server adopted the job with the stop read as under
    way, and answered the client's retry 202 with nothing sent; the job trained on."""
    job = submit(supervisor, f"unsent-crash-{outcome}")
    time.sleep(0.3)                                     # its handlers are installed
    unsent_stop(supervisor, supervisor.store.get_job(job.id), outcome)
    again = restarted(supervisor)                       # the server killed: nothing of it but the store
    assert again.store.get_job(job.id).requested is None        # taken back: it was never sent
    again.request_stop(again.store.get_job(job.id), outcome)   # the client's retry
    ended = settle(again, job.id, timeout=10)
    assert ended.state == outcome
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_a_pause_under_way_ends_paused_after_an_unsent_cancel_and_a_server_crash(supervisor):
    """A pause went out, a cancel after it was recorded and never sent (the disk full for its signal and its undo),
    then the server crashed: the next server took the cancel's record for an accepted one, and the paused job ended
    cancelled, never to resume."""
    job = submit(supervisor, "unsent-cancel-crash")
    time.sleep(0.3)                                     # its handlers are installed
    supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    unsent_stop(supervisor, supervisor.store.get_job(job.id), "cancelled")
    again = restarted(supervisor)
    assert again.store.get_job(job.id).requested == "paused"
    ended = settle(again, job.id)
    assert (ended.state, ended.resume, ended.exit_code) == ("paused", True, 4)
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_an_unsent_stop_whose_mark_cannot_be_taken_back_at_the_restart_stays_unsent(supervisor):
    """The disk still full at the restart: the record of the stop never sent keeps its mark, and the retry sends it."""
    job = submit(supervisor, "unsent-still-full")
    time.sleep(0.3)                                     # its handlers are installed
    unsent_stop(supervisor, supervisor.store.get_job(job.id), "paused")
    update = supervisor.store.update_job

    def full(job_id, **fields):
        raise sqlite3.OperationalError("database or disk is full")

    supervisor.store.update_job = full
    try:
        again = restarted(supervisor)
    finally:
        supervisor.store.update_job = update
    assert again.store.get_job(job.id).requested == "paused"          # recorded, marked unsent
    again.request_stop(again.store.get_job(job.id), "paused")
    assert settle(again, job.id, timeout=10).state == "paused"
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_a_stop_sent_whose_mark_could_not_be_cleared_is_not_sent_twice(supervisor):
    """The stop went out, and the write noting that failed (the disk full since its record): the request is
    accepted, a retry sends nothing more, and the next tick notes it."""
    job = submit(supervisor, "sent-unmarked")
    time.sleep(0.3)                                     # its handlers are installed
    update = supervisor.store.update_job

    def clearing_fails(job_id, **fields):
        if set(fields) == {"stop_unsent"}:
            raise sqlite3.OperationalError("database or disk is full")
        return update(job_id, **fields)

    supervisor.store.update_job = clearing_fails
    try:
        supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
        supervisor.request_stop(supervisor.store.get_job(job.id), "paused")      # accepted: under way
        assert supervisor.store.get_job(job.id).stop_unsent == ""
    finally:
        supervisor.store.update_job = update
    supervisor.tick()
    assert supervisor.store.get_job(job.id).stop_unsent is None
    assert settle(supervisor, job.id).state == "paused"
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_a_job_killed_by_a_signal_without_a_name_ends_failed(supervisor):
    """A real-time signal (SIGRTMIN + 1) has no signal.Signals member: naming it raised ValueError after the run
    was forgotten, and the job stayed `running` with nothing behind it, neither cancellable nor resumable."""
    submit(supervisor, "realtime", "transformer")
    run = supervisor.runs["realtime"]
    signum = signal.SIGRTMIN + 1
    run.process.send_signal(signum)
    run.process.wait(timeout=10)
    ended = settle(supervisor, "realtime")
    assert (ended.state, ended.error) == ("failed", f"killed by signal {int(signum)} without a result")


def test_a_local_run_killed_from_outside_with_sigkill_keeps_exit_code_minus_9(supervisor):
    """Only the Ray tests held that a failure without a result keeps its process's code: a local run killed with
    SIGKILL must end `failed` with exit code -9, not its state's 1 or none."""
    job = submit(supervisor, "sigkilled", "transformer")      # sleeps until a signal, and writes no result
    os.kill(supervisor.runs[job.id].pid, signal.SIGKILL)
    ended = settle(supervisor, job.id)
    assert (ended.state, ended.exit_code, ended.error) == ("failed", -9, "killed by SIGKILL without a result")


def test_the_exit_code_is_the_results_when_a_signal_killed_the_process_after_it(supervisor):
    job = submit(supervisor, "killed-on-its-way-out", model="late-kill")
    time.sleep(0.3)
    supervisor.request_stop(job, "paused")
    ended = settle(supervisor, job.id)
    assert (ended.state, ended.exit_code, ended.error) == ("paused", 4, None)


def test_a_data_dir_from_before_upload_targets_opens_and_its_csvs_keep_the_default_target(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "old.db") as db:       # the datasets table as it was, with one upload
        db.execute("CREATE TABLE datasets (id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, path TEXT "
                   "NOT NULL, format TEXT NOT NULL, rows INTEGER NOT NULL, features INTEGER NOT NULL, size_bytes "
                   "INTEGER NOT NULL, upload_seconds REAL NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO datasets VALUES ('ds-1', 'default', 'a.csv', 'd/ds-1.csv', 'csv', 2, 1, 9, 0.1, 1.0)")
    store = JobStore(tmp_path / "old.db")
    try:
        assert store.get_dataset("ds-1", "default").public()["target"] == "label"
    finally:
        store.close()


def keeper_of(store: JobStore, compute):
    """A ReportKeeper over `store` whose analytics are `compute` (a stand-in for them), its store calls inline."""
    from trainmetrics.jobserver import reports
    from trainmetrics.reports import ReportArchive

    async def call(operation, *args):
        return operation(*args)

    return reports.ReportKeeper(ReportArchive(compute=compute), call, store, reports.UpTime(store))


def scripted_analytics(answers: list) -> tuple[list[bool], object]:
    """(asked, compute): compute answers each call with the next of `answers` (raised where it is an exception),
    and notes in `asked` whether it was asked for a settled job."""
    asked = []

    async def compute(job_id, settled=True, owner=None):
        asked.append(settled)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return asked, compute


def test_a_report_waits_for_the_job_to_settle_then_is_stored_as_it_stands(tmp_path, monkeypatch):
    """The keeper's reading of the analytics' answers (a stand-in for them): not settled yet (an exporter still
    attributes the job) is asked again soon, not given up; after the limit the report is stored as it stands."""
    import asyncio
    import json as json_module

    from trainmetrics.jobserver import reports
    from trainmetrics.reports import NotSettled

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="ended-1", owner="default", name="ended-1", state="completed", spec={},
                            ended=time.time() - 10))
    asked = []

    async def compute(job_id, settled=True, owner=None):
        asked.append(settled)
        if settled:
            raise NotSettled(job_id)
        return {"job_id": job_id}

    keeper = keeper_of(store, compute)
    monkeypatch.setattr(reports, "SETTLE_RETRY_SECONDS", 0.0)
    asyncio.run(keeper.round())
    assert asked == [True] and store.get_report("ended-1") is None
    # Resumed (no longer waiting for a report), then ended again much later: its wait starts afresh (the old
    # clock made the next end's report be stored at once, unsettled).
    store.update_job("ended-1", state="running", ended=None)
    asyncio.run(keeper.round())
    store.update_job("ended-1", state="completed", ended=time.time() - 10)
    monkeypatch.setattr(reports, "UNSETTLED_LIMIT_SECONDS", 0.001)
    time.sleep(0.01)
    asyncio.run(keeper.round())
    assert asked == [True, True] and store.get_report("ended-1") is None
    monkeypatch.setattr(reports, "UNSETTLED_LIMIT_SECONDS", 0.0)
    asyncio.run(keeper.round())
    assert asked == [True, True, False]
    assert json_module.loads(store.get_report("ended-1")[1]) == {"job_id": "ended-1"}
    store.close()


def test_a_report_that_says_the_ended_job_goes_on_is_never_stored_and_a_failed_try_starts_no_clock(
        tmp_path, monkeypatch):
    """A job that completed while Prometheus was down: restarted, Prometheus showed its dead process as running
    for 5 minutes, and the report was stored `running`, its duration still growing, for good (the unsettled
    clock had started at a try that Prometheus failed)."""
    import asyncio

    from trainmetrics.jobserver import reports
    from trainmetrics.reports import NotSettled

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="ended-1", owner="default", name="ended-1", state="completed", spec={},
                            ended=time.time() - 10))
    answers = [ConnectionError("Prometheus is down"), NotSettled("ended-1"), {"job_id": "ended-1", "status": "running"},
               {"job_id": "ended-1", "status": "vanished"}]
    asked, compute = scripted_analytics(answers)
    keeper = keeper_of(store, compute)
    for name in ("SETTLE_RETRY_SECONDS", "RETRY_SECONDS"):
        monkeypatch.setattr(reports, name, 0.0)
    monkeypatch.setattr(reports, "UNSETTLED_LIMIT_SECONDS", 0.05)
    asyncio.run(keeper.round())             # Prometheus down: no clock started
    time.sleep(0.1)
    asyncio.run(keeper.round())             # not settled: the clock starts now
    assert asked == [True, True]
    time.sleep(0.1)
    asyncio.run(keeper.round())             # past the limit: as it stands, and it says running
    assert asked == [True, True, False] and store.get_report("ended-1") is None
    asyncio.run(keeper.round())
    assert '"vanished"' in store.get_report("ended-1")[1]
    store.close()


def test_a_failed_try_between_two_not_settled_answers_starts_the_wait_afresh(tmp_path, monkeypatch):
    """The wait for a job to settle ran on while Prometheus was down: a job first not settled (an exporter's last
    energy counts not in), then Prometheus down past the 2-minute limit, was stored as it stood at the first answer
    after, its energy short for good. Only answers that say "not settled" in a row count."""
    import asyncio

    from trainmetrics.jobserver import reports
    from trainmetrics.reports import NotSettled

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="ended-1", owner="default", name="ended-1", state="completed", spec={},
                            ended=time.time() - 10))
    answers = [NotSettled("ended-1"), ConnectionError("Prometheus is down"), NotSettled("ended-1")]
    asked, compute = scripted_analytics(answers)
    keeper = keeper_of(store, compute)
    for name in ("SETTLE_RETRY_SECONDS", "RETRY_SECONDS"):
        monkeypatch.setattr(reports, name, 0.0)
    monkeypatch.setattr(reports, "UNSETTLED_LIMIT_SECONDS", 0.05)
    asyncio.run(keeper.round())             # not settled: the clock starts
    asyncio.run(keeper.round())             # Prometheus down
    time.sleep(0.1)                         # (past the limit while it is down)
    asyncio.run(keeper.round())             # back, and still not settled: asked as settled, not as it stands
    assert asked == [True, True, True] and store.get_report("ended-1") is None
    store.close()


def test_the_keeper_forgets_the_retries_of_jobs_no_longer_waiting_for_a_report(tmp_path):
    """Every job that ever failed a try (Prometheus down) kept its retry time for the server's life, and a job
    resumed after one waited that retry out at its next end (its report asked up to 30 s late)."""
    import asyncio

    from trainmetrics.jobserver import reports

    store = JobStore(tmp_path / "db.sqlite")
    for job_id in ("resumed-1", "given-up-1"):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="failed", spec={},
                                ended=time.time() - 10))
    asked, down = [], [True]

    async def compute(job_id, settled=True, owner=None):
        asked.append(job_id)
        if down[0]:
            raise ConnectionError("Prometheus is down")
        return {"job_id": job_id, "status": store.get_job(job_id).state}       # as the job API says

    keeper = keeper_of(store, compute)
    asyncio.run(keeper.round())
    assert sorted(asked) == ["given-up-1", "resumed-1"] and len(keeper._retry_at) == 2
    store.update_job("resumed-1", state="queued", resume=True, ended=None)
    store.update_job("given-up-1", ended=time.time() - reports.GIVE_UP_SECONDS - 60)
    asyncio.run(keeper.round())
    assert keeper._retry_at == {}                   # neither waits for a report any more
    store.update_job("resumed-1", state="completed", ended=time.time() - 10)     # its next run ended
    down[0], asked[:] = False, []
    asyncio.run(keeper.round())
    assert asked == ["resumed-1"] and store.get_report("resumed-1") is not None     # asked at once
    store.close()


def test_a_job_resumed_and_ended_again_between_two_rounds_waits_afresh_for_its_new_end(tmp_path, monkeypatch):
    """The keeper's clocks were the job's, not its end's: a failed job whose report waited to settle, resumed and
    cancelled while queued before the next round (a round waits on a slow Prometheus), kept the old wait, past its
    limit, so the cancel's report was stored at once as it stood: `failed`, the server's `cancelled` not in yet,
    for good. Each end waits afresh."""
    import asyncio

    from trainmetrics.jobserver import reports
    from trainmetrics.reports import NotSettled

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="again-1", owner="default", name="again-1", state="failed", spec={},
                            ended=time.time() - 20))
    asked = []

    async def compute(job_id, settled=True, owner=None):
        asked.append(settled)
        if settled:
            raise NotSettled(job_id)
        return {"job_id": job_id, "status": "failed"}       # the server's cancel not scraped yet

    keeper = keeper_of(store, compute)
    monkeypatch.setattr(reports, "SETTLE_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(reports, "UNSETTLED_LIMIT_SECONDS", 0.05)
    asyncio.run(keeper.round())             # not settled: the failed end's wait starts
    time.sleep(0.1)
    store.update_job("again-1", state="queued", resume=True, ended=None, report=None)     # resumed,
    store.update_job("again-1", state="cancelled", ended=time.time() - 10)                # cancelled while queued
    asyncio.run(keeper.round())
    assert asked == [True, True] and store.get_report("again-1") is None
    store.close()


def test_a_report_computed_while_its_job_was_resumed_is_not_kept(tmp_path):
    """A resume while the job's report was computed (the server's state thread goes on while the keeper awaits
    Prometheus): the ended run's report was stored over the resume's drop, and never replaced after the next run
    ended (the job had a report): a job Prometheus no longer held was that old run for good."""
    import asyncio

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="resumed-1", owner="default", name="resumed-1", state="failed", spec={},
                            ended=time.time() - 10))

    async def compute(job_id, settled=True, owner=None):
        store.update_job(job_id, state="queued", resume=True, ended=None, error=None, report=None)    # resumed
        return {"job_id": job_id, "status": "failed"}

    asyncio.run(keeper_of(store, compute).round())
    assert store.get_report("resumed-1") is None and store.get_job("resumed-1").state == "queued"
    store.update_job("resumed-1", state="completed", ended=time.time() - 10)         # its next run ended
    assert store.jobs_to_report(("completed",), 0, time.time()) == [("resumed-1", store.get_job("resumed-1").ended,
                                                                      "completed", "default")]
    store.close()


def test_a_report_that_does_not_say_the_end_the_job_api_says_waits_for_the_servers_word(tmp_path, monkeypatch):
    """A run killed -9: the job API says `failed`, and the server publishes that end on its /metrics (its process
    could not). 5 s after the end the killed process was no longer scraped, so the job was settled, but a server
    that Prometheus scrapes less often (every 20 s, checked with a real server and Prometheus) had not had that
    end read yet: the analytics said `vanished`, and the report was stored so for good. It waits for the server's
    word now; past the keeper's limit (a Prometheus that never scrapes the server) it is stored as it stands."""
    import asyncio

    from trainmetrics.jobserver import reports

    store = JobStore(tmp_path / "db.sqlite")
    for job_id in ("killed-1", "unheard-1"):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="failed", spec={},
                                ended=time.time() - 10))
    said = {"killed-1": ["vanished", "failed"], "unheard-1": ["vanished"] * 3}
    asked = []

    async def compute(job_id, settled=True, owner=None):
        asked.append((job_id, settled))
        return {"job_id": job_id, "status": said[job_id].pop(0)}

    keeper = keeper_of(store, compute)
    monkeypatch.setattr(reports, "SETTLE_RETRY_SECONDS", 0.0)
    asyncio.run(keeper.round())
    assert store.get_report("killed-1") is None and store.get_report("unheard-1") is None
    asyncio.run(keeper.round())             # the server's end is in for killed-1
    assert '"failed"' in store.get_report("killed-1")[1] and store.get_report("unheard-1") is None
    monkeypatch.setattr(reports, "UNSETTLED_LIMIT_SECONDS", 0.0)      # unheard-1 waited its limit out
    asyncio.run(keeper.round())
    assert '"vanished"' in store.get_report("unheard-1")[1]
    assert asked == [("killed-1", True), ("unheard-1", True), ("killed-1", True), ("unheard-1", True),
                     ("unheard-1", False)]
    store.close()


@pytest.mark.parametrize("text", ["[]", "{}", '{"job_id": "someone-else"}', "[" * 100_000 + "]" * 100_000],
                         ids=["list", "empty", "another-job", "nested"])
def test_a_stored_report_that_is_not_this_jobs_is_ignored(text, tmp_path):
    """A stored report edited by hand (or another job's): `[]` and `{}` answered 200 with every field null, a
    deep nesting 500 (RecursionError). Such a report is ignored, as one that is not JSON already was."""
    import asyncio

    from trainmetrics.jobserver import reports

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="bad-1", owner="default", name="bad-1", state="completed", spec={}, ended=1.0))
    assert store.keep_report("bad-1", text, 1.0)

    async def call(operation, *args):
        return operation(*args)

    assert asyncio.run(reports.ReportKeeper(None, call, store, reports.UpTime(store)).load("bad-1")) is None
    store.close()


def test_a_stored_reports_fields_of_the_wrong_type_read_back_as_null():
    """A number field holding a string, a list holding a number: read back as they were, they failed later
    (a comparison's arithmetic: 500). (A list or map of the wrong type reads as empty: the schema's array or
    object.)"""
    from trainmetrics.analytics.shapes import JobAnalytics, from_plain

    analytics = from_plain(JobAnalytics, {"job_id": "j", "status": 3, "performance": {"total_samples": "lots",
                                          "average_samples_per_second": 12.5}, "evaluations": 7,
                                          "goodput": {"goodput_ratio": True, "seconds": {"step": 2.0}}})
    assert analytics.job_id == "j" and analytics.status is None and analytics.evaluations == []
    assert analytics.performance.total_samples is None and analytics.performance.average_samples_per_second == 12.5
    assert analytics.goodput.goodput_ratio is None and analytics.goodput.seconds == {"step": 2.0}


def test_a_stored_report_whose_bytes_are_not_utf8_fails_no_read_of_the_jobs(tmp_path):
    """A report row cut inside a character (a damaged file, a hand edit): every read of the jobs selected the report
    column too, and sqlite3 raised "Could not decode to UTF-8" for it, so the job API, its list and the supervisor's
    tick failed, not the report alone. The jobs read without it, and the report reads as far as it is one."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    service = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 1))
    for job_id in ("cut-1", "other-1"):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="completed", spec={}, ended=1.0))
    cut = '{"job_id": "cut-1", "job_name": "caf\u00e9"}'.encode()[:-3]      # cut after the first byte of the é
    store._execute("UPDATE jobs SET report = CAST(? AS TEXT) WHERE id = 'cut-1'", (cut,))
    assert [job.id for job in store.list_jobs()] == ["cut-1", "other-1"]
    assert store.get_job("cut-1").state == "completed"
    assert service.get(None, "cut-1")["report_stored"] is False
    assert store.get_report("cut-1") == ("default", '{"job_id": "cut-1", "job_name": "caf\ufffd')
    store.close()


@pytest.mark.parametrize("spec", ["{not json", "[]", "[" * 100_000], ids=["not-json", "list", "nested"])
def test_a_job_whose_stored_spec_is_unreadable_fails_alone(spec, tmp_path):
    """A job row whose spec is not a JSON object (edited by hand, a damaged file) raised in every listing and in
    the supervisor's tick: no queued job started again, every submit answered 500, across restarts. That job
    alone fails now; the one queued behind it starts."""
    store = JobStore(tmp_path / "db.sqlite")
    for job_id in ("broken", "fine"):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    store._execute("UPDATE jobs SET spec = ? WHERE id = ?", (spec, "broken"))
    started = []

    class Recording(LocalExecutor):
        def start(self, job_id, nproc, train_args, job_dir, env):
            started.append(job_id)
            return Run(job_id, "1", job_dir)

        def poll(self, run):
            return False, None

    supervisor = Supervisor(store, tmp_path, None, max_concurrent=2, executor=Recording())
    supervisor.tick()
    jobs = {job.id: job for job in store.list_jobs()}
    assert jobs["broken"].state == "failed" and "stored spec is not a JSON object" in jobs["broken"].error
    assert jobs["broken"].spec == {} and started == ["fine"]
    store.close()


class Ending(LocalExecutor):
    """Starts nothing; every run has ended with exit code 1 (the results written by the test tell the rest)."""

    def start(self, job_id, nproc, train_args, job_dir, env):
        return Run(job_id, "1", job_dir)

    def poll(self, run):
        return True, 1


def odd_job_and_one_behind(tmp_path, nproc: int) -> tuple[JobStore, Supervisor]:
    """A supervisor with one slot whose runs end at once (Ending), job `odd` (of `nproc` ranks) started and job
    `behind` queued after it: the test writes odd's result, and the next tick must record its end."""
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    for job_id in ("odd", "behind"):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": nproc}))
    supervisor.tick()
    return store, supervisor


@pytest.mark.parametrize("killed_rank", [1, 0])
def test_a_failed_multi_rank_job_names_the_rank_that_died(killed_rank, tmp_path):
    """A rank killed (-9, the OOM killer) writes nothing; the others then fail in the all-reduce ("connection
    reset by peer"). The job's error was rank 0's gloo message alone, naming no rank, and with rank 0 killed the
    survivor's error was lost: only torchrun's output in train.log said which rank died."""
    from trainmetrics.jobfiles import rank_result_path, write_result

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="two", owner="default", name="two", state="queued",
                            spec={"model": "mlp", "dataset": "blobs", "nproc": 2}))

    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    supervisor.start(store.get_job("two"))
    survivor = 1 - killed_rank
    said = {"state": "failed", "exit_code": 1, "error_type": "DistBackendError",     # as a trainer writes it
            "error": "DistBackendError: Connection reset by peer"}
    path = supervisor.result_path("two")
    write_result(path if survivor == 0 else rank_result_path(path, survivor), said)
    supervisor.tick()
    job = store.get_job("two")
    assert job.state == "failed"
    # The error's type once ("rank 1: DistBackendError: DistBackendError: ..." was said).
    expected = {1: "rank 1 ended without a result (killed or lost: see train.log); rank 0: DistBackendError: "
                   "Connection reset by peer",
                0: "rank 0 ended without a result (killed or lost: see train.log); rank 1: DistBackendError: "
                   "Connection reset by peer; exit code 1 without a result"}
    assert job.error == expected[killed_rank]
    supervisor.start(store.get_job("two"))        # a resume: the earlier run's rank results are gone
    assert not rank_result_path(path, 1).exists() and not path.exists()
    store.close()


def test_a_failed_multi_rank_job_names_the_rank_that_failed_first(tmp_path):
    """Rank 1 fails (its own error, the cause) and ends; rank 0, waiting for it in the all-reduce, then fails
    with the consequence ("Connection closed by peer"). The job's error was rank 0's alone: the cause, in rank
    1's result, was named only when rank 0 left none. Ranks that failed alike, or rank 0 first, say it once."""
    from trainmetrics.jobfiles import rank_result_path, write_result

    store = JobStore(tmp_path / "db.sqlite")

    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    cause = {"state": "failed", "exit_code": 1, "error_type": "ValueError", "error": "ValueError: bad batch"}
    closed = {"state": "failed", "exit_code": 1, "error_type": "DistBackendError",
              "error": "DistBackendError: Connection closed by peer"}
    cases = {   # job: rank 0's result, rank 1's, the job's error
        "cause-on-1": ({**closed, "end_time": 110.0}, {**cause, "end_time": 100.5},
                       "rank 1 failed first: ValueError: bad batch; "
                       "rank 0: DistBackendError: Connection closed by peer"),
        "cause-on-0": ({**cause, "end_time": 100.5}, {**closed, "end_time": 110.0}, "rank 0: ValueError: bad batch"),
        "alike": ({**cause, "end_time": 101.0}, {**cause, "end_time": 100.0}, "rank 0: ValueError: bad batch"),
        "no-order": (closed, {**cause, "end_time": 100.0}, "rank 0: DistBackendError: Connection closed by peer"),
    }
    for job_id, (rank0, rank1, _) in cases.items():
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 2}))
        supervisor.start(store.get_job(job_id))
        path = supervisor.result_path(job_id)
        write_result(path, rank0)
        write_result(rank_result_path(path, 1), rank1)
    supervisor.tick()
    assert {job_id: store.get_job(job_id).error for job_id in cases} == \
        {job_id: error for job_id, (_, _, error) in cases.items()}
    store.close()


@pytest.mark.parametrize("rank0, rank1, expected", [
    ({"state": "failed", "exit_code": 10**30, "error": "RuntimeError: boom"}, None,
     ("failed", 1, "RuntimeError: boom")),
    ({"state": "failed", "exit_code": 1, "error": {"message": "boom"}}, None, ("failed", 1, None)),
    ({"state": "paused", "exit_code": 4, "reason": ["loss spike"]}, None, ("paused", 4, None)),
    ({"state": "failed", "exit_code": 1, "error": "x" * 100_000}, None, ("failed", 1, "x" * 1000)),
    ({"state": "failed", "exit_code": 1, "error": "RuntimeError: closed", "end_time": 2.0},
     {"state": "failed", "exit_code": 1, "error": 5, "end_time": 1.0},
     ("failed", 1, "rank 1 failed first: failed; rank 0: RuntimeError: closed")),
    (None, {"state": "failed", "exit_code": 1, "error": ["boom"]},
     ("failed", 1, "rank 0 ended without a result (killed or lost: see train.log); rank 1: failed; "
                   "exit code 1 without a result")),
])
def test_a_result_with_a_field_of_the_wrong_type_ends_its_job_and_the_queue_goes_on(rank0, rank1, expected,
                                                                                    tmp_path):
    """A result edited by hand, or not a trainer's, with an exit code past SQLite's integers, an error that is no
    text, or one rank's error that is no text: recording the run's end raised at every tick, so the job stayed
    `running` for good and no queued job behind it started. (An error of any length was stored whole.)"""
    from trainmetrics.jobfiles import rank_result_path, write_result

    store, supervisor = odd_job_and_one_behind(tmp_path, 2 if rank1 else 1)
    path = supervisor.result_path("odd")
    for written, at in ((rank0, path), (rank1, rank_result_path(path, 1))):
        if written is not None:
            write_result(at, written)
    supervisor.tick()
    job = store.get_job("odd")
    assert (job.state, job.exit_code, job.error) == expected
    assert store.get_job("behind").state == "running"
    store.close()


@pytest.mark.parametrize("written, exited, expected", [
    ({"state": "completed", "exit_code": 1}, 1, ("completed", 0)),
    ({"state": "completed", "exit_code": True}, 1, ("completed", 0)),
    ({"state": "completed"}, 1, ("completed", 0)),
    ({"state": "paused", "exit_code": 0}, 0, ("paused", 4)),
    ({"state": "failed", "exit_code": "2"}, 2, ("failed", 2)),
    ({"state": "failed", "exit_code": 2}, 1, ("failed", 2)),
])
def test_the_exit_code_a_job_records_is_one_its_results_state_stands_for(written, exited, expected, tmp_path):
    """The result's state decides the job's; its exit code was taken as it was (any integer, `true` as 1), or the
    process's where the result had none: a job read `completed` with exit code 1, or `paused` with 0, against
    the exit codes docs/api.md gives each state."""
    from trainmetrics.jobfiles import write_result

    class EndingWith(Ending):
        def poll(self, run):
            return True, exited

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=EndingWith())
    store.add_job(JobRecord(id="told", owner="default", name="told", state="queued",
                            spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    supervisor.tick()
    write_result(supervisor.result_path("told"), written)
    supervisor.tick()
    job = store.get_job("told")
    assert (job.state, job.exit_code) == expected
    store.close()


def test_a_multi_rank_job_whose_rank_0_was_stopped_by_its_launcher_after_another_rank_failed_failed(tmp_path):
    """Rank 1 fails to start; torchrun stops rank 0 (SIGTERM), which was still waiting for the ranks to join, and
    rank 0 says `cancelled`. The job read as cancelled by its user, though nobody asked, and rank 1's failure went
    unsaid. A stop the server did send stands."""
    from trainmetrics.jobfiles import rank_result_path, write_result

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=2, executor=Ending())
    stopped = {"state": "cancelled", "exit_code": 3}
    failed = {"state": "failed", "exit_code": 1, "error_type": "ValueError", "error": "ValueError: bad start"}
    for job_id, requested in (("unasked", None), ("asked", "cancelled")):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 2}))
        supervisor.start(store.get_job(job_id))
        store.update_job(job_id, requested=requested)
        path = supervisor.result_path(job_id)
        write_result(path, stopped)
        write_result(rank_result_path(path, 1), failed)
    supervisor.tick()
    unasked, asked = store.get_job("unasked"), store.get_job("asked")
    assert (unasked.state, unasked.exit_code) == ("failed", 1)
    assert unasked.error == ("rank 1 failed first: ValueError: bad start; rank 0: cancelled by a stop the server "
                             "did not send (its launcher's, after another rank failed)")
    assert (asked.state, asked.error) == ("cancelled", None)
    store.close()


def test_the_server_publishes_the_end_only_of_jobs_no_process_ended(tmp_path):
    """A job the server ended without a process (cancelled while queued) is published with its end; one whose
    process ended it is not (a second, later end would move the job's end): a row from before the handle
    column has a pid only."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    now = time.time()
    store.add_job(JobRecord(id="cancelled-waiting", owner="default", name="a", state="cancelled", spec={},
                            ended=now))
    store.add_job(JobRecord(id="old-row", owner="default", name="b", state="completed", spec={}, pid=4321,
                            ended=now))
    store.add_job(JobRecord(id="ran", owner="default", name="c", state="completed", spec={}, pid=99,
                            handle="99", ended=now))
    store.add_job(JobRecord(id="long-ago", owner="default", name="d", state="cancelled", spec={}, ended=now - 3600))
    service = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 1))
    assert [(w.job.id, w.state, w.end) for w in service.waiting_jobs()] == \
        [("cancelled-waiting", "cancelled", now)]
    store.close()


def test_a_final_state_its_process_did_not_publish_is_published_by_the_server(supervisor):
    """A run killed without a result (failed), and a cancel that overrode the `paused` its process published:
    Prometheus had the process's `running` (or `paused`) as its last word while the job API said failed or
    cancelled. Now the server publishes those ends, and only those (a completed run published its own)."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    killed = submit(supervisor, "killed")
    time.sleep(0.3)
    supervisor.runs[killed.id].process.send_signal(signal.SIGKILL)
    overruled = submit(supervisor, "overruled")
    time.sleep(0.3)
    supervisor.request_stop(overruled, "paused")
    supervisor.request_stop(supervisor.store.get_job(overruled.id), "cancelled")
    completed = submit(supervisor, "completed", model="cnn")
    ended = {job.id: settle(supervisor, job.id) for job in (killed, overruled, completed)}
    assert {job_id: job.state for job_id, job in ended.items()} == \
        {"killed": "failed", "overruled": "cancelled", "completed": "completed"}
    service = JobService(ServerSettings(data_dir=supervisor.data_dir), supervisor.store, supervisor)
    published = {w.job.id: (w.state, w.end) for w in service.waiting_jobs()}
    assert published == {"killed": ("failed", ended["killed"].ended),
                         "overruled": ("cancelled", ended["overruled"].ended)}


def test_an_end_no_scraper_read_during_the_linger_is_published_by_the_server(tmp_path):
    """Prometheus down through a run's whole final linger: its process wrote its result, but no scraper read its
    `completed` (or `failed`). The server took the end as published: Prometheus kept the process's last `running`,
    and the stored report said `vanished` for good while the job API said completed. A result that says its end
    was read, or an older trainer's that says nothing, is published by its process alone."""
    from trainmetrics.contract import RESULT_PUBLISHED
    from trainmetrics.jobfiles import write_result
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=4, executor=Ending())
    results = {"unread": {"state": "completed", "exit_code": 0, RESULT_PUBLISHED: False},
               "unread-failed": {"state": "failed", "exit_code": 1, "error": "ValueError: x", RESULT_PUBLISHED: False},
               "read": {"state": "completed", "exit_code": 0, RESULT_PUBLISHED: True},
               "older-trainer": {"state": "completed", "exit_code": 0}}
    for job_id, result in results.items():
        queue(supervisor, job_id)
        supervisor.start(store.get_job(job_id))
        write_result(supervisor.result_path(job_id), result)
    supervisor.tick()
    ended = {job_id: store.get_job(job_id) for job_id in results}
    assert {job_id: job.state for job_id, job in ended.items()} == \
        {"unread": "completed", "unread-failed": "failed", "read": "completed", "older-trainer": "completed"}
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    assert {w.job.id: (w.state, w.end) for w in service.waiting_jobs()} == \
        {"unread": ("completed", ended["unread"].ended), "unread-failed": ("failed", ended["unread-failed"].ended)}
    store.close()


def test_a_resume_clears_the_previous_runs_outcome(tmp_path):
    """A resume cleared the previous run's `error` and `ended` but kept its `exit_code` and `reason` until the next
    start: a resumed job cancelled while it waited showed `cancelled` with the pause's exit code 4 and its
    "loss spike at step 85", or a failed run's exit code 1."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, 0)          # no room: a resumed job stays queued
    store.add_job(JobRecord(id="spiked", owner="default", name="spiked", state="paused", spec={}, exit_code=4,
                            resume=True))
    store.update_job("spiked", reason="loss spike at step 85", ended=time.time())
    store.add_job(JobRecord(id="crashed", owner="default", name="crashed", state="failed", spec={}, exit_code=1,
                            error="RuntimeError: boom", ended=time.time()))
    checkpoint = supervisor.checkpoint_dir("crashed") / "step-000000010.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"x")
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    for job_id in ("spiked", "crashed"):
        resumed = service.resume(None, job_id)
        assert (resumed["state"], resumed["exit_code"], resumed["error"], resumed["reason"], resumed["ended"]) == \
            ("queued", None, None, None, None)
        code, cancelled = service.stop(None, job_id, "cancelled")
        assert (code, cancelled["state"], cancelled["exit_code"], cancelled["reason"]) == (200, "cancelled", None, None)
    store.close()


def test_a_paused_job_cancelled_shows_no_exit_code_of_its_pause(tmp_path):
    """A paused job cancelled at once (200) kept its pause's exit code 4 under `cancelled`, an exit code that
    stands for another state (docs/api.md: 3 cancelled, 4 paused), as a resumed job cancelled while it waited did;
    no run of it ended cancelled, so it has none. Why its last run paused (`reason`) stays."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, 0)
    store.add_job(JobRecord(id="spiked", owner="default", name="spiked", state="paused", spec={}, exit_code=4))
    store.update_job("spiked", reason="loss spike at step 85")
    code, cancelled = JobService(ServerSettings(data_dir=tmp_path), store, supervisor).stop(None, "spiked",
                                                                                             "cancelled")
    assert (code, cancelled["state"], cancelled["exit_code"], cancelled["reason"], cancelled["stop_requested"]) == \
        (200, "cancelled", None, "loss spike at step 85", None)
    assert cancelled["ended"] is not None
    store.close()


def test_a_job_queued_again_to_resume_is_published_as_resuming(tmp_path):
    """A resumed job that waits for a slot is `queued` (as the job API says) from its first submission: the fleet's
    ledger, over a range starting after the resume, counted its wait as queued, where the job's own ledger counts
    it paused (it ran before). The server says it resumes."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    for job_id, state, resume in (("fresh", "queued", False), ("again", "queued", True), ("held", "paused", True)):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state=state, spec={}, resume=resume))
    service = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 0))
    assert {w.job.id: (w.state, w.resuming) for w in service.waiting_jobs()} == \
        {"fresh": ("queued", False), "again": ("queued", True), "held": ("paused", False)}
    store.close()


def test_the_server_says_which_of_its_ends_ended_a_wait_to_resume(supervisor):
    """A run killed without a result, the job resumed and cancelled while it waited: the server's end of the wait
    and its notice of the death before it were alike, and the analytics took the cancel for the notice (the job
    ended at the kill, and its wait to the cancel was in no phase). trainer_job_resuming tells them apart: 1 for the
    end of a wait to resume, 0 for the notice and for a job cancelled before it ever ran."""
    from types import SimpleNamespace

    from trainmetrics.contract import Trainer
    from trainmetrics.jobserver.app import WaitingJobsCollector
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    killed = submit(supervisor, "killed")
    time.sleep(0.3)
    supervisor.runs[killed.id].process.send_signal(signal.SIGKILL)
    assert settle(supervisor, killed.id).state == "failed"
    store = supervisor.store
    service = JobService(ServerSettings(data_dir=supervisor.data_dir), store,
                         Supervisor(store, supervisor.data_dir, None, 0))     # no room: a resumed job waits
    assert {w.job.id: (w.state, w.resuming) for w in service.waiting_jobs()} == {"killed": ("failed", False)}
    (supervisor.checkpoint_dir("killed") / "step-000000010.pt").write_bytes(b"x")
    service.resume(None, "killed")
    queue(supervisor, "never-ran")
    assert {w.job.id: (w.state, w.resuming) for w in service.waiting_jobs()} == \
        {"killed": ("queued", True), "never-ran": ("queued", False)}
    for job_id in ("killed", "never-ran"):
        assert service.stop(None, job_id, "cancelled")[0] == 200
    waiting = service.waiting_jobs()
    assert {w.job.id: (w.state, w.resuming) for w in waiting} == \
        {"killed": ("cancelled", True), "never-ran": ("cancelled", False)}
    families = {family.name: family for family in WaitingJobsCollector(SimpleNamespace(waiting=waiting)).collect()}
    published = {sample.labels["job_id"]: sample.value for sample in families[Trainer.JOB_RESUMING].samples}
    assert published == {"killed": 1, "never-ran": 0}      # 0 published too: the last value before an end says it


def test_withdrawing_an_endpoint_takes_only_one_of_the_jobs_ranks(tmp_path):
    """A rank of 30 digits overflowed SQLite's integer: a 500 (and one past the job's ranks was taken)."""
    from trainmetrics.edge import ApiError
    from trainmetrics.jobserver.jobs import JobService, ServerSettings
    from trainmetrics.jobserver.supervisor import token_digest

    store = JobStore(tmp_path / "db.sqlite")
    store.add_job(JobRecord(id="two-ranks", owner="default", name="a", state="running", spec={"nproc": 2},
                            run_token=token_digest("run-secret")))
    service = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 1))
    service.withdraw_endpoint("two-ranks", "run-secret", "1")
    for rank in ("9" * 30, "2", "", None, "-1", "１"):
        with pytest.raises(ApiError, match="rank: one of the job's ranks"):
            service.withdraw_endpoint("two-ranks", "run-secret", rank)
    store.close()


def test_requests_that_share_a_stacks_dump_share_when_it_was_taken(supervisor, monkeypatch):
    """A request within 5 s of the one that asked the ranks gets that dump: its taken_at was its own time,
    later than the stacks it showed (a hang that began between the two looked captured)."""
    from trainmetrics.jobserver import stacks
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    submit(supervisor, "stacks-1")
    service = JobService(ServerSettings(data_dir=supervisor.data_dir), supervisor.store, supervisor)
    _, path, before, asked_at = service.request_stacks(None, "stacks-1")
    time.sleep(0.3)
    _, _, shared_before, shared_at = service.request_stacks(None, "stacks-1")
    assert before is not None and shared_before == before and shared_at == asked_at < time.time() - 0.25
    monkeypatch.setattr(stacks, "ANSWER_SECONDS", 0.1)
    assert asyncio.run(stacks.collect(path, shared_before, shared_at))["taken_at"] == asked_at


def test_a_stacks_request_empties_a_ranks_file_over_its_bound_before_asking(supervisor, monkeypatch):
    """A rank's stacks file only grew, by a dump per request (see test_stacks.py): the request empties one over
    stacks.MAX_FILE_BYTES before it asks."""
    from trainmetrics.jobserver import stacks
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    monkeypatch.setattr(stacks, "MAX_FILE_BYTES", 4096)
    submit(supervisor, "stacks-big")
    service = JobService(ServerSettings(data_dir=supervisor.data_dir), supervisor.store, supervisor)
    stacks.stacks_file(supervisor.job_path("stacks-big"), 0).write_text("an old dump\n" * 400)
    _, path, before, _ = service.request_stacks(None, "stacks-big")
    assert before == {0: 0} and stacks.stacks_file(path, 0).stat().st_size == 0


def test_a_run_no_server_recorded_is_killed_before_its_job_starts(supervisor):
    """The server killed between starting a job's process and recording it: the job was still queued, the next
    server started it again, and two processes trained it at once (the first unsupervised, unscraped: its
    endpoint secret was replaced), beyond --max-concurrent."""
    queue(supervisor, "twice")
    job = supervisor.store.get_job("twice")
    supervisor.job_path(job.id).mkdir(parents=True, exist_ok=True)
    orphan = supervisor.executor.start(job.id, 1, supervisor.train_args(job), supervisor.job_path(job.id), {})
    assert supervisor.store.get_job("twice").state == "queued"      # what the killed server left
    supervisor.tick()
    assert supervisor.store.get_job("twice").state == "running"
    assert orphan.process.wait(timeout=10) == -signal.SIGKILL
    assert supervisor.runs["twice"].pid != orphan.pid and supervisor.runs["twice"].process.poll() is None


def test_a_run_no_server_recorded_that_survives_sigkill_holds_back_its_own_job_alone(supervisor, monkeypatch):
    """A leftover run of one job that SIGKILL did not end (a process stuck in the kernel: a hung network file
    system) made the local executor say it could start nothing: every job queued behind it waited, and
    JobServerNotStartingJobs paged, for one job's stuck process."""
    from trainmetrics.jobserver import local

    queue(supervisor, "stuck")
    queue(supervisor, "behind")
    job = supervisor.store.get_job("stuck")
    supervisor.job_path(job.id).mkdir(parents=True, exist_ok=True)
    orphan = supervisor.executor.start(job.id, 1, supervisor.train_args(job), supervisor.job_path(job.id), {})
    kill = local.kill_processes
    monkeypatch.setattr(local, "kill_processes", lambda processes: processes)     # each one survives it
    supervisor.tick()
    assert supervisor.store.get_job("stuck").state == "queued"
    assert supervisor.store.get_job("behind").state == "running"
    assert supervisor.held_back_since is None
    assert supervisor.waiting_for(supervisor.store.get_job("stuck")).startswith(
        "its start, put off: a process of job stuck left running by an earlier start survived SIGKILL")
    monkeypatch.setattr(local, "kill_processes", kill)
    supervisor.tick()           # the process ended after all: the job starts
    assert orphan.process.wait(timeout=10) == -signal.SIGKILL
    assert supervisor.store.get_job("stuck").state == "running"


def test_a_run_no_server_recorded_is_killed_when_its_queued_job_is_cancelled(supervisor):
    """The same leftover run, its job cancelled while queued before any server started it again: only the next
    start killed it (clear_way), and a cancelled job never starts, so it trained on unseen in the job's
    directory."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    queue(supervisor, "left")
    job = supervisor.store.get_job("left")
    supervisor.job_path(job.id).mkdir(parents=True, exist_ok=True)
    orphan = supervisor.executor.start(job.id, 1, supervisor.train_args(job), supervisor.job_path(job.id), {})
    service = JobService(ServerSettings(data_dir=supervisor.data_dir), supervisor.store, supervisor)
    assert service.stop(None, "left", "cancelled")[0] == 200
    assert orphan.process.wait(timeout=10) == -signal.SIGKILL


def test_a_queued_job_whose_directory_holds_checkpoints_resumes_from_them(supervisor):
    """The run no server recorded wrote checkpoints before it was killed: a fresh start of the job refuses such
    a directory (it would prune its own first), so the job continues from them."""
    queue(supervisor, "lost-run")
    job = supervisor.store.get_job("lost-run")
    assert "--resume" not in supervisor.train_args(job)
    supervisor.checkpoint_dir(job.id).mkdir(parents=True)
    (supervisor.checkpoint_dir(job.id) / "step-000000030.pt").write_bytes(b"written by the lost run")
    assert "--resume" in supervisor.train_args(job)


@contextlib.contextmanager
def database_locked(supervisor: Supervisor):
    """Another process holds the database's write lock (a backup, sqlite3 at a prompt); the store gives up after
    100 ms instead of its 5 s."""
    supervisor.store._db.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(supervisor.data_dir / "db.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_a_run_that_ends_while_the_database_is_locked_is_recorded_once_it_is_not(supervisor):
    """The run was forgotten before its end was written: the write failed, and the job said `running` until
    the server restarted, neither cancellable nor resumable, its slot taken by the next job."""
    submit(supervisor, "locked-end", "cnn")             # "completes" after ~0.5 s
    with database_locked(supervisor):
        supervisor.runs["locked-end"].process.wait(timeout=10)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            supervisor.tick()
    assert settle(supervisor, "locked-end").state == "completed"


def test_a_start_whose_record_fails_is_killed_and_its_job_stays_queued(supervisor):
    """The process was spawned, its `running` write failed: the job was failed while its process trained on,
    unwatched, past --max-concurrent, its result never read."""
    from trainmetrics.jobserver.executors import Run
    from trainmetrics.jobserver.local import run_processes

    spawn, locks = supervisor.executor.start, contextlib.ExitStack()

    def start_then_lock(*args):
        run = spawn(*args)
        locks.enter_context(database_locked(supervisor))
        return run

    supervisor.executor.start = start_then_lock
    queue(supervisor, "locked-start")
    with locks:
        supervisor.tick()
    supervisor.executor.start = spawn
    alive = run_processes(Run("locked-start", None, supervisor.job_path("locked-start"), None))
    assert supervisor.store.get_job("locked-start").state == "queued" and alive == [] and not supervisor.runs
    supervisor.tick()
    assert supervisor.store.get_job("locked-start").state == "running"          # started again


def test_a_job_whose_start_finds_the_disk_full_stays_queued_until_there_is_room(supervisor, monkeypatch):
    """It was failed for good ("could not start: OSError: [Errno 28] No space left on device"), for the disk's
    fault; and where that failure could not be recorded either (the database on the same disk), every tick failed."""
    import errno
    import os

    def no_room(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(supervisor.log_path("no-room")))

    monkeypatch.setattr(supervisor.executor, "start", no_room)
    queue(supervisor, "no-room")
    queue(supervisor, "behind-it")
    supervisor.tick()
    jobs = [supervisor.store.get_job(job_id) for job_id in ("no-room", "behind-it")]
    assert [job.state for job in jobs] == ["queued", "queued"]
    for job in jobs:        # each says why, with no server path (the queue waited with nothing to say so)
        said = supervisor.waiting_for(job)
        assert said.startswith("the local executor to start jobs again: [Errno 28] No space left on device: "
                               "'<data dir>/"), said
    monkeypatch.undo()                                  # space freed
    supervisor.tick()
    assert supervisor.store.get_job("no-room").state == "running"
    assert supervisor.waiting_for(supervisor.store.get_job("behind-it")) is None


@pytest.mark.parametrize("code", ["EAGAIN", "ENOMEM", "EMFILE", "ENFILE"])
def test_a_start_short_of_processes_memory_or_descriptors_keeps_the_queue(supervisor, monkeypatch, code):
    """A fork refused for the user's process limit (EAGAIN), memory, or descriptors was taken for the job's own
    failure: the pass went on to the next job, which failed the same way, and every queued job failed for good."""
    import errno
    import os

    def short(*args):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(supervisor.executor, "start", short)
    queue(supervisor, "first")
    queue(supervisor, "second")
    supervisor.tick()
    assert [supervisor.store.get_job(job_id).state for job_id in ("first", "second")] == ["queued", "queued"]
    monkeypatch.undo()                                  # the processes, memory or descriptors freed
    supervisor.tick()
    assert supervisor.store.get_job("first").state == "running"


def test_the_server_publishes_since_when_its_executor_has_started_no_job(supervisor, monkeypatch):
    """An executor that fails every start (a full disk here; Ray failing every submission) keeps the jobs queued,
    and nothing in Prometheus said so: no job failed, no target went down. The server's /metrics now has
    trainer_server_starts_held_back_since_timestamp_seconds while it lasts (JobServerNotStartingJobs reads it),
    since the first failed start, and none once a start gets through."""
    import errno
    import os

    from trainmetrics.contract import Trainer
    from trainmetrics.jobserver.app import JobServer, WaitingJobsCollector
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    def no_room(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def published() -> list:
        families = {family.name: family for family in WaitingJobsCollector(server).collect()}
        return families[Trainer.STARTS_HELD_BACK_SINCE].samples

    server = JobServer(ServerSettings(data_dir=supervisor.data_dir))
    server.service = JobService(server.settings, supervisor.store, supervisor)
    server.tick()
    assert published() == []
    monkeypatch.setattr(supervisor.executor, "start", no_room)
    queue(supervisor, "no-room")
    before = time.time()
    server.tick()
    (sample,) = published()
    assert sample.labels == {"executor": supervisor.executor.name} and before <= sample.value <= time.time()
    server.tick()
    assert [held.value for held in published()] == [sample.value]         # since the first: not each try's
    monkeypatch.undo()
    server.tick()
    assert supervisor.store.get_job("no-room").state == "running" and published() == []


def test_a_held_back_executor_whose_queue_emptied_is_published_no_more(supervisor, monkeypatch):
    """The executor failed the only queued job's start (a full disk), and the job was cancelled: the queue empty,
    no start was tried again, and only a start that got an answer cleared the held back. The server went on
    publishing trainer_server_starts_held_back_since_timestamp_seconds with nothing queued (JobServerNotStartingJobs
    paged ten minutes later), and a job queued later was said to wait for it before any try of its own."""
    import errno
    import os

    from trainmetrics.contract import Trainer
    from trainmetrics.jobserver.app import JobServer, WaitingJobsCollector
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    def no_room(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    server = JobServer(ServerSettings(data_dir=supervisor.data_dir))
    server.service = JobService(server.settings, supervisor.store, supervisor)
    monkeypatch.setattr(supervisor.executor, "start", no_room)
    queue(supervisor, "no-room")
    server.tick()
    assert supervisor.held_back_since is not None
    assert server.service.stop(None, "no-room", "cancelled")[0] == 200
    server.tick()
    families = {family.name: family for family in WaitingJobsCollector(server).collect()}
    assert supervisor.held_back_since is None and families[Trainer.STARTS_HELD_BACK_SINCE].samples == []
    queue(supervisor, "later")
    assert supervisor.waiting_for(supervisor.store.get_job("later")) is None


def test_a_held_back_message_shows_no_part_of_the_data_dir_its_cut_goes_through(supervisor, monkeypatch):
    """The executor's words were cut to 300 characters, then the data dir masked: a data dir the cut went through
    was left in part, a server path in every queued job's waiting_for. Masked first now."""
    import errno

    path = str(supervisor.data_dir / "jobs" / "no-room" / "train.log")

    def no_room(*args):
        raise OSError(errno.ENOSPC, "x" * (300 - len("[Errno 28] ") - len(path) // 2), path)

    monkeypatch.setattr(supervisor.executor, "start", no_room)
    queue(supervisor, "no-room")
    supervisor.tick()
    said = supervisor.waiting_for(supervisor.store.get_job("no-room"))
    assert str(supervisor.data_dir)[:8] not in said and "<data dir>" in said, said


def test_a_stop_whose_record_failed_sent_no_signal_and_its_retry_sends_one(supervisor):
    """The pause's SIGUSR1 went out before its write, which failed (a 500): the client's retry signalled the
    process again (a stop under way is never signalled twice: a second one can kill a process as it exits)."""
    job = submit(supervisor, "locked-stop")
    time.sleep(0.3)                                     # its handlers are installed
    with database_locked(supervisor):
        with pytest.raises(sqlite3.OperationalError):
            supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    assert settle(supervisor, job.id).state == "paused"
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_a_start_that_fails_shows_no_server_path(supervisor):
    """A start refused by the system (a directory it may not write; a full disk leaves the job queued) named the
    job's directory in the server's data dir in the job's error, which the job API shows (no answer shows a server
    path)."""
    from trainmetrics.jobserver.supervisor import DATA_DIR_SHOWN

    def not_writable(job_id, nproc, train_args, job_dir, env):
        raise OSError(13, "Permission denied", str(job_dir))

    supervisor.executor.start = not_writable
    queue(supervisor, "full")
    supervisor.tick()
    job = supervisor.store.get_job("full")
    assert job.state == "failed" and DATA_DIR_SHOWN in job.error and str(supervisor.data_dir) not in job.error


def test_a_failed_starts_error_shows_no_part_of_the_data_dir_its_cut_goes_through(supervisor):
    """The job's error was cut to 500 characters, then the data dir masked: a data dir the cut went through was
    left in part (a server path in the job API). Masked first now."""
    path = str(supervisor.data_dir / "jobs" / "cut" / "train.log")

    def refused(job_id, nproc, train_args, job_dir, env):
        raise OSError(13, "x" * (500 - len("could not start: PermissionError: [Errno 13] ") - len(path) // 2), path)

    supervisor.executor.start = refused
    queue(supervisor, "cut")
    supervisor.tick()
    job = supervisor.store.get_job("cut")
    assert job.state == "failed" and str(supervisor.data_dir)[:8] not in job.error, job.error


def test_a_stop_whose_signal_raised_is_not_recorded_and_its_retry_sends_it(supervisor):
    """Recorded before the signal, a stop whose signal raised (Ray's control file on a full disk) stayed recorded
    and unsent: the client's retry found it under way and sent nothing."""
    job = submit(supervisor, "signal-raises")
    time.sleep(0.3)                                     # its handlers are installed
    send = supervisor.executor.signal

    def full_disk(run, outcome):
        raise OSError(28, "No space left on device")

    supervisor.executor.signal = full_disk
    with pytest.raises(OSError):
        supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    supervisor.executor.signal = send
    assert supervisor.store.get_job(job.id).requested is None
    supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    assert settle(supervisor, job.id).state == "paused"


def test_a_stop_whose_signal_and_undo_both_failed_is_sent_by_its_retry(supervisor):
    """The control file's write found the disk full, and so did the undo of the stop's record: the stop stayed
    recorded, unsent, and the client's retry was answered 202 (a stop under way) with nothing sent; the job trained
    on."""
    job = submit(supervisor, "undo-fails")
    time.sleep(0.3)                                     # its handlers are installed
    send, update = supervisor.executor.signal, supervisor.store.update_job

    def full_disk(run, outcome):
        raise OSError(28, "No space left on device")

    def undo_fails(job_id, **fields):
        if fields.get("requested", "") is None:
            raise sqlite3.OperationalError("database or disk is full")
        return update(job_id, **fields)

    supervisor.executor.signal, supervisor.store.update_job = full_disk, undo_fails
    with pytest.raises(sqlite3.OperationalError):
        supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    supervisor.executor.signal, supervisor.store.update_job = send, update
    assert supervisor.store.get_job(job.id).requested == "paused"     # recorded, never sent
    supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    assert settle(supervisor, job.id).state == "paused"
    assert json.loads(supervisor.result_path(job.id).read_text())["signals"] == 1


def test_an_end_recorded_before_a_later_write_failed_is_not_decided_again(supervisor):
    """The end's record went through, the endpoints' removal after it failed (the database locked): the next
    tick recorded the end again, with the stop request already cleared, and a cancel accepted over a pause came
    out `paused`, resumable."""
    job = submit(supervisor, "pause-then-cancel")
    time.sleep(0.3)
    supervisor.request_stop(supervisor.store.get_job(job.id), "paused")
    supervisor.request_stop(supervisor.store.get_job(job.id), "cancelled")
    supervisor.runs[job.id].process.wait(timeout=10)    # its result says paused
    remove, failed = supervisor.store.remove_endpoints, []

    def locked_once(job_id, rank=None):
        if not failed:
            failed.append(job_id)
            raise sqlite3.OperationalError("database is locked")
        return remove(job_id, rank)

    supervisor.store.remove_endpoints = locked_once
    with pytest.raises(sqlite3.OperationalError):
        supervisor.tick()
    supervisor.tick()
    assert (supervisor.store.get_job(job.id).state, job.id in supervisor.runs) == ("cancelled", False)


def test_a_job_on_ray_naming_a_gpu_past_cuda_0_is_refused_at_its_submission(tmp_path):
    """Ray gives each rank one GPU, which the rank sees as cuda:0: `cuda:1` was queued and started, and every rank
    failed at its start ("only 1 CUDA device(s)"). Refused when submitted, naming what to ask for instead; the
    local executor takes it (a machine's GPU 1)."""
    from types import SimpleNamespace

    from trainmetrics.edge import ApiError
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    ray = JobService(ServerSettings(data_dir=tmp_path), store,
                     Supervisor(store, tmp_path, None, 0, executor=SimpleNamespace(name="ray")))
    for device in ("cuda:1", "cuda:7"):
        with pytest.raises(ApiError, match="on Ray each rank is given a GPU") as refused:
            ray.submit(None, {"dataset": "blobs", "device": device})
        assert refused.value.status == 400
    accepted = [ray.submit(None, {"dataset": "blobs", "device": device})["job_id"] for device in ("cuda", "cuda:0")]
    local = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 0))
    accepted.append(local.submit(None, {"dataset": "blobs", "device": "cuda:1"})["job_id"])
    assert [store.get_job(job_id).spec["device"] for job_id in accepted] == ["cuda", "cuda:0", "cuda:1"]
    store.close()


def test_an_end_the_server_publishes_is_held_until_the_jobs_report_is_stored(tmp_path):
    """Prometheus down for the 5 minutes the server published a killed job's `failed` (or a cancel of a queued
    or paused job): back, it held the dead process's last `running` (or the `paused`, the `queued`) as the job's
    last word, and the report stored then said `vanished` (`paused`) for good where the job API says failed
    (cancelled), or none was ever stored (`queued`). The end is published until the report is stored, up to the
    hour the keeper asks for it; without stored reports (no analytics beside the server), for 5 minutes."""
    from trainmetrics.jobserver.jobs import FINAL_STATE_HOLD_SECONDS, JobService, ServerSettings
    from trainmetrics.jobserver.reports import GIVE_UP_SECONDS
    from trainmetrics.reports import ReportArchive

    store = JobStore(tmp_path / "db.sqlite")
    now = time.time()
    ended = {"killed": now - FINAL_STATE_HOLD_SECONDS - 60, "reported": now - FINAL_STATE_HOLD_SECONDS - 60,
             "given-up": now - GIVE_UP_SECONDS - 60}
    for job_id, end in ended.items():
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="failed", spec={}, ended=end))
    assert store.keep_report("reported", '{"job_id": "reported"}', ended["reported"])
    supervisor = Supervisor(store, tmp_path, None, 1)
    service = JobService(ServerSettings(data_dir=tmp_path, archive=ReportArchive()), store, supervisor)
    assert [(w.job.id, w.state, w.end) for w in service.waiting_jobs()] == [("killed", "failed", ended["killed"])]
    assert store.keep_report("killed", '{"job_id": "killed"}', ended["killed"])
    assert service.waiting_jobs() == []
    store.update_job("killed", report=None)
    assert JobService(ServerSettings(data_dir=tmp_path), store, supervisor).waiting_jobs() == []
    store.close()


def test_the_hour_a_report_is_asked_for_counts_the_servers_up_time(tmp_path, monkeypatch):
    """A server down for an hour just after a job's end, its report not stored yet (Prometheus down, or the server
    stopped seconds after the end), gave the job up at its next start: no report was ever stored, its analytics
    lost with Prometheus' retention, and its end (one the server gave it) no longer published. The hour counts
    the server's up time: the time it was down before this start, from its last note that it was up, does not."""
    import asyncio

    from trainmetrics.jobserver import reports
    from trainmetrics.jobserver.jobs import JobService, ServerSettings
    from trainmetrics.reports import ReportArchive

    store = JobStore(tmp_path / "db.sqlite")
    assert reports.UpTime(store).downtime == 0.0            # no server ran on this store before
    now = time.time()
    # Up 50 minutes after the job's end, then down 20 minutes: 10 minutes of its hour left.
    store.add_job(JobRecord(id="cancelled-1", owner="default", name="cancelled-1", state="cancelled", spec={},
                            ended=now - 70 * 60))
    store.note_alive(now - 20 * 60)
    store.close()
    store = JobStore(tmp_path / "db.sqlite")
    service = JobService(ServerSettings(data_dir=tmp_path, archive=ReportArchive()), store,
                         Supervisor(store, tmp_path, None, 1))
    assert 20 * 60 <= service.uptime.downtime < 20 * 60 + 5
    assert [waiting.job.id for waiting in service.waiting_jobs()] == ["cancelled-1"]     # its end still published
    asked = []

    async def compute(job_id, settled=True, owner=None):
        asked.append(job_id)
        return {"job_id": job_id, "status": "cancelled"}

    async def call(operation, *args):
        return operation(*args)

    asyncio.run(reports.ReportKeeper(ReportArchive(compute=compute), call, store, service.uptime).round())
    assert asked == ["cancelled-1"] and store.get_report("cancelled-1") is not None
    service.uptime.note()
    assert abs(store.last_alive() - time.time()) < 5
    # Past the 10 minutes left, given up (and the next start finds this one's note: no down time).
    service.uptime.began -= 11 * 60        # up 11 minutes later
    store.update_job("cancelled-1", report=None)
    later = time.time() + 11 * 60
    monkeypatch.setattr(time, "time", lambda: later)
    assert service.waiting_jobs() == []
    monkeypatch.undo()
    assert reports.UpTime(store).downtime < 5
    store._execute("UPDATE server SET value = 'yesterday' WHERE name = 'alive'")     # edited by hand
    assert reports.UpTime(store).downtime == 0.0
    store.close()


def test_the_hour_a_report_is_asked_for_counts_every_restart_within_it(tmp_path, monkeypatch):
    """Only the last stop's down time counted: a job whose report waited through two stops of the server (Prometheus
    down meanwhile), 15 minutes of up time in all since its end, was given up at the second restart; its report was
    never stored. Every stop within the job's hour counts."""
    from trainmetrics.jobserver import reports
    from trainmetrics.jobserver.jobs import JobService, ServerSettings
    from trainmetrics.reports import ReportArchive

    store = JobStore(tmp_path / "db.sqlite")
    now = time.time()
    store.add_job(JobRecord(id="failed-1", owner="default", name="failed-1", state="failed", spec={},
                            ended=now - 100 * 60))
    store.note_alive(now - 95 * 60)                     # up 5 minutes after the end, then down 50,
    monkeypatch.setattr(time, "time", lambda: now - 45 * 60)
    reports.UpTime(store)
    monkeypatch.undo()
    store.note_alive(now - 35 * 60)                     # up 10 minutes, then down 35 until now
    service = JobService(ServerSettings(data_dir=tmp_path, archive=ReportArchive()), store,
                         Supervisor(store, tmp_path, None, 1))
    assert [waiting.job.id for waiting in service.waiting_jobs()] == ["failed-1"]
    assert service.uptime.asked_after(time.time()) < now - 100 * 60
    store.close()


def test_an_end_while_the_server_was_down_is_published_for_five_minutes_of_its_up_time(tmp_path):
    """A run that ended while the server was down ends when its result says (not at the restart): an end the
    server publishes (no scraper read it during the run's linger) was then never published after an outage of more
    than 5 minutes, without stored reports. It is, for the first 5 minutes of the server's up time."""
    from trainmetrics.jobserver.jobs import FINAL_STATE_HOLD_SECONDS, JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    now = time.time()
    store.note_alive(now - 20 * 60)                     # down for 20 minutes; the job ended 10 minutes ago
    for job_id, end in (("ended-while-down", now - 10 * 60), ("ended-before", now - 25 * 60 - 1)):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="completed", spec={}, ended=end))
    service = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 1))
    assert [waiting.job.id for waiting in service.waiting_jobs()] == ["ended-while-down"]
    service.uptime.began -= FINAL_STATE_HOLD_SECONDS    # up for 5 minutes
    assert service.waiting_jobs() == []
    store.close()


def test_the_end_of_a_resumed_run_no_rank_of_which_started_says_the_job_waited_to_resume(tmp_path):
    """A resumed job cancelled while Ray placed its ranks (or whose run refused its arguments): the server published
    that end with `resuming` 0, the notice of a killed run's death, so after a killed run the analytics ended the
    job at the kill and its wait to resume to the cancel was in no phase. A cancel while it was queued said 1; so
    does this end now. A run that started and ended so is a run's end (0)."""
    from trainmetrics.contract import RESULT_PUBLISHED, RESULT_STARTED
    from trainmetrics.jobfiles import write_result
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=4, executor=Ending())
    results = {"placing": {"state": "cancelled", "exit_code": 3, RESULT_PUBLISHED: False, RESULT_STARTED: False},
               "refused": {"state": "failed", "exit_code": 2, "error": "x", RESULT_PUBLISHED: False,
                           RESULT_STARTED: False},
               "ran": {"state": "cancelled", "exit_code": 3, RESULT_PUBLISHED: False}}
    for job_id, result in results.items():
        queue(supervisor, job_id)
        store.update_job(job_id, resume=True)
        supervisor.start(store.get_job(job_id))
        write_result(supervisor.result_path(job_id), result)
    queue(supervisor, "fresh")
    supervisor.start(store.get_job("fresh"))
    write_result(supervisor.result_path("fresh"), results["placing"])
    supervisor.tick()
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    assert {w.job.id: (w.state, w.resuming) for w in service.waiting_jobs()} == \
        {"placing": ("cancelled", True), "refused": ("failed", True), "ran": ("cancelled", False),
         "fresh": ("cancelled", False)}
    store.close()


def test_a_placement_wait_left_by_an_earlier_launcher_is_not_the_new_runs(supervisor, tmp_path):
    """A Ray launcher killed while Ray placed its ranks (a head restart) left its placement.wait: the job's next run
    was published `queued`, waiting for that old placement, until its own launcher removed the file."""
    from trainmetrics.jobfiles import PLACEMENT_WAIT_NAME
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    queue(supervisor, "placed-before")
    job_path = supervisor.job_path("placed-before")
    job_path.mkdir(parents=True, exist_ok=True)
    (job_path / PLACEMENT_WAIT_NAME).write_text("Ray to place 2 rank(s), one CPU each")
    supervisor.tick()
    assert supervisor.store.get_job("placed-before").state == "running"
    service = JobService(ServerSettings(data_dir=supervisor.data_dir), supervisor.store, supervisor)
    assert [w.job.id for w in service.waiting_jobs()] == []


def test_a_stored_report_that_cannot_be_served_is_not_said_stored(tmp_path):
    """A report row edited by hand (not JSON, or another job's report) is ignored when the analytics fall back to
    it, but the job API said `report_stored: true`."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    service = JobService(ServerSettings(data_dir=tmp_path), store, Supervisor(store, tmp_path, None, 1))
    reports = {"good": '{"job_id": "good", "status": "completed"}', "not-json": '{"job_id": "not-json"',
               "another-jobs": '{"job_id": "good", "status": "completed"}', "a-list": '["not-a-report"]'}
    for job_id, report in reports.items():
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="completed", spec={}, ended=1.0))
        assert store.keep_report(job_id, report, 1.0)
    assert {job_id: service.get(None, job_id)["report_stored"] for job_id in reports} == {
        "good": True, "not-json": False, "another-jobs": False, "a-list": False}
    store.close()


def _one_slot_service(tmp_path):
    """A job service over a real store and a supervisor with one slot (the scripted trainer)."""
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=ScriptedExecutor())
    return JobService(ServerSettings(data_dir=tmp_path), store, supervisor), supervisor


def _paused_and_resumed_behind(service, supervisor, first: str, second: str, *behind: str) -> None:
    """`first` runs, `second` and `behind` are submitted after it; `first` is paused (so `second` takes the slot),
    then resumed: it waits for the slot `second` holds, `behind` queued since before its resume."""
    for job_id in (first, second, *behind):
        service.submit(None, {"job_id": job_id, "model": "mlp"})
    time.sleep(0.3)
    assert service.stop(None, first, "paused")[0] == 202
    assert settle(supervisor, first).state == "paused"
    supervisor.tick()
    assert supervisor.store.get_job(second).state == "running"
    time.sleep(0.3)     # its stop signals unblocked: a stop now is taken, not lost in its start
    assert service.resume(None, first)["state"] == "queued"


def test_a_resumed_job_joins_the_back_of_the_queue(tmp_path):
    """A resumed job kept the place of its first submission: resumed hours later (after a pause, or a failure), it
    started before every job queued while it was paused, though they had waited longer."""
    service, supervisor = _one_slot_service(tmp_path)
    try:
        _paused_and_resumed_behind(service, supervisor, "early", "running-now", "waiting")
        assert service.stop(None, "running-now", "cancelled")[0] == 202
        settle(supervisor, "running-now")
        supervisor.tick()
        assert (service.store.get_job("waiting").state, service.store.get_job("early").state) == ("running", "queued")
    finally:
        supervisor.shutdown(timeout=20)
        service.store.close()


def test_a_server_restart_starts_again_the_jobs_it_paused_before_those_that_waited(tmp_path):
    """A job the server's stop paused (or whose process died with the server) was queued again behind any job that
    waited with an older submission (one resumed after a pause): after the restart the waiting job took the slot,
    and the job that had been running waited for it to end."""
    service, supervisor = _one_slot_service(tmp_path)
    try:
        _paused_and_resumed_behind(service, supervisor, "resumed", "was-running")
        supervisor.shutdown(timeout=20)
        assert supervisor.store.get_job("was-running").state == "queued"
        again = restarted(supervisor, max_concurrent=1)
        supervisor = again      # (stopped below, whatever the assertion found)
        again.tick()
        assert (service.store.get_job("was-running").state, service.store.get_job("resumed").state) == \
            ("running", "queued")
    finally:
        supervisor.shutdown(timeout=20)
        service.store.close()


def visible_gpus(run: Run) -> str | None:
    """The CUDA_VISIBLE_DEVICES the run's process was started with."""
    import psutil

    return psutil.Process(run.pid).environ().get("CUDA_VISIBLE_DEVICES")


def test_local_jobs_are_given_gpus_of_their_own_and_wait_for_free_ones(tmp_path, monkeypatch):
    """Every local job trained on GPU 0 (its ranks on GPUs 0 to nproc - 1), however many GPUs --max-concurrent
    counted one job per: eight one-rank jobs of an eight-GPU machine shared GPU 0, the other seven idle."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=8, executor=ScriptedExecutor(),
                            gpus=("0", "1", "2"))
    try:
        queue(supervisor, "pair", nproc=2)      # (the scripted trainer is one process, whatever its nproc)
        queue(supervisor, "one")
        queue(supervisor, "waits")
        queue(supervisor, "on-cpu", device="cpu")
        supervisor.tick()
        assert (visible_gpus(supervisor.runs["pair"]), visible_gpus(supervisor.runs["one"])) == ("0,1", "2")
        assert visible_gpus(supervisor.runs["on-cpu"]) is None            # a CPU job takes no GPU
        waiting = supervisor.store.get_job("waits")
        assert waiting.state == "queued"
        assert supervisor.waiting_for(waiting) == ("its start, put off: 1 free GPU(s) of the 3 local jobs are "
                                                   "given: 0 free now")
        # A restarted server gives the GPUs its adopted runs hold to no other job.
        restarted = Supervisor(store, tmp_path, None, max_concurrent=8, executor=ScriptedExecutor(),
                               gpus=("0", "1", "2"))
        restarted.recover()
        restarted.tick()
        assert restarted.store.get_job("waits").state == "queued"
        supervisor.runs["pair"].process.send_signal(signal.SIGTERM)     # it ends: its GPUs are free again
        assert tick_until(supervisor, "pair", 30).state != "running"
        supervisor.tick()
        assert visible_gpus(supervisor.runs["waits"]) == "0"
    finally:
        stop_runs(supervisor)
        store.close()


def test_a_job_waiting_for_gpus_is_overtaken_by_no_gpu_job_queued_after_it(tmp_path, monkeypatch):
    """GPUs went to whichever queued job they sufficed for: a two-GPU job waited while one-GPU jobs queued after it
    took each GPU that freed, for as long as they kept coming. Jobs that take no GPU still start meanwhile."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=8, executor=ScriptedExecutor(),
                            gpus=("0", "1"))
    try:
        queue(supervisor, "first")
        supervisor.tick()
        queue(supervisor, "pair", nproc=2)
        queue(supervisor, "small")
        queue(supervisor, "on-cpu", device="cpu")
        supervisor.tick()
        assert [supervisor.store.get_job(job_id).state for job_id in ("pair", "small", "on-cpu")] == \
            ["queued", "queued", "running"]
        assert supervisor.waiting_for(supervisor.store.get_job("small")) == (
            "its start, put off: 1 free GPU(s): the GPUs freed go first to a job queued before it, which waits for 2")
        supervisor.runs["first"].process.send_signal(signal.SIGTERM)
        assert tick_until(supervisor, "first", 30).state != "running"
        supervisor.tick()
        assert visible_gpus(supervisor.runs["pair"]) == "0,1"
        assert supervisor.store.get_job("small").state == "queued"
    finally:
        stop_runs(supervisor)
        store.close()


@pytest.mark.parametrize("visible,gpus", [(None, ("0", "1", "2", "3")), ("2,3", ("2", "3")), ("", ()),
                                          ("1,-1,0", ("1",)), ("GPU-5d2f9e81,0", ("GPU-5d2f9e81", "0"))])
def test_the_gpus_local_jobs_are_given_are_those_the_server_was_given(visible, gpus, monkeypatch):
    """The server's own CUDA_VISIBLE_DEVICES (an administrator's share of the machine) is what its jobs are given
    from, up to the entry where CUDA stops; without one, every GPU NVML counts."""
    from trainmetrics.jobserver.cli import local_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpus(count=lambda: 4) == gpus


def test_a_run_of_a_server_from_before_the_gpus_files_keeps_its_gpus_after_the_restart(tmp_path, monkeypatch):
    """A run adopted without a gpus file (started by a server from before them, which gave its jobs no GPUs: its
    ranks took the server's first GPUs) held none: the restarted server gave its GPU 0 to the next job too."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    older = Supervisor(store, tmp_path, None, max_concurrent=8, executor=ScriptedExecutor())
    restarted = None
    try:
        queue(older, "from-before")
        older.tick()
        assert older.store.get_job("from-before").state == "running"
        (older.job_path("from-before") / GPUS_FILE_NAME).unlink(missing_ok=True)      # such a server wrote none
        restarted = Supervisor(store, tmp_path, None, max_concurrent=8, executor=ScriptedExecutor(),
                               gpus=("0", "1"))
        restarted.recover()
        queue(restarted, "next")
        restarted.tick()
        assert visible_gpus(restarted.runs["next"]) == "1"
    finally:
        for run in [*older.runs.values(), *(restarted.runs.values() if restarted else ())]:
            if run.process is not None and run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        store.close()


def test_a_run_given_no_gpu_is_not_adopted_with_the_gpus_of_an_earlier_run(tmp_path, monkeypatch):
    """A run given no GPU left the gpus file of the job's earlier run in place: adopted after a restart, it held
    that run's GPU, which no job could be given while it ran on the CPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisors = [gpu_supervisor(store, tmp_path, gpus) for gpus in (("0", "1"), (), ("0", "1"))]
    first, without_gpus, adopting = supervisors
    try:
        queue(first, "resumed")
        first.tick()
        assert visible_gpus(first.runs["resumed"]) == "0"
        time.sleep(0.3)                     # its stop handlers in place, as the other shutdown tests wait
        first.shutdown(timeout=20)          # paused, queued to resume
        assert store.get_job("resumed").state == "queued"
        without_gpus.tick()                 # a server given no GPU (CUDA_VISIBLE_DEVICES=""): a CPU run
        assert visible_gpus(without_gpus.runs["resumed"]) is None
        adopting.recover()
        queue(adopting, "pair", nproc=2)
        adopting.tick()
        assert visible_gpus(adopting.runs["pair"]) == "0,1"
    finally:
        for run in (run for supervisor in supervisors for run in supervisor.runs.values()):
            if run.process is not None and run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        store.close()


def stop_runs(*supervisors: Supervisor) -> None:
    """Kill every process the supervisors started that still runs (a test's clean-up)."""
    for run in (run for supervisor in supervisors for run in supervisor.runs.values()):
        if run.process is not None and run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.mark.parametrize("planted", ["garbage", "binary", "negative", "directory", "fifo", "endless"])
def test_an_adopted_runs_damaged_gpus_file_gives_its_gpus_to_no_other_job(planted, tmp_path, monkeypatch):
    """A gpus file that does not say which of the server's GPUs the run was given (edited, cut, garbage, or
    something else at its name) left the adopted run holding none: the restarted server gave its GPU 0 to the
    next job. Bytes that are not UTF-8 raised out of recover() (the server did not start), a FIFO blocked it for
    good, and a link to an endless device read until memory ran out. The run holds every GPU until it ends."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    gpus = ("0", "1")
    first = gpu_supervisor(store, tmp_path, gpus)
    again = gpu_supervisor(store, tmp_path, gpus)
    try:
        queue(first, "adopted")
        first.tick()
        assert visible_gpus(first.runs["adopted"]) == "0"
        noted = first.job_path("adopted") / GPUS_FILE_NAME
        noted.unlink()
        if planted == "directory":
            noted.mkdir()
        elif planted == "fifo":
            os.mkfifo(noted)
        elif planted == "endless":
            noted.symlink_to("/dev/zero")
        else:
            noted.write_bytes({"garbage": b"zero", "binary": b"\xff\xfe0", "negative": b"-1"}[planted])
        recovering = threading.Thread(target=again.recover, daemon=True)
        recovering.start()
        recovering.join(10)
        if recovering.is_alive() and planted == "fifo":
            with open(noted, "wb"):     # let it go (the reader takes end of file)
                pass
        assert not recovering.is_alive(), "recover() did not return"
        assert "adopted" in again.runs
        queue(again, "next")
        again.tick()
        assert again.store.get_job("next").state == "queued"
        assert again.waiting_for(again.store.get_job("next")).startswith("its start, put off: 1 free GPU(s)")
        first.runs["adopted"].process.send_signal(signal.SIGTERM)     # it ends: its GPUs are free again
        assert tick_until(again, "adopted", 30).state != "running"
        again.tick()
        assert visible_gpus(again.runs["next"]) == "0"
    finally:
        stop_runs(first, again)
        store.close()


def test_an_adopted_run_holds_the_gpus_its_file_names_that_the_server_gives(tmp_path, monkeypatch):
    """A gpus file naming GPUs this server does not give (its share changed across the restart; an index of 5000
    digits, which int() refuses) holds those it does give, in any spelling of them ('01' is GPU 1)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    first = gpu_supervisor(store, tmp_path, ("0",))
    again = gpu_supervisor(store, tmp_path, ("0", "1", "2"))
    try:
        queue(first, "adopted")
        first.tick()
        (first.job_path("adopted") / GPUS_FILE_NAME).write_text("7, 01," + "9" * 5000)
        again.recover()
        queue(again, "pair", nproc=2)
        again.tick()
        assert visible_gpus(again.runs["pair"]) == "0,2"
    finally:
        stop_runs(first, again)
        store.close()


def test_a_gpus_file_is_written_over_a_link_at_its_name_never_through_it(tmp_path, monkeypatch):
    """A link planted at the job's gpus file was followed by the start's write: the file it named (anywhere the
    server's user may write) was overwritten with the run's GPUs."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = gpu_supervisor(store, tmp_path, ("0",))
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("keep me")
    try:
        queue(supervisor, "linked")
        supervisor.job_path("linked").mkdir(parents=True)
        (supervisor.job_path("linked") / GPUS_FILE_NAME).symlink_to(elsewhere)
        supervisor.tick()
        assert visible_gpus(supervisor.runs["linked"]) == "0"
        assert elsewhere.read_text() == "keep me"
        assert (supervisor.job_path("linked") / GPUS_FILE_NAME).read_text() == "0"
        assert not (supervisor.job_path("linked") / GPUS_FILE_NAME).is_symlink()
    finally:
        stop_runs(supervisor)
        store.close()


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_job_with_more_ranks_than_the_servers_gpus_fails_at_its_start_saying_so(device, tmp_path, monkeypatch):
    """A job of more ranks than the server has GPUs was started with none of its own: its ranks took cuda:0,
    cuda:1, ... (GPUs other jobs were given) until the one past the last failed with CUDA's 'invalid device
    ordinal'. It is refused at its submission (400), a job queued before the server lost GPUs (a restart with a
    narrower CUDA_VISIBLE_DEVICES) fails at its start, saying why, and a paused one's resume is refused (409)."""
    from trainmetrics.edge import ApiError
    from trainmetrics.jobserver.jobs import JobService, ServerSettings

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = gpu_supervisor(store, tmp_path, ("0", "1"))
    service = JobService(ServerSettings(data_dir=tmp_path, gpus=("0", "1")), store, supervisor)
    try:
        with pytest.raises(ApiError) as refused:
            service.submit(None, {"job_id": "too-wide", "nproc": 3, "device": device})
        assert refused.value.status == 400
        assert "3 ranks" in str(refused.value) and "2 GPU(s)" in str(refused.value)
        assert store.get_job("too-wide") is None
        service.submit(None, {"job_id": "fits", "nproc": 2, "device": device})
        assert visible_gpus(supervisor.runs["fits"]) == "0,1"
        service.submit(None, {"job_id": "on-cpu", "nproc": 3, "device": "cpu"})       # CPU ranks: any number
        assert store.get_job("on-cpu").state == "running"
        queue(supervisor, "queued-before", nproc=3, device=device)       # queued by a server with more GPUs
        supervisor.tick()
        job = store.get_job("queued-before")
        assert job.state == "failed" and "queued-before" not in supervisor.runs
        assert "3 ranks" in job.error and "2 GPU(s)" in job.error
        store.add_job(JobRecord(id="paused-before", owner="default", name="paused-before", state="paused",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 3, "device": device}))
        with pytest.raises(ApiError) as refused:
            service.resume(None, "paused-before")       # stays paused, to resume on a server with the GPUs
        assert refused.value.status == 409 and "2 GPU(s)" in str(refused.value)
        assert store.get_job("paused-before").state == "paused"
    finally:
        stop_runs(supervisor)
        store.close()


@pytest.mark.parametrize("visible,gpus", [("0,1,0", ()), ("0,00", ()), ("1,01,2", ()), ("1,5,0", ("1",)),
                                          ("007", ()), ("GPU-5d2f9e81,GPU-5d2f9e81", ()),
                                          ("GPU-5d2f9e81-0c4b,GPU-5d2f9e81", ()), ("GPU-5D2F9E81,GPU-5d2f9e81", ()),
                                          ("1," + "9" * 5000, ("1",))])
def test_the_server_gives_no_gpu_under_two_names_nor_one_the_host_lacks(visible, gpus, monkeypatch):
    """A CUDA_VISIBLE_DEVICES naming a GPU twice (CUDA then sees none at all) had each name given to a job of its
    own: two jobs on one GPU ('0,00' as much as '0,0'; a UUID and a prefix of it; a UUID in either case); an index
    past the host's GPUs (where CUDA stops) was given to a job, which then saw no GPU and trained on the CPU."""
    from trainmetrics.jobserver.cli import local_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpus(count=lambda: 2) == gpus


def test_a_job_waiting_for_gpus_keeps_when_the_executor_stopped_starting_jobs_since(tmp_path, monkeypatch):
    """A job waiting for GPUs never reaches the executor, yet its turn in each pass was taken as the executor
    answering a start: with a full disk failing the start of every job behind it, the held back began again at
    each tick, so trainer_server_starts_held_back_since_timestamp_seconds never grew old enough for
    JobServerNotStartingJobs and waiting_for's "since" was always now."""
    import errno

    def no_room(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = gpu_supervisor(store, tmp_path, ("0", "1"))
    try:
        queue(supervisor, "first")
        supervisor.tick()
        queue(supervisor, "pair", nproc=2)            # waits for GPU 0, which "first" holds
        queue(supervisor, "on-cpu", device="cpu")     # its start fails: the disk is full
        monkeypatch.setattr(supervisor.executor, "start", no_room)
        supervisor.tick()
        since = supervisor.held_back_since
        assert since is not None
        time.sleep(0.01)        # (a later tick's clock reads later)
        supervisor.tick()
        assert supervisor.held_back_since == since
        assert store.get_job("on-cpu").state == "queued"
    finally:
        stop_runs(supervisor)
        store.close()


def test_an_adopted_run_holds_its_gpu_under_another_spelling_of_its_uuid(tmp_path, monkeypatch):
    """The server restarted with its CUDA_VISIBLE_DEVICES naming a GPU by a prefix of the UUID the run's gpus file
    notes (CUDA takes either): the adopted run held none, and its GPU was given to the next job too."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    full, prefix = "GPU-5d2f9e81-0c4b-4e1a-9d3e-0123456789ab", "GPU-5d2f9e81"
    store = JobStore(tmp_path / "db.sqlite")
    first = gpu_supervisor(store, tmp_path, (full, "1"))
    again = gpu_supervisor(store, tmp_path, (prefix, "1"))
    try:
        queue(first, "adopted")
        first.tick()
        assert visible_gpus(first.runs["adopted"]) == full
        again.recover()
        queue(again, "next")
        again.tick()
        assert visible_gpus(again.runs["next"]) == "1"
    finally:
        stop_runs(first, again)
        store.close()


def test_a_job_waiting_behind_another_owners_gpu_job_is_not_told_what_that_job_needs(tmp_path, monkeypatch):
    """waiting_for of a job held back behind another owner's job waiting for GPUs said how many GPUs that job
    waits for: a detail of a job its owner alone may read (to the others it is "not found")."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = gpu_supervisor(store, tmp_path, ("0", "1"))
    try:
        queue(supervisor, "first")
        supervisor.tick()
        for job_id, owner, nproc in (("alices-pair", "alice", 2), ("bobs", "bob", 1), ("alices", "alice", 1)):
            store.add_job(JobRecord(id=job_id, owner=owner, name=job_id, state="queued",
                                    spec={"model": "mlp", "dataset": "blobs", "dataset_path": "blobs",
                                          "nproc": nproc}))
        supervisor.tick()
        assert supervisor.waiting_for(store.get_job("bobs")) == (
            "its start, put off: 1 free GPU(s): the GPUs freed go first to a job queued before it")
        assert supervisor.waiting_for(store.get_job("alices")) == (
            "its start, put off: 1 free GPU(s): the GPUs freed go first to a job queued before it, which waits for 2")
    finally:
        stop_runs(supervisor)
        store.close()


def _killed_while_stopping(supervisor: Supervisor, job_id: str, stop: str) -> JobRecord:
    """Start the job, have its stop under way (a user's, or the server's shutdown pause), then SIGKILL it from outside
    before it writes a result (the OOM killer while the stop's checkpoint is written)."""
    from trainmetrics.jobserver.supervisor import SHUTDOWN_PAUSE

    # Started with the stop signals blocked, as the server starts a trainer: one before its handlers waits for them.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGTERM))
    try:
        job = submit(supervisor, job_id, "transformer")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    (supervisor.checkpoint_dir(job_id) / "step-000000005.pt").write_bytes(b"earlier")
    if stop == SHUTDOWN_PAUSE:
        supervisor._pause_for_shutdown(job_id)
    else:
        supervisor.request_stop(job, stop)
    os.kill(supervisor.runs[job_id].pid, signal.SIGKILL)
    supervisor.runs[job_id].process.wait(timeout=10)
    supervisor.max_concurrent = 0       # a job queued to resume is looked at, not started again
    return settle(supervisor, job_id)


def test_a_run_killed_from_outside_during_the_servers_shutdown_pause_is_queued_to_resume(supervisor):
    """The server's own shutdown pause of a run the OOM killer killed while the pause's checkpoint was written ended
    the job `failed` ("killed by SIGKILL without a result"), not resumed at the next start, though the same death
    while the server was down queued it to resume from its last checkpoint (and a user's pause stood)."""
    ended = _killed_while_stopping(supervisor, "shut", "shutdown")
    assert (ended.state, ended.resume, ended.error, ended.exit_code) == ("queued", True, None, None)


@pytest.mark.parametrize("stop, code", [("paused", 4), ("cancelled", 3)])
def test_a_stop_that_stands_over_a_kill_ends_with_the_exit_code_of_its_state(supervisor, stop, code):
    """A pause or cancel accepted before a SIGKILL the server did not send stands, but its job kept the process's -9:
    `paused` with exit code -9, where an ended job's exit code is always one that stands for its state."""
    ended = _killed_while_stopping(supervisor, "stood", stop)
    assert (ended.state, ended.exit_code, ended.error) == (stop, code, None)


def test_a_cancel_accepted_after_the_pause_a_run_said_ends_with_a_cancels_exit_code(tmp_path):
    """A cancel accepted after a pause wins over the `paused` the run wrote, but the job kept its exit code 4:
    `cancelled` with a pause's exit code."""
    from trainmetrics.jobfiles import write_result

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    queue(supervisor, "both")
    supervisor.start(store.get_job("both"))
    store.update_job("both", requested="cancelled")
    write_result(supervisor.result_path("both"), {"state": "paused", "exit_code": 4})
    supervisor.tick()
    assert (store.get_job("both").state, store.get_job("both").exit_code) == ("cancelled", 3)
    store.close()


def test_a_run_that_paused_itself_for_a_loss_spike_during_the_servers_shutdown_pause_stays_paused(tmp_path):
    """A run that paused itself (a loss spike, its result's reason) while the server's shutdown pause was under way
    was taken for paused by the server: queued to resume at the next start, the spike's reason dropped, where a
    spike's pause waits for its user."""
    from trainmetrics.jobfiles import write_result
    from trainmetrics.jobserver.supervisor import SHUTDOWN_PAUSE

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    queue(supervisor, "spiked")
    supervisor.start(store.get_job("spiked"))
    store.update_job("spiked", requested=SHUTDOWN_PAUSE)
    write_result(supervisor.result_path("spiked"), {"state": "paused", "exit_code": 4,
                                                    "reason": "loss spike at step 85"})
    supervisor.max_concurrent = 0       # a job queued to resume is looked at, not started again
    supervisor.tick()
    ended = store.get_job("spiked")
    assert (ended.state, ended.resume, ended.exit_code, ended.reason) == ("paused", True, 4, "loss spike at step 85")
    store.close()


@pytest.mark.parametrize("requested, told, state", [(None, "cancelled", "failed"), (None, "paused", "failed"),
                                                    ("paused", "cancelled", "failed"), ("paused", "paused", "paused"),
                                                    ("cancelled", "cancelled", "cancelled")])
def test_a_multi_rank_job_whose_rank_0_was_stopped_after_another_rank_was_killed_without_a_result_failed(
        tmp_path, requested, told, state):
    """Rank 1 killed (the OOM killer, a crash) before it wrote a result; torchrun then stops rank 0 (SIGTERM), which
    says `cancelled`. Only a rank that said `failed` was taken for the cause: the job read as cancelled (or, its user
    having asked for a pause, cancelled for good), though nobody asked, rank 1's death unsaid. A stop the server sent
    stands."""
    from trainmetrics.jobfiles import write_result

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    queue(supervisor, "two", nproc=2)
    supervisor.start(store.get_job("two"))
    store.update_job("two", requested=requested)
    write_result(supervisor.result_path("two"), {"state": told, "exit_code": {"paused": 4, "cancelled": 3}[told]})
    supervisor.tick()
    ended = store.get_job("two")
    assert ended.state == state
    if state == "failed":
        assert ended.exit_code == 1 and ended.error.startswith("rank 1 ended without a result (killed or lost"), ended
    store.close()


@pytest.mark.parametrize("outcome", ["cancelled", "paused"])
def test_a_multi_rank_ray_run_stopped_before_ray_placed_its_ranks_ends_as_stopped_not_failed(tmp_path, outcome):
    """Stopped while Ray placed its ranks by a stop the server did not record as sent (`ray job stop`, a cancel; a
    server's pause whose record kept its mark of a stop not sent, the server killed before it cleared it), the
    launcher writes rank 0's result with no rank started, so no other rank writes one: that silence was taken for
    a rank killed without a result, and the job ended `failed` "cancelled by a stop the server did not send"."""
    from trainmetrics.jobserver.ray_launch import ended_before_start

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=Ending())
    queue(supervisor, "two", nproc=2)
    supervisor.start(store.get_job("two"))
    ended_before_start(supervisor.job_path("two"), outcome)
    supervisor.tick()
    ended = store.get_job("two")
    assert (ended.state, ended.exit_code, ended.error) == (outcome, {"cancelled": 3, "paused": 4}[outcome], None)
    store.close()
