"""A run's processes are all stopped when they must be: a cancel the job does not act on is carried out by a
kill after its grace (a pause never is), and the workers a dead launcher leaves behind are killed before the
run counts as ended. Real processes and signals, with a scripted stand-in for torchrun that starts its workers
in sessions of their own, as torch's elastic agent does (no torch: each case takes a second or two)."""

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from trainmetrics.jobserver.local import LocalExecutor
from trainmetrics.jobserver.store import JobRecord, JobStore
from trainmetrics.jobserver.supervisor import Supervisor

from .conftest import tick_until

# torchrun's stand-in: starts N workers (the script WORKER with `train ARGS`) each in a session of its own,
# waits for them and exits with the first one's code. It ignores the stop and stacks signals: the server never
# sends torchrun any (they would kill it), and this one's command line looks like a trainer's.
LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    nproc, args = int(sys.argv[1]), sys.argv[2:]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, *args], start_new_session=True)
               for _ in range(nproc)]
    sys.exit([worker.wait() for worker in workers][0])
""")
# A rank hung in C (a collective whose peer is gone): its stop handlers never run, so it stands for one by
# ignoring the stop signals.
HUNG_WORKER = textwrap.dedent("""
    import signal, time
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    time.sleep(60)
""")


class HungTorchrun(LocalExecutor):
    """Runs the launcher stand-in with hung workers instead of torchrun and `trainmetrics train`."""

    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        return [sys.executable, "-c", f"WORKER = {HUNG_WORKER!r}\n{LAUNCHER}", str(nproc), "train", *train_args]


def processes_naming(job_dir: Path) -> list[psutil.Process]:
    """The live processes with `--diagnostics-dir job_dir` in their command line (found here independently of
    the executor's own search)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        try:
            if str(job_dir) in command and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture
def supervisor(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=4, executor=HungTorchrun(), cancel_grace=1.0)
    yield supervisor
    for job in store.list_jobs():
        for process in processes_naming(supervisor.job_path(job.id)):
            process.kill()
    for run in supervisor.runs.values():
        run.process.wait()
    store.close()


def start_hung(supervisor: Supervisor, job_id: str) -> list[psutil.Process]:
    """Start a 2-rank job whose ranks hang; its launcher and both workers once they run."""
    supervisor.store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                       spec={"model": "mlp", "dataset": "blobs", "nproc": 2}))
    supervisor.tick()
    assert supervisor.store.get_job(job_id).state == "running"
    deadline = time.monotonic() + 20
    while len(processes := processes_naming(supervisor.job_path(job_id))) < 3:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    time.sleep(0.2)         # their handlers are installed
    return processes


def test_a_cancel_a_hung_job_does_not_act_on_kills_it_after_the_grace_and_it_ends_cancelled(supervisor, caplog):
    processes = start_hung(supervisor, "hung-cancel")
    supervisor.request_stop(supervisor.store.get_job("hung-cancel"), "cancelled")
    accepted = time.monotonic()
    assert tick_until(supervisor, "hung-cancel", 0.7).state == "running"        # within the grace: it may stop
    with caplog.at_level("INFO", logger="trainmetrics.server"):
        ended = tick_until(supervisor, "hung-cancel", 10)
    assert (ended.state, ended.error, ended.requested) == ("cancelled", None, None)
    assert 1.0 <= time.monotonic() - accepted < 5
    assert not [process for process in processes if process.is_running() and
                process.status() != psutil.STATUS_ZOMBIE]
    assert "killed after it did not stop within 1 s of its cancel" in caplog.text
    assert supervisor.running_count() == 0


def test_a_cancel_accepted_before_a_server_restart_is_killed_a_grace_after_the_adoption(supervisor, caplog):
    """No test held that the cancel's grace counts again from the adoption: a job cancelled before the server
    restarted, hung past its grace, must be neither killed by the restarted server at once nor left running."""
    processes = start_hung(supervisor, "hung-restart")
    supervisor.request_stop(supervisor.store.get_job("hung-restart"), "cancelled")
    time.sleep(1.2)                      # the grace since the cancel runs out while no server watches the job
    again = Supervisor(supervisor.store, supervisor.data_dir, None, max_concurrent=0, executor=HungTorchrun(),
                       cancel_grace=1.0)
    again.recover()
    assert "hung-restart" in again.runs
    again.tick()
    assert again.store.get_job("hung-restart").state == "running"       # a fresh grace from the adoption
    assert len(processes_naming(supervisor.job_path("hung-restart"))) == len(processes)
    with caplog.at_level("INFO", logger="trainmetrics.server"):
        ended = tick_until(again, "hung-restart", 10)
    assert (ended.state, ended.error, ended.requested) == ("cancelled", None, None)
    assert processes_naming(supervisor.job_path("hung-restart")) == []
    assert "killed after it did not stop within 1 s of its cancel" in caplog.text


def test_a_pause_is_never_killed(supervisor):
    start_hung(supervisor, "hung-pause")
    supervisor.request_stop(supervisor.store.get_job("hung-pause"), "paused")
    assert tick_until(supervisor, "hung-pause", 1.5).state == "running"         # it must leave a checkpoint
    assert len(processes_naming(supervisor.job_path("hung-pause"))) == 3


def test_the_workers_a_killed_launcher_leaves_are_killed_before_the_job_ends(supervisor):
    start_hung(supervisor, "launcher-killed")
    supervisor.runs["launcher-killed"].process.send_signal(signal.SIGKILL)
    ended = tick_until(supervisor, "launcher-killed", 10)
    assert (ended.state, ended.error) == ("failed", "killed by SIGKILL without a result")
    assert processes_naming(supervisor.job_path("launcher-killed")) == []        # none trains beside a resume


def test_the_workers_of_a_launcher_gone_with_the_server_are_killed_at_the_restart(supervisor):
    start_hung(supervisor, "gone-with-server")
    launcher = supervisor.runs.pop("gone-with-server").process      # both died, the server first: no poll
    launcher.kill()
    launcher.wait()
    again = Supervisor(supervisor.store, supervisor.data_dir, None, max_concurrent=0, executor=HungTorchrun())
    again.recover()
    assert supervisor.store.get_job("gone-with-server").state == "failed"       # no checkpoint to resume from
    assert processes_naming(supervisor.job_path("gone-with-server")) == []


# A server that orphans come to (a container's pid 1; here a subreaper, which the kernel treats alike): it
# cancels a hung 2-rank job, kills it after the grace, ticks on, and prints its children that are zombies.
REAPER_SERVER = textwrap.dedent("""
    import ctypes, sys, time
    from pathlib import Path
    import psutil
    from tests.jobserver.test_escalation import HungTorchrun
    from trainmetrics.jobserver.store import JobRecord, JobStore
    from trainmetrics.jobserver.supervisor import Supervisor

    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1) == 0      # PR_SET_CHILD_SUBREAPER
    store = JobStore(Path(sys.argv[1]) / "db.sqlite")
    supervisor = Supervisor(store, Path(sys.argv[1]), None, max_concurrent=1, executor=HungTorchrun(),
                            cancel_grace=0.5)
    store.add_job(JobRecord(id="hung", owner="default", name="hung", state="queued",
                            spec={"model": "mlp", "dataset": "blobs", "nproc": 2}))
    supervisor.tick()
    while len(psutil.Process(supervisor.runs["hung"].pid).children()) < 2:
        time.sleep(0.05)
    supervisor.request_stop(store.get_job("hung"), "cancelled")
    deadline = time.monotonic() + 20
    while store.get_job("hung").state == "running" and time.monotonic() < deadline:
        supervisor.tick()
        time.sleep(0.05)
    supervisor.tick()
    print(store.get_job("hung").state, [child.pid for child in psutil.Process().children()
                                        if child.status() == psutil.STATUS_ZOMBIE])
""")


def test_a_server_that_orphans_come_to_leaves_no_zombie_of_a_killed_job(tmp_path):
    """A job server that is pid 1 (the first process of a container) gets the orphans of its jobs: the ranks a
    killed torchrun leaves. Killed by the server (a cancel past its grace), each stayed a zombie for the server's
    life, as nothing but the launchers' Popen was ever waited for."""
    if not sys.platform.startswith("linux"):
        pytest.skip("child subreapers are Linux's")
    repository = Path(__file__).resolve().parents[2]
    said = subprocess.run([sys.executable, "-c", REAPER_SERVER, str(tmp_path)], cwd=repository, timeout=60,
                          capture_output=True, text=True)
    assert said.returncode == 0, said.stderr
    assert said.stdout.split(None, 1) == ["cancelled", "[]\n"]
    assert processes_naming(tmp_path / "jobs" / "hung") == []


# A trainer with a forked child, as a DataLoader worker is: the same command line, its parent the trainer.
FORKING_TRAINER = textwrap.dedent("""
    import os, time
    os.fork()
    time.sleep(60)
""")


class ForkingTrainer(LocalExecutor):
    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        return [sys.executable, "-c", FORKING_TRAINER, "train", *train_args]


def test_a_stop_goes_to_the_trainer_not_to_the_workers_it_forked(tmp_path):
    """A DataLoader worker has its trainer's command line: a cancel's SIGTERM went to it too, torch's handler in
    the worker made it exit, and the trainer failed ("DataLoader worker exited unexpectedly") instead of ending
    cancelled."""
    from trainmetrics.jobserver.local import _trainer_processes

    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=1, executor=ForkingTrainer())
    store.add_job(JobRecord(id="forking", owner="default", name="forking", state="queued",
                            spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    try:
        supervisor.tick()
        deadline = time.monotonic() + 20
        while len(processes_naming(supervisor.job_path("forking"))) < 2:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        run = supervisor.runs["forking"]
        assert [process.pid for process in _trainer_processes(run)] == [run.pid]
    finally:
        for process in processes_naming(supervisor.job_path("forking")):
            process.kill()
        for run in supervisor.runs.values():
            run.process.wait()
        store.close()


def test_a_runs_processes_are_found_by_their_exact_job_directory(tmp_path):
    from trainmetrics.jobserver.executors import Run
    from trainmetrics.jobserver.local import kill_processes, run_processes

    job_dir = tmp_path / "data" / "jobs" / "j1"

    def sleeper(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args, "train", "j1"])

    ours = [sleeper("--diagnostics-dir", str(job_dir)), sleeper(f"--diagnostics-dir={job_dir}")]
    others = [sleeper("--diagnostics-dir", f"{job_dir}-2"),                      # another job's directory
              sleeper("--diagnostics-dir", str(tmp_path / "other-data" / "jobs" / "j1")),   # another server's j1
              sleeper("--job-dir", str(job_dir))]                               # the directory, not as the job's
    try:
        found = run_processes(Run("j1", None, job_dir))
        assert sorted(process.pid for process in found) == sorted(process.pid for process in ours)
        assert kill_processes(found) == []
        assert [process.wait(10) for process in ours] == [-signal.SIGKILL] * 2
        assert all(process.poll() is None for process in others)
    finally:
        for process in ours + others:
            process.kill()
            process.wait()


def test_a_runs_processes_are_killed_together_so_none_sees_anothers_death(tmp_path):
    """A rank killed a moment after another saw its peer reset the connection and wrote a failed result (a
    killed torchrun's job said "rank 1: Connection reset by peer" beside its SIGKILL). Here the first kill is
    followed by a pause (the server's thread losing the CPU) long enough for the second to notice."""
    from trainmetrics.jobserver.local import kill_processes

    said = tmp_path / "said"
    peer = ("import socket, sys, time\n"
            "sock = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "sock.recv(1)\n"
            "open(sys.argv[2], 'w').write('my peer went away')\n"
            "time.sleep(60)\n")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        watcher = subprocess.Popen([sys.executable, "-c", peer, str(listener.getsockname()[1]), str(said)])
        connection, _ = listener.accept()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[connection.fileno()])
    connection.close()                           # the holder's copy is the only one: its death closes it

    class SlowToKill(psutil.Process):
        def kill(self) -> None:
            super().kill()
            time.sleep(1.0)

    try:
        assert kill_processes([SlowToKill(holder.pid), psutil.Process(watcher.pid)]) == []
        assert [holder.wait(10), watcher.wait(10)] == [-signal.SIGKILL] * 2
        assert not said.exists()
    finally:
        for process in (holder, watcher):
            process.kill()
            process.wait()


def test_another_users_process_naming_the_job_directory_is_neither_signalled_nor_waited_for(tmp_path):
    """Command lines are public: a process of another user naming the job's directory was found, its kill
    refused (AccessDenied) was taken for a survivor, and the run never ended (a 2 s wait on every tick); a
    signal to it raised (a pause or cancel answered 500)."""
    import os

    from trainmetrics.jobserver.executors import Run
    from trainmetrics.jobserver.local import LocalExecutor, run_processes

    if os.geteuid() != 0:
        pytest.skip("starting another user's process needs root")
    job_dir = tmp_path / "data" / "jobs" / "j1"
    planted = subprocess.Popen(["/bin/sh", "-c", "sleep 60", "train", "j1", "--diagnostics-dir", str(job_dir)],
                               user="nobody", cwd="/")
    try:
        time.sleep(0.3)
        run = Run("j1", None, job_dir)
        assert run_processes(run) == []
        executor = LocalExecutor()
        assert executor.signal(run, "cancelled") is False
        began = time.monotonic()
        assert executor.poll(Run("j1", "1", job_dir, pid=planted.pid)) == (True, None)   # not its launcher either
        assert time.monotonic() - began < 1 and planted.poll() is None
    finally:
        planted.kill()
        planted.wait()


def test_a_launcher_is_known_by_its_job_directory_not_its_job_id_alone(tmp_path):
    """A pid reused by another server's job of the same id was adopted as this job's launcher (and a cancel
    then signalled, and 60 s later killed, that other job)."""
    from trainmetrics.jobserver.local import LocalExecutor

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train", "nightly",
                              "--diagnostics-dir", str(tmp_path / "other-server" / "jobs" / "nightly")])
    try:
        time.sleep(0.3)
        assert LocalExecutor().adopt("nightly", str(other.pid), tmp_path / "data" / "jobs" / "nightly") is None
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


class Stopping:
    """A Jobs API client (error mapping only) whose stop_job raises `error`, or takes the stop."""

    def __init__(self, error: Exception | None = None):
        self.error, self.stopped = error, []

    def stop_job(self, submission):
        if self.error is not None:
            raise self.error
        self.stopped.append(submission)
        return True


def test_ray_kills_a_run_by_its_stop_and_is_asked_again_when_it_did_not_answer(tmp_path, monkeypatch):
    import requests

    from trainmetrics.jobserver import ray_executor
    from trainmetrics.jobserver.executors import Run
    from trainmetrics.jobserver.ray_executor import RayExecutor

    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 0.0)
    ray, run = RayExecutor("http://127.0.0.1:8265"), Run("job-1", "ray-1", tmp_path)
    ray._client = Stopping()
    assert ray.kill(run) is True and ray._client.stopped == ["ray-1"]
    ray._client = Stopping(RuntimeError("Request failed with status code 404: Job ray-1 does not exist."))
    assert ray.kill(run) is True                # gone from Ray: polling ends it
    ray._client = Stopping(requests.exceptions.ConnectionError("Connection refused"))
    assert ray.kill(run) is False               # the supervisor asks again at a later tick


# A reaping server whose launcher's Popen cannot collect its exit now (another thread waits for it): reap() looked
# at that launcher again and again (waitid without collecting finds it first every time), and, having forgotten it,
# collected it at the next tick as an orphan's, its exit code lost (Popen reads a child collected elsewhere as 0).
BUSY_LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, threading
    from trainmetrics.jobserver.local import LocalExecutor

    executor = LocalExecutor()
    executor._reaper = True                 # as in a container's pid 1: its children are ours to collect
    launcher = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    executor._launchers[launcher.pid] = launcher
    os.waitid(os.P_PID, launcher.pid, os.WEXITED | os.WNOWAIT)     # ended, not collected
    launcher.poll = lambda: None            # its Popen busy in another thread's wait
    for _ in range(2):                      # two ticks
        tick = threading.Thread(target=executor.reap, daemon=True)
        tick.start()
        tick.join(timeout=5)
        assert not tick.is_alive(), "reap() went round for ever"
    del launcher.poll
    print(launcher.wait(timeout=5))
""")


def test_a_launcher_whose_exit_its_popen_cannot_collect_now_is_left_to_it(tmp_path):
    repository = Path(__file__).resolve().parents[2]
    said = subprocess.run([sys.executable, "-c", BUSY_LAUNCHER], cwd=repository, timeout=60, capture_output=True,
                          text=True)
    assert said.returncode == 0, said.stderr[-2000:]
    assert said.stdout == "7\n"
