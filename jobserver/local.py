"""The local executor: each job is `trainmetrics train` child processes on this machine (torchrun's workers
for nproc > 1), each in its own session so a Ctrl-C to the server does not reach it.

torch's elastic agent starts its workers in sessions of their own too, so they are neither in the launcher's
session nor, once the launcher died, under it: a run's processes are found by the job's own directory in
their command line (run_processes), and a launcher's end kills the workers it left (no launcher is left to
restart or stop them, and a resume must never train beside them)."""

import contextlib
import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from trainmetrics.contract import STACKS_SIGNAL, STOP_SIGNALS
from trainmetrics.jobfiles import CONTROL_FILE_NAME, LOG_NAME, control_request, replace_atomically
from trainmetrics.jobserver.executors import Run, StartDeferred

log = logging.getLogger("trainmetrics.server")

# How every trainer process of a job-server job names its job's directory in its command line.
JOB_DIR_FLAG = "--diagnostics-dir"
# A killed process is waited for this long (SIGKILL takes effect at once, except in an uninterruptible wait).
KILL_WAIT_SECONDS = 2.0
# prctl(2): whether this process is a child subreaper (its descendants' orphans become its children; Linux).
PR_GET_CHILD_SUBREAPER = 37


class LocalExecutor:
    """Starts, polls and signals job processes on this machine."""

    name = "local"

    def __init__(self):
        # The launchers this executor started whose exit no Popen has collected yet, by pid (reap()).
        self._launchers: dict[int, subprocess.Popen] = {}
        self._reaper = _orphans_come_here()

    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        """The full command line: `trainmetrics train ARGS`, under torchrun for several processes."""
        launcher = [sys.executable, "-m", "trainmetrics"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "trainmetrics"]
        return [*launcher, "train", *train_args]

    def clear_way(self, job_id: str, job_dir: Path) -> None:
        """Kill a process of the job left running: a server killed between starting a run and recording it (the
        job still queued) left it unsupervised, and the job would have run twice. Killed before the new run's
        arguments are built: a checkpoint it wrote until then makes the new run resume. One that survives SIGKILL
        (stuck in the kernel: a hung network file system) puts off this job's start alone: the executor itself
        can start the jobs behind it."""
        if not _kill_leftovers(Run(job_id, None, job_dir, None), "an earlier start that no server recorded left"):
            raise StartDeferred(f"a process of job {job_id} left running by an earlier start survived SIGKILL; "
                                "the start is tried again")

    def start(self, job_id: str, nproc: int, train_args: list[str], job_dir: Path, env: dict[str, str]) -> Run:
        """Start the job's process with its output appended to job_dir/train.log and `env` added to its
        environment (clear_way first)."""
        with open(job_dir / LOG_NAME, "ab") as log_file:
            process = subprocess.Popen(self.command(nproc, train_args), stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env})
        self._launchers[process.pid] = process
        return Run(job_id, str(process.pid), job_dir, process.pid, process)

    def check(self) -> dict:
        """Nothing to reach: processes start on this machine."""
        return {"executor": "local"}

    def adopt(self, job_id: str, handle: str | None, job_dir: Path) -> Run | None:
        """The job's process left running by a previous server, if it still runs (pids get reused), with the stop
        that server held for its workers (poll sends it). Workers whose launcher is gone are killed: the job is
        not running, and whatever comes next must not run beside them."""
        pid = int(handle) if handle and handle.isdigit() else None
        run = Run(job_id, handle, job_dir, pid)
        if pid and _job_process(pid, job_id, job_dir) is not None:
            held = control_request(job_dir)
            run.undelivered = STOP_SIGNALS[held] if held is not None else None
            return run
        _kill_leftovers(run)
        return None

    def poll(self, run: Run) -> tuple[bool, int | None]:
        """(ended, exit code): the code is negative for a signal, None when not known (an adopted process). A
        run whose launcher ended has ended once the trainer processes it left are killed."""
        if run.process is not None:
            code = run.process.poll()
            ended = code is not None
            if ended:
                self._launchers.pop(run.process.pid, None)
        else:
            ended, code = _job_process(run.pid, run.job_id, run.job_dir) is None, None
        if ended and not _kill_leftovers(run):
            return False, None      # one survived its SIGKILL for now: asked again at the next poll
        if not ended and run.undelivered is not None and _send(run, run.undelivered):
            _hold(run, None)
        return ended, code

    def signal(self, run: Run, outcome: str) -> bool:
        """Ask the job to stop at its next step boundary (pause: SIGUSR1, cancel: SIGTERM); True when a signal
        reached a trainer process, or will: under torchrun the workers get it (the launcher would die of
        SIGUSR1), and until torchrun has started them it is kept for them (poll sends it). They start with the
        stop signals blocked, as the launcher does, so a signal that comes before their handlers waits for them.
        Refused (409) there, a stop right after a multi-rank job's start was lost, and the job trained on."""
        if _send(run, STOP_SIGNALS[outcome]):
            _hold(run, None)
            return True
        if _job_process(run.pid, run.job_id, run.job_dir) is None:      # the launcher is gone: the run is ending
            return False
        _hold(run, outcome)
        return True

    def kill(self, run: Run) -> bool:
        """SIGKILL to every process of the run, the launcher first (so it restarts no worker); poll tells when
        they are gone."""
        kill_processes(run_processes(run))
        return True

    def abandon(self, job_id: str, job_dir: Path) -> None:
        """A local start either started the process or raised; a process of the job a server killed before it
        recorded the run left running is killed (as clear_way would, had the job started again)."""
        _kill_leftovers(Run(job_id, None, job_dir, None), "an earlier start that no server recorded left")

    def request_stacks(self, run: Run) -> bool:
        """SIGUSR2 to every trainer process of the job (never to torchrun, which it would kill)."""
        return _send(run, STACKS_SIGNAL)

    def reap(self) -> None:
        """Collect the exit of every process of a job that ended as this server's child without being one it
        started: where the server is pid 1 (a container's first process) or a subreaper, the ranks a killed
        torchrun leaves and a killed rank's DataLoader workers become its children, and each one that ended (the
        kill of a cancel past its grace, of a dead launcher's leftovers) stayed a zombie for the server's life,
        one pid each. A launcher's exit is left to its Popen (poll reads its exit code there). Nothing to do
        elsewhere: orphans go to init, and the server's only children are the launchers."""
        if not self._reaper:
            return
        seen = set()
        while True:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)     # looked at, not collected
            except ChildProcessError:
                return
            # (One seen again was not collected: a launcher whose Popen another thread was waiting for. Looked at
            # again, it would be found first for ever: this tick's reaping stops there, the next one tries again.)
            if ended is None or ended.si_pid in seen:
                return
            seen.add(ended.si_pid)
            launcher = self._launchers.get(ended.si_pid)
            if launcher is not None:
                # Forgotten only once its Popen has its exit: collected here as an orphan's, its code would be lost
                # (Popen reads a child already collected as exit code 0).
                if launcher.poll() is not None:
                    del self._launchers[ended.si_pid]
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(ended.si_pid, os.WNOHANG)


def run_processes(run: Run) -> list[psutil.Process]:
    """Every live process of the run, its launcher first: the launcher while it lives, and every process that
    names the job's directory in its command line (torchrun's workers, under it or left behind by it), with
    their children. By the directory, not the job id: another server's job may share the id, never the
    directory; and only this server's user's processes (command lines are public: anyone could start one
    naming the directory, to be signalled, or to make a kill fail and the run never end)."""
    found: dict[int, psutil.Process] = {}
    launcher = _job_process(run.pid, run.job_id, run.job_dir) if run.pid else None
    roots = [launcher] if launcher else []
    uid = os.getuid()
    roots += [process for process in psutil.process_iter(["cmdline", "uids"])
              if process.info["uids"] is not None and process.info["uids"].real == uid
              and names_job_dir(process.info["cmdline"] or [], run.job_dir)]
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in family:
            found.setdefault(process.pid, process)
    return [process for process in found.values() if _alive(process) and _ours(process, uid)]


def names_job_dir(command: list[str], job_dir: Path) -> bool:
    """True when a command line passes exactly `job_dir` as the job's directory."""
    wanted = str(job_dir)
    return f"{JOB_DIR_FLAG}={wanted}" in command or any(
        flag == JOB_DIR_FLAG and value == wanted for flag, value in zip(command, command[1:]))


def kill_processes(processes: list[psutil.Process], wait: float = KILL_WAIT_SECONDS) -> list[psutil.Process]:
    """SIGKILL to each process in turn, after SIGSTOP to all of them: a rank left running for a moment after its
    peer's kill saw the connection reset and wrote a failed result, and a killed launcher's job then blamed
    "Connection reset by peer" (a stopped process writes nothing; SIGKILL ends it stopped). The ones still alive
    after `wait` seconds."""
    refused = set()
    for stop in ("suspend", "kill"):
        for process in processes:
            try:
                getattr(process, stop)()
            except psutil.NoSuchProcess:
                pass
            except psutil.AccessDenied:     # not ours after all (run_processes keeps ours): not waited for
                refused.add(process.pid)
    deadline = time.monotonic() + wait
    alive = [process for process in processes if process.pid not in refused and _alive(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [process for process in alive if _alive(process)]
    return alive


def _kill_leftovers(run: Run, left_by: str = "its launcher ended and left") -> bool:
    """Kill the run's processes left running (`left_by` says whose: a launcher that ended, for a single process
    nothing, it was the trainer; or an earlier start no server recorded); True when nothing is left."""
    leftovers = run_processes(run)
    if not leftovers:
        return True
    log.warning("job %s: %s trainer processes %s running: killed", run.job_id, left_by,
                ", ".join(str(process.pid) for process in leftovers))
    return not kill_processes(leftovers)


def _hold(run: Run, outcome: str | None) -> None:
    """Hold a stop for the run's trainer processes until they exist (None: the one held is sent), in the run and
    in the job's control file, which the next server's adopt() reads: held in memory only, it died with a server
    killed meanwhile, and the restart adopted the job without it (it trained on, its stop recorded as under way).
    Forgotten in both once sent: a trainer gets one stop signal (a second cuts its final linger short)."""
    path = run.job_dir / CONTROL_FILE_NAME
    if outcome is not None:
        replace_atomically(path, outcome)       # raises (a full disk): nothing held, and the stop not recorded
        run.undelivered = STOP_SIGNALS[outcome]
    elif run.undelivered is not None:
        run.undelivered = None
        with contextlib.suppress(OSError):      # gone already, or a directory the job put there (no stop)
            path.unlink()


def _orphans_come_here() -> bool:
    """True when the orphans of this process's descendants become its children: it is pid 1 (of its pid
    namespace: a container's first process) or a child subreaper."""
    if os.getpid() == 1:
        return True
    try:
        flag = ctypes.c_int(0)
        return ctypes.CDLL(None, use_errno=True).prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag)) == 0 and \
            flag.value != 0
    except (AttributeError, OSError):        # no prctl (not Linux)
        return False


def _alive(process: psutil.Process) -> bool:
    """True until the process has exited (a zombie has: it only waits to be reaped)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _send(run: Run, signum: int) -> bool:
    """Send a signal to the run's trainer processes; True when one got it."""
    sent = False
    for process in _trainer_processes(run):
        try:
            process.send_signal(signum)
            sent = True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sent


def _job_process(pid: int, job_id: str, job_dir: Path) -> psutil.Process | None:
    """The live process pid when it is this job's (its launcher or its trainer: its command line names the job
    and this server's directory of it, and it runs as this server's user), else None (pids get reused, job ids
    are shared between servers, command lines are public)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        command = process.cmdline()
        mine = job_id in command and names_job_dir(command, job_dir) and _ours(process, os.getuid())
        return process if mine else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _ours(process: psutil.Process, uid: int) -> bool:
    """True when the process runs as `uid` (a child of ours that changed its user is not ours to kill)."""
    try:
        return process.uids().real == uid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _trainer_processes(run: Run) -> list[psutil.Process]:
    """The job's `trainmetrics train` processes: the process itself, or torchrun's workers. Not a trainer's own
    forked children (its DataLoader workers), whose command line is the trainer's: a SIGTERM kills one (torch's
    handler in a worker), and the job sent it to be cancelled failed ("DataLoader worker exited
    unexpectedly")."""
    found = {}
    for process in run_processes(run):
        try:
            command = process.cmdline()
            if run.job_id in command and "train" in command and "torch.distributed.run" not in command:
                found[process.pid] = (process, process.ppid())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [process for process, parent in found.values() if parent not in found]
