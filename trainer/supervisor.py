"""Runs the job server's jobs: one `trainmetrics train` child process per job, queued beyond a limit.

The supervisor owns every state change that follows a process: it starts queued jobs, reaps exited
ones (exit code → state), adopts jobs that survived a server restart, and resumes jobs whose process
died with the server (from their last checkpoint, or marks them failed when there is none).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from trainer.checkpoint import FINAL_MODEL_NAME, list_checkpoints
from trainer.jobstore import JobRecord, JobStore

log = logging.getLogger("trainmetrics.server")

# `trainmetrics train` exit codes → job states (see trainer/runner.py).
EXIT_STATES = {0: "completed", 1: "failed", 2: "failed", 3: "cancelled", 4: "paused"}


class Supervisor:
    """Starts, watches and signals the job processes."""

    def __init__(self, store: JobStore, data_dir: Path, targets_dir: Path | None, job_dir: Path | None,
                 max_concurrent: int, linger_timeout: float = 15.0):
        self.store = store
        self.data_dir = Path(data_dir)
        self.targets_dir = targets_dir
        self.job_dir = job_dir
        self.max_concurrent = max_concurrent
        self.linger_timeout = linger_timeout
        self.children: dict[str, subprocess.Popen] = {}   # started by this server
        self.adopted: dict[str, int] = {}                  # running jobs that outlived a previous server
        self.stop_requests: dict[str, str] = {}            # job id → "cancelled" / "paused"

    def job_path(self, job_id: str) -> Path:
        """The job's own directory (checkpoints, final model, log)."""
        return self.data_dir / "jobs" / job_id

    def checkpoint_dir(self, job_id: str) -> Path:
        """Where the job's checkpoints and model.pt go."""
        return self.job_path(job_id) / "checkpoints"

    def log_path(self, job_id: str) -> Path:
        """The job process's stdout and stderr."""
        return self.job_path(job_id) / "train.log"

    # ----- starting ----------------------------------------------------------------------------------
    def command(self, job: JobRecord) -> list[str]:
        """The `trainmetrics train` command line for a job."""
        spec = job.spec
        launcher = [sys.executable, "-m", "trainmetrics"]
        if spec.get("nproc", 1) > 1:     # one process per rank under torchrun, one job id
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={spec['nproc']}", "-m", "trainmetrics"]
        command = [*launcher, "train", "--job-id", job.id, "--job-name", job.name,
                   "--owner", job.owner, "--model", spec["model"], "--dataset", spec["dataset_path"],
                   "--epochs", str(spec["epochs"]), "--batch-size", str(spec["batch_size"]), "--lr", str(spec["lr"]),
                   "--device", spec["device"], "--seed", str(spec["seed"]), "--log-every", str(spec["log_every"]),
                   "--checkpoint-dir", str(self.checkpoint_dir(job.id)),
                   "--checkpoint-every", str(spec["checkpoint_every"]),
                   "--linger-timeout", str(self.linger_timeout)]
        if spec.get("target"):
            command += ["--target", spec["target"]]
        if spec.get("upload_seconds") is not None:
            command += ["--upload-seconds", str(spec["upload_seconds"])]
        if self.targets_dir is not None:
            command += ["--targets-dir", str(self.targets_dir)]
        if self.job_dir is not None:
            command += ["--job-dir", str(self.job_dir)]
        if job.resume:
            command.append("--resume")
        return command

    def start(self, job: JobRecord) -> None:
        """Start the job's process (its own session: a Ctrl-C to the server does not reach it)."""
        self.checkpoint_dir(job.id).mkdir(parents=True, exist_ok=True)
        with open(self.log_path(job.id), "ab") as log_file:
            process = subprocess.Popen(self.command(job), stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[job.id] = process
        self.store.update_job(job.id, state="running", pid=process.pid, started=job.started or time.time(),
                              exit_code=None, error=None)
        log.info("job %s: started pid %d%s", job.id, process.pid, " (resuming)" if job.resume else "")

    # ----- watching ----------------------------------------------------------------------------------
    def running_count(self) -> int:
        """Job processes alive now."""
        return len(self.children) + len(self.adopted)

    def tick(self) -> None:
        """Reap exited processes, then start queued jobs while there is room."""
        for job_id, process in list(self.children.items()):
            code = process.poll()
            if code is not None:
                del self.children[job_id]
                self._finished(job_id, code)
        for job_id, pid in list(self.adopted.items()):
            if not _is_job_process(pid, job_id):
                del self.adopted[job_id]
                self._adopted_finished(job_id)
        for job in self.store.list_jobs(states=("queued",)):
            if self.running_count() >= self.max_concurrent:
                break
            self.start(job)

    def _finished(self, job_id: str, code: int) -> None:
        requested = self.stop_requests.pop(job_id, None)
        summary = _summary(self.log_path(job_id))
        if self.store.get_job(job_id).spec.get("nproc", 1) > 1 and code > 0 and summary:
            # torchrun turns any worker's non-zero exit into its own 1: rank 0's summary has the job's state.
            code = {state: exit_code for exit_code, state in EXIT_STATES.items()}.get(summary["state"], code)
        if code < 0:     # killed by a signal: what we asked for, else a failure
            state = requested or "failed"
            error = None if requested else f"killed by {signal.Signals(-code).name}"
        else:
            state = EXIT_STATES.get(code, "failed")
            error = None if state != "failed" else _last_error(self.log_path(job_id)) or f"exit code {code}"
        self.store.update_job(job_id, state=state, exit_code=code, error=error,
                              ended=time.time() if state != "paused" else None, resume=state == "paused")
        log.info("job %s: %s (exit code %d)", job_id, state, code)

    def _adopted_finished(self, job_id: str) -> None:
        summary = _summary(self.log_path(job_id))
        if summary and summary.get("state") in EXIT_STATES.values():
            state = summary["state"]
            self.store.update_job(job_id, state=state, ended=summary.get("end_time"), resume=state == "paused",
                                  error=summary.get("error_type"))
        else:
            self._resume_or_fail(self.store.get_job(job_id), "its process died")

    def _resume_or_fail(self, job: JobRecord, why: str) -> None:
        if list_checkpoints(self.checkpoint_dir(job.id)):
            self.store.update_job(job.id, state="queued", resume=True, pid=None)
            log.warning("job %s: %s; queued to resume from its last checkpoint", job.id, why)
        else:
            self.store.update_job(job.id, state="failed", error=f"{why} before its first checkpoint",
                                  ended=time.time())
            log.warning("job %s: %s and had no checkpoint: failed", job.id, why)

    def recover(self) -> None:
        """After a (re)start: adopt running jobs whose process lives on, resume or fail the others."""
        for job in self.store.list_jobs(states=("running",)):
            if job.pid and _is_job_process(job.pid, job.id):
                self.adopted[job.id] = job.pid
                log.info("job %s: still running as pid %d, adopted", job.id, job.pid)
            else:
                summary = _summary(self.log_path(job.id))
                if summary and summary.get("state") in EXIT_STATES.values() and summary["state"] != "failed":
                    self.store.update_job(job.id, state=summary["state"], ended=summary.get("end_time"),
                                          resume=summary["state"] == "paused")
                else:
                    self._resume_or_fail(job, "the server restarted and its process was gone")

    # ----- signalling --------------------------------------------------------------------------------
    def request_stop(self, job_id: str, outcome: str) -> bool:
        """Ask a running job to stop at its next step boundary (pause: SIGUSR1, cancel: SIGTERM).

        The signal goes to the trainer processes themselves: under torchrun, its workers (the launcher
        would die of SIGUSR1); the ranks agree on the step to stop at."""
        pid = self.children[job_id].pid if job_id in self.children else self.adopted.get(job_id)
        if pid is None:
            return False
        self.stop_requests[job_id] = outcome
        sent = False
        for process in _trainer_processes(pid, job_id):
            try:
                process.send_signal(signal.SIGUSR1 if outcome == "paused" else signal.SIGTERM)
                sent = True
            except psutil.NoSuchProcess:
                pass
        return sent

    def is_active(self, job_id: str) -> bool:
        """True while the job's process runs."""
        return job_id in self.children or job_id in self.adopted

    def final_model(self, job_id: str) -> Path:
        """Path of the job's final weights (may not exist yet)."""
        return self.checkpoint_dir(job_id) / FINAL_MODEL_NAME

    def shutdown(self, timeout: float = 30.0) -> None:
        """Pause every running child (checkpoint, exit 4) and queue it to resume on the next start."""
        for job_id in list(self.children):
            self.request_stop(job_id, "paused")
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            time.sleep(0.1)
            for job_id, process in list(self.children.items()):
                if process.poll() is not None:
                    del self.children[job_id]
                    self._finished(job_id, process.returncode)
                    if self.store.get_job(job_id).state == "paused":
                        self.store.update_job(job_id, state="queued", resume=True)


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


def _newest_lines_first(log_path: Path) -> list[str]:
    """The job log's lines, newest first (none when it cannot be read)."""
    try:
        return log_path.read_text(errors="replace").splitlines()[::-1]
    except OSError:
        return []


def _summary(log_path: Path) -> dict | None:
    """The trainer's closing `summary {...}` line (rank 0's in a multi-process job), if it wrote one."""
    for line in _newest_lines_first(log_path):
        if line.startswith("summary "):
            try:
                summary = json.loads(line[len("summary "):])
            except ValueError:
                continue
            if summary.get("rank", 0) == 0:
                return summary
    return None


def _last_error(log_path: Path) -> str | None:
    """The trainer's one-line error: 'job X failed: Class: message' or 'trainmetrics train: error: ...'."""
    for line in _newest_lines_first(log_path):
        for marker in (" failed: ", "trainmetrics train: error: "):
            if marker in line:
                return line.split(marker, 1)[1][:500]
    return None
