"""`GET /api/training/jobs/{job_id}/stacks`: every rank's Python thread stacks, now.

Each rank of a running job writes its stacks to `<job dir>/stacks.rank<N>.txt` when it gets SIGUSR2
(trainer/watchdog.py; faulthandler writes from the signal handler, so a rank stuck in C, a collective or a
sleep answers too). The job server notes how long each file is, asks every rank through its executor, and
returns what each file gained. A job that is not running answers with the end of each file, every dump its
runs wrote there, oldest first: its hang watchdog's under a header, those taken on request without one
(faulthandler writes them from the signal handler, which can add none) (`fresh: false`).
"""

import asyncio
import os
import stat
import time
from pathlib import Path

from trainmetrics.jobfiles import open_regular, stacks_path

# How long the ranks get to answer, and how long a file must stop growing to count as written.
ANSWER_SECONDS = 5.0
SETTLED_SECONDS = 0.2
POLL_SECONDS = 0.05
# At most this much of each rank's stacks is returned (a dump of a few hundred threads is far less).
MAX_STACK_BYTES = 256 * 1024


def stacks_file(job_path: Path, rank: int) -> Path:
    """Where a rank of the job writes its stacks (the trainer's --diagnostics-dir is the job's directory)."""
    return stacks_path(job_path, rank)


def _size(path: Path) -> int:
    """The stacks file's length; 0 (none written) for anything but a regular file. The job's directory may
    hold what anyone put there: a symlink (to /etc/passwd), a directory or a FIFO is no rank's stacks."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _read(path: Path, start: int) -> str | None:
    """The file from byte `start`, its last MAX_STACK_BYTES at most; None when it is not a regular file
    (any more: it may have been swapped since it was measured) or cannot be read."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as file:
            end = file.seek(0, 2)
            file.seek(max(start, end - MAX_STACK_BYTES))
            return file.read().decode("utf-8", "replace")
    except OSError:
        return None


def sizes(job_path: Path, nproc: int) -> dict[int, int]:
    """Each rank's stacks file length now (0 for one not written yet)."""
    return {rank: _size(stacks_file(job_path, rank)) for rank in range(nproc)}


async def collect(job_path: Path, before: dict[int, int], asked_at: float | None = None) -> dict:
    """What each rank's file gained since `before`, once it stopped growing (or ANSWER_SECONDS passed); taken
    when the ranks were asked (`asked_at`, by default now)."""
    asked_at = time.time() if asked_at is None else asked_at
    deadline = time.monotonic() + ANSWER_SECONDS
    last = dict(before)
    steady_since: dict[int, float] = {}
    while time.monotonic() < deadline:
        now = time.monotonic()
        for rank in before:
            size = _size(stacks_file(job_path, rank))
            if size != last[rank]:
                last[rank] = size
                steady_since.pop(rank, None)
            elif size > before[rank]:
                steady_since.setdefault(rank, now)
        if all(now - steady_since.get(rank, now) >= SETTLED_SECONDS for rank in before) and \
                len(steady_since) == len(before):
            break
        await asyncio.sleep(POLL_SECONDS)
    grown = {rank: start if last[rank] > start else None for rank, start in before.items()}
    ranks, missing = _answers(job_path, grown)
    return {"fresh": True, "taken_at": asked_at, "ranks": ranks, "missing_ranks": missing}


def earlier(job_path: Path, nproc: int) -> dict:
    """The end of each rank's stacks file, for a job with no process to ask."""
    written = {rank: 0 if _size(stacks_file(job_path, rank)) else None for rank in range(nproc)}
    ranks, missing = _answers(job_path, written)
    return {"fresh": False, "ranks": ranks, "missing_ranks": missing}


def _answers(job_path: Path, starts: dict[int, int | None]) -> tuple[list[dict], list[int]]:
    """Each rank's stacks from its start offset, and the missing ranks: those with nothing new (start None)
    and those whose file cannot be read as a regular file."""
    ranks, missing = [], []
    for rank, start in starts.items():
        stacks = None if start is None else _read(stacks_file(job_path, rank), start)
        if stacks is None:
            missing.append(rank)
        else:
            ranks.append({"rank": rank, "stacks": stacks})
    return ranks, missing
