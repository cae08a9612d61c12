"""How the job server runs its jobs: an executor starts a job's processes, tells when they ended, and passes
on pause and cancel. The supervisor (supervisor.py) owns the states; an executor only runs processes.

- `local` (local.py): `trainmetrics train` child processes on this machine; the default, nothing to install.
- `ray` (ray_executor.py): jobs through Ray's Jobs API on an existing Ray cluster, each rank a Ray actor
  placed by Ray (`pip install 'trainmetrics[ray]'`; only that module imports ray).
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class ExecutorUnavailable(Exception):
    """The executor could not be asked to start a run (Ray's head not answering): the job stays queued and is
    tried again; not the job's own failure."""


class StartDeferred(Exception):
    """The job cannot start yet, though the executor answers (a run of it that no server recorded is still
    stopping): it stays queued and is tried at the next tick; the jobs queued behind it still start."""


@dataclass
class Run:
    """One started (or adopted) run of a job: `handle` names it to its executor (a pid, a Ray submission id)."""

    job_id: str
    handle: str
    job_dir: Path
    pid: int | None = None
    process: subprocess.Popen | None = None     # a local child started by this server
    # A stop signal for trainer processes that do not exist yet (torchrun still starting its workers): sent when
    # they do (the local executor's poll); kept in the job's control file meanwhile, for a restart to adopt.
    undelivered: int | None = None
    # What the executor says of the run's end beyond its exit code, set when poll reports the end (None: nothing
    # more; the local executor): whether it ended by itself rather than by a stop or kill (Ray's status FAILED or
    # SUCCEEDED, not STOPPED), and the executor's own words for a failure (Ray's message: one line, bounded).
    ended_by_itself: bool | None = None
    end_said: str | None = None


class Executor(Protocol):
    """What the supervisor needs of an executor (every call returns promptly: it runs on the state thread)."""

    name: str

    def clear_way(self, job_id: str, job_dir: Path) -> None:
        """Before a start builds the run's arguments: stop the job's runs that no server recorded (a server
        killed between starting a run and recording it left the job queued), StartDeferred until they are gone
        (the checkpoint a stopped one writes decides whether the new run resumes), ExecutorUnavailable when the
        executor cannot be asked now."""

    def start(self, job_id: str, nproc: int, train_args: list[str], job_dir: Path, env: dict[str, str]) -> Run:
        """Start the job's processes (`trainmetrics train ARGS`, nproc ranks), output in job_dir/train.log;
        ExecutorUnavailable when it cannot be asked now."""

    def adopt(self, job_id: str, handle: str | None, job_dir: Path) -> Run | None:
        """The run a previous server left going, if it still runs."""

    def poll(self, run: Run) -> tuple[bool, int | None]:
        """(ended, exit code); the code is negative for a signal and None when it is not known."""

    def signal(self, run: Run, outcome: str) -> bool:
        """Ask the run to stop at its next step boundary ("paused" or "cancelled"); True when it was told."""

    def kill(self, run: Run) -> bool:
        """Stop the run now, wherever it is (a cancel it did not act on: a rank hung in C or a collective never
        reaches a step boundary); True when the kill went out (False: asked again later)."""

    def request_stacks(self, run: Run) -> bool:
        """Ask every rank of the run to write its thread stacks (SIGUSR2); True when the request went out."""

    def reap(self) -> None:
        """At each tick, after the polls: collect the exits of the server's children that no run's poll reads (the
        orphans of local jobs' processes, where the server is pid 1 or a subreaper)."""

    def check(self) -> dict:
        """For /healthz: what the executor says of itself; raises when it cannot run jobs now."""

    def abandon(self, job_id: str, job_dir: Path) -> None:
        """The job will not be started again (cancelled while queued): a run that a start which raised
        ExecutorUnavailable may have left behind (its request arrived, its answer was lost), or that a server
        killed before recording it left, is stopped."""


def build_executor(kind: str, ray_address: str | None = None, ray_python: str | None = None) -> Executor:
    """The executor of a kind ("local" or "ray")."""
    if kind == "ray":
        from trainmetrics.jobserver.ray_executor import RayExecutor

        return RayExecutor(ray_address, ray_python)
    from trainmetrics.jobserver.local import LocalExecutor

    return LocalExecutor()
