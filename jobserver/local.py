"""The local executor: each job is `trainmetrics train` child processes on this machine (torchrun's workers
for nproc > 1), each in its own session so a Ctrl-C to the server does not reach it."""

import os
import subprocess
import sys
from pathlib import Path

import psutil

from trainmetrics.contract import STACKS_SIGNAL, STOP_SIGNALS
from trainmetrics.jobfiles import LOG_NAME
from trainmetrics.jobserver.executors import Run


class LocalExecutor:
    """Starts, polls and signals job processes on this machine."""

    name = "local"

    def command(self, nproc: int, train_args: list[str]) -> list[str]:
        """The full command line: `trainmetrics train ARGS`, under torchrun for several processes."""
        launcher = [sys.executable, "-m", "trainmetrics"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "trainmetrics"]
        return [*launcher, "train", *train_args]

    def start(self, job_id: str, nproc: int, train_args: list[str], job_dir: Path, env: dict[str, str]) -> Run:
        """Start the job's process with its output appended to job_dir/train.log and `env` added to its
        environment."""
        with open(job_dir / LOG_NAME, "ab") as log_file:
            process = subprocess.Popen(self.command(nproc, train_args), stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env})
        return Run(job_id, str(process.pid), job_dir, process.pid, process)

    def check(self) -> dict:
        """Nothing to reach: processes start on this machine."""
        return {"executor": "local"}

    def adopt(self, job_id: str, handle: str | None, job_dir: Path) -> Run | None:
        """The job's process left running by a previous server, if it still runs (pids get reused)."""
        pid = int(handle) if handle and handle.isdigit() else None
        return Run(job_id, handle, job_dir, pid) if pid and _is_job_process(pid, job_id) else None

    def poll(self, run: Run) -> tuple[bool, int | None]:
        """(ended, exit code): the code is negative for a signal, None when not known (an adopted process)."""
        if run.process is not None:
            code = run.process.poll()
            return code is not None, code
        return not _is_job_process(run.pid, run.job_id), None

    def signal(self, run: Run, outcome: str) -> bool:
        """Ask the job to stop at its next step boundary (pause: SIGUSR1, cancel: SIGTERM); True when a signal
        reached a trainer process. Under torchrun the workers get it (the launcher would die of SIGUSR1)."""
        return _send(run, STOP_SIGNALS[outcome])

    def abandon(self, job_id: str, job_dir: Path) -> None:
        """A local start either started the process or raised: nothing is left behind."""

    def request_stacks(self, run: Run) -> bool:
        """SIGUSR2 to every trainer process of the job (never to torchrun, which it would kill)."""
        return _send(run, STACKS_SIGNAL)


def _send(run: Run, signum: int) -> bool:
    """Send a signal to the run's trainer processes; True when one got it."""
    sent = False
    for process in _trainer_processes(run.pid, run.job_id) if run.pid else []:
        try:
            process.send_signal(signum)
            sent = True
        except psutil.NoSuchProcess:
            pass
    return sent


def _is_job_process(pid: int, job_id: str) -> bool:
    """True when pid is alive and is this job's trainer (pids get reused)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and job_id in process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _trainer_processes(pid: int, job_id: str) -> list[psutil.Process]:
    """The job's `trainmetrics train` processes: the process itself, or torchrun's workers under it."""
    try:
        root = psutil.Process(pid)
        candidates = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in candidates:
        try:
            command = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if job_id in command and "train" in command and "torch.distributed.run" not in command:
            found.append(process)
    return found
