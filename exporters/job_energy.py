"""Each job's energy, per source (its GPUs, its share of the CPU packages), counted by the node exporter.

The gpu collector adds each GPU's energy to the jobs holding it, the energy collector each job's share of
the CPU package energy; the energy collector then publishes the accounts as
process_energy_joules_total{job_id,source}.

- An account only grows, and it is kept RETENTION_SECONDS after the job was last seen, so a job resumed on
  this host carries its count on, as its trainer counters do. The time since is measured on the monotonic clock,
  never the wall clock: an NTP step of 40 days forward (a host whose clock was far behind) dropped every ended
  job's account at the next slow pass. Across a restart the file carries each job's seconds idle at its save (it
  is rewritten at least every RESAVE_SECONDS); the time since the save counts up to RESAVE_SECONDS (by the wall
  clock, which may have been stepped meanwhile).
- The accounts are written to a state file, durably, before they are published: a restarted exporter carries every
  count on from at least the last value any scraper read, so a restart never looks like a counter reset
  and nothing is counted twice. (It takes new baselines: energy used while no exporter ran is not counted.)
- A job's series stay HOLD_SECONDS after it was last seen, so every scraper reads its final values.
"""

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trainmetrics.command import DEFAULT_LOOKBACK_DAYS
from trainmetrics.contract import validate_job_id
from trainmetrics.jobfiles import replace_atomically

log = logging.getLogger(__name__)

SOURCES = ("gpu", "cpu")
HOLD_SECONDS = 60.0                 # Prometheus' default scrape interval, so even such a scraper reads them
RETENTION_SECONDS = DEFAULT_LOOKBACK_DAYS * 86400.0    # the analytics' default --lookback (exporter running time)
MAX_JOBS = 1_000                    # accounts kept (least recently seen out): the file is rewritten every
                                    # slow interval while a job runs, ~4 ms of CPU at 1,000 jobs
MAX_STATE_BYTES = 1 << 20           # ~130 bytes a job: a larger file is not ours
# The state file is rewritten at least this often while it holds accounts, and a restart adds to the seconds each
# job was idle at the save the wall clock's time since, up to this (none of a step back): a step forward counts an
# hour at most, and an ended job's series are not published again after a restart.
RESAVE_SECONDS = 3600.0
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def state_file_for(job_dir: Path) -> Path:
    """Where the exporter reading job_dir keeps its energy accounts: next to the directory, not in it (any
    job's user may write there)."""
    return job_dir.with_name(f"{job_dir.name}.energy.json")


def shared_state_directory(state_file: Path) -> Path | None:
    """The directory the state file is in (or the nearest above that exists) when a user other than this one or
    root can create files there, as in /tmp; else None. A file of theirs at the state file's name blocks every
    save (in a sticky directory none but its owner may replace it) and is not taken over at a start (it is
    owner-checked): the counts would start from 0 at each restart."""
    directory = next(part for part in state_file.parents if part.is_dir())
    info = os.stat(directory)
    if (info.st_uid not in (0, os.geteuid()) or info.st_mode & stat.S_IWOTH
            or (info.st_mode & stat.S_IWGRP and info.st_gid not in (0, os.getegid()))):
        return directory
    return None


class JobEnergy:
    """Energy accounts by job and source, published as a snapshot taken after each save."""

    def __init__(self, state_file: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.state_file = state_file
        self.clock = clock              # monotonic: when each job was last seen, the hold and the retention
        self.wall_clock = wall_clock    # only for the state file: `seen` as a time of day, the time no exporter ran
        self._joules: dict[str, dict[str, float]] = {}
        self._seen: dict[str, float] = {}       # on self.clock
        self._changed = False
        self._saved_at = clock()
        self._save_failed = False
        self._lock = threading.Lock()   # a slow sample the watchdog gave up on may still add when it returns
        self.published: dict[tuple[str, str], float] = {}
        if state_file is not None:
            self._load(state_file)

    def add(self, job_id: str, source: str, joules: float = 0.0) -> None:
        """Add joules to the job's account of source (0: the job is seen and has the account, at 0 if new)."""
        with self._lock:
            account = self._joules.setdefault(job_id, {})
            if source not in account or joules > 0:
                account[source] = account.get(source, 0.0) + max(joules, 0.0)
                self._changed = True
            self._seen[job_id] = self.clock()

    def touch(self, job_ids) -> None:
        """The jobs run now (their processes are in the job tracker): those with an account stay published while
        nothing can be added to it (their GPU or every RAPL zone unreadable)."""
        with self._lock:
            now = self.clock()
            for job_id in job_ids:
                if job_id in self._joules:
                    self._seen[job_id] = now

    def has(self, job_id: str, source: str) -> bool:
        """True when the job has an account of source (opened, or taken over from the state file)."""
        with self._lock:
            return source in self._joules.get(job_id, {})

    def publish(self) -> None:
        """Forget jobs gone for longer than the retention, save the accounts, then publish those of the jobs
        seen within the hold."""
        with self._lock:
            # Read under the lock: an add from another thread (a slow sample the watchdog gave up on) between the
            # read and the lock left a job seen after `now`, saved with a negative `idle`, and a restart then
            # refused the whole state file: every job's count started from 0.
            now = self.clock()
            gone = [job_id for job_id, seen in self._seen.items() if now - seen > RETENTION_SECONDS]
            if len(self._seen) - len(gone) > MAX_JOBS:
                gone = sorted(self._seen, key=self._seen.get)[:len(self._seen) - MAX_JOBS]
            for job_id in gone:
                del self._joules[job_id], self._seen[job_id]
            if self._changed or gone or (self._joules and now - self._saved_at >= RESAVE_SECONDS):
                # A failed save is tried again at the next publication: else counts published since the last
                # good save (a job's last ones) were saved only an hour later, and a restart before took them back.
                self._changed = not self._save(now)
                self._saved_at = now
            self.published = {(job_id, source): joules for job_id, account in self._joules.items()
                              if now - self._seen[job_id] <= HOLD_SECONDS for source, joules in account.items()}

    def _save(self, now: float) -> bool:
        """Write the accounts, each with `idle`, the seconds since the job was last seen (what the retention
        counts), and `seen`, that time by the wall clock (what an exporter before `idle` reads). False when the
        file could not be written."""
        if self.state_file is None:
            return True
        wall = self.wall_clock()
        state = {job_id: {**account, "seen": max(0.0, wall - (now - self._seen[job_id])),
                          "idle": now - self._seen[job_id]} for job_id, account in self._joules.items()}
        try:
            # Durable before the counts are published: a power cut after left the old file (its rename never
            # synced) or an empty one, and the restarted exporter's counters went back (a scraper took the drop
            # for a reset and counted the job's energy twice) or started from 0.
            replace_atomically(self.state_file, json.dumps({"jobs": state}), durable=True)
        except OSError as error:
            if not self._save_failed:
                log.warning("cannot write the energy state file %s (%s): the per-job energy counters will "
                            "start again from 0 if the exporter restarts", self.state_file, error)
            self._save_failed = True
            return False
        if self._save_failed:
            log.info("energy state file %s written again", self.state_file)
        self._save_failed = False
        return True

    def _load(self, path: Path) -> None:
        """Take the accounts over from the state file; a missing one is a first start, a bad one is logged
        and replaced."""
        try:
            fd = os.open(path, OPEN_FLAGS)
        except FileNotFoundError:
            return
        except OSError as error:
            log.warning("ignoring the energy state file %s: %s", path, error)
            return
        now, wall = self.clock(), self.wall_clock()
        try:
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode) or info.st_uid not in (0, os.geteuid()):
                    raise ValueError("not a regular file of this user or root")
                if info.st_size > MAX_STATE_BYTES:
                    raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
                jobs = json.loads(handle.read(MAX_STATE_BYTES))["jobs"]
            for job_id, account in jobs.items():
                validate_job_id(job_id)
                values = {key: account[key] for key in account if key in (*SOURCES, "seen", "idle")}
                # JSON numbers only (true is no count), bounded as the job mappings' are: float() of a longer
                # integer raised OverflowError, which stopped the exporter at its start.
                if not all(type(value) in (int, float) and 0 <= value < 1e18 for value in values.values()):
                    raise ValueError(f"job {job_id}: not a number from 0 to 1e18")
                values = {key: float(value) for key, value in values.items()}
                # Idle at the save (none in a file from before `idle`: its `seen` is a wall time, which a clock
                # step makes any age), and the wall clock's time since the save, up to RESAVE_SECONDS.
                idle, seen = values.pop("idle", 0.0), values.pop("seen")
                since_save = min(max(wall - (seen + idle), 0.0), RESAVE_SECONDS)
                self._seen[job_id] = now - (idle + since_save)
                self._joules[job_id] = values
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
            log.warning("ignoring the energy state file %s (%s: %s): the per-job energy counters start from 0",
                        path, type(error).__name__, error)
            self._joules.clear()
            self._seen.clear()
