"""The job server's persistent state: datasets and jobs in SQLite inside the data dir.

Every change is committed before the server answers (WAL, synchronous=FULL), so a server killed with -9
loses nothing it has acknowledged. The store is synchronous: the job server calls it from its state thread,
never from the event loop.
"""

import dataclasses
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainmetrics.contract import FINAL_STATES
from trainmetrics.datafiles import DEFAULT_TARGET

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, format TEXT NOT NULL,
    rows INTEGER NOT NULL, features INTEGER NOT NULL, size_bytes INTEGER NOT NULL,
    upload_seconds REAL NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    pid INTEGER, exit_code INTEGER, error TEXT, resume INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, started REAL, ended REAL);
-- add_job's look for an id in any case of its letters (not unique: a database may hold such ids from before)
CREATE INDEX IF NOT EXISTS jobs_by_id_in_any_case ON jobs (id COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS endpoints (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, address TEXT NOT NULL, scheme TEXT NOT NULL,
    PRIMARY KEY (job_id, rank));
CREATE TABLE IF NOT EXISTS server (name TEXT PRIMARY KEY, value REAL NOT NULL);
-- the server's stops still within the hour its reports are asked for: from its last note that it was up to a start
CREATE TABLE IF NOT EXISTS downtimes (began REAL PRIMARY KEY, ended REAL NOT NULL);
"""
# Columns added since the first schema: table -> (name, SQL type); an older database gains them at open.
ADDED_COLUMNS = {"jobs": (("requested", "TEXT"), ("run_token", "TEXT"), ("handle", "TEXT"), ("report", "TEXT"),
                          ("reason", "TEXT"), ("stop_unsent", "TEXT"), ("executor", "TEXT"),
                          ("queued_at", "REAL")),
                 "datasets": (("target", "TEXT"),)}


@dataclass
class DatasetRecord:
    """An uploaded dataset."""

    id: str
    owner: str
    name: str
    path: str
    format: str
    rows: int
    features: int
    size_bytes: int
    upload_seconds: float
    created: float
    target: str | None = None       # a CSV's target column (None: an NPZ, or an older upload: the default)

    @property
    def target_column(self) -> str | None:
        """The column a job on this dataset learns, unless its spec names another (None for an NPZ)."""
        return (self.target or DEFAULT_TARGET) if self.format == "csv" else None

    def public(self) -> dict:
        """The API view (no server paths)."""
        return {"dataset_id": self.id, "name": self.name, "format": self.format, "target": self.target_column,
                "rows": self.rows, "features": self.features, "size_bytes": self.size_bytes,
                "upload_seconds": self.upload_seconds, "created": self.created}


@dataclass
class JobRecord:
    """A submitted job and where it is in its life."""

    id: str
    owner: str
    name: str
    spec: dict
    state: str
    pid: int | None = None
    exit_code: int | None = None
    error: str | None = None
    resume: bool = False
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    # The stop accepted for the running process: "paused", "cancelled", or "shutdown" (the server's own pause
    # when it stops: the job is queued to resume once it has paused). A stored text column: no migration.
    requested: str | None = None
    run_token: str | None = None    # the running process's secret for reporting its endpoints
    handle: str | None = None       # the running process as its executor names it (a pid, a Ray submission)
    reason: str | None = None       # why the last run stopped by itself (its result: "loss spike at step 85")
    # Set while the stop in `requested` is recorded but not sent: written with it, before its signal (or control
    # file), cleared once that went out, kept where it never did and its record could not be taken back either (a
    # full disk): the stop under way before it ("" for none). Kept in the store, not in memory: a server killed
    # meanwhile adopted the job at its next start with the stop read as under way, never sent (a client's retry
    # answered 202 with nothing sent; the job ended in that state though it trained on).
    stop_unsent: str | None = None
    # The executor that started its process ("local", "ray"): only that one can adopt it after a restart.
    executor: str | None = None
    # When a resume queued it again (None: it is queued from its submission, `created`): its place in the queue. A
    # job the server queues again (its shutdown pause, a run that died with it) keeps the place it had.
    queued_at: float | None = None
    spec_unreadable: bool = False   # its stored spec is not a JSON object (read as {}: the job cannot start)

    @property
    def stop_under_way(self) -> str | None:
        """The stop sent to the running process: the recorded one, unless that was never sent (stop_unsent)."""
        return self.requested if self.stop_unsent is None else (self.stop_unsent or None)

    @property
    def run_handle(self) -> str | None:
        """Its process as its executor names it: the handle, or in a record from before the handle column its pid."""
        return self.handle or (str(self.pid) if self.pid else None)

    @property
    def run_by(self) -> str | None:
        """The executor of its process: the one recorded, or in a record written before that was (it was running
        when an older server stopped) the one its handle names: a pid is the local executor's, a Ray submission
        id (the job id, a dash, the time) never digits alone."""
        handle = self.run_handle
        if self.executor is not None or handle is None:
            return self.executor
        return "local" if handle.isdigit() else "ray"

    def public(self) -> dict:
        """The API view, with no server path (an older job's spec held its dataset's path)."""
        spec = {name: value for name, value in self.spec.items() if name != "dataset_path"}
        return {"job_id": self.id, "name": self.name, "owner": self.owner, "state": self.state, "spec": spec,
                "exit_code": self.exit_code, "error": self.error, "created": self.created,
                "started": self.started, "ended": self.ended, "stop_requested": self.requested,
                "reason": self.reason}


# A job's columns as a JobRecord reads them: never the stored report (get_report reads it on its own), the largest
# column, and one whose bytes may not be text (a damaged or hand-edited row failed every read of the jobs, the
# supervisor's included, not the report's alone).
JOB_COLUMNS = ", ".join(f.name for f in dataclasses.fields(JobRecord) if f.name != "spec_unreadable")

# The store's file in the server's data dir.
DATABASE_NAME = "trainmetrics.db"


class StoreUnreadable(Exception):
    """The database file cannot be opened as the server's store (not SQLite, not readable)."""


class JobStore:
    """SQLite-backed store; safe to share between the event loop and the supervisor."""

    def __init__(self, path: Path):
        self._lock = threading.Lock()
        self._adding = threading.Lock()     # add_job's check and insert, together
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._add_columns()
            # Writable now: a server that started while another process held the write lock (a backup, the
            # sqlite3 shell) failed in its first write, a traceback where it had jobs to recover.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError as error:      # OperationalError (unreadable, read-only, locked) included
            if hasattr(self, "_db"):
                self._db.close()
            raise StoreUnreadable(f"{path}: cannot be used as the job server's database ({error})") from None

    def _add_columns(self) -> None:
        """Columns added since a database was made (an older server's)."""
        for table, columns in ADDED_COLUMNS.items():
            present = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ----- the server's own life ---------------------------------------------------------------------
    def last_alive(self) -> float | None:
        """When a server last noted that it was up (None: no server has run on this store)."""
        rows = self._execute("SELECT value FROM server WHERE name = 'alive'")
        return rows[0]["value"] if rows else None

    def note_alive(self, at: float) -> None:
        """Note that the server is up at `at` (Unix time)."""
        self._execute("INSERT INTO server (name, value) VALUES ('alive', ?) "
                      "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (at,))

    def downtimes(self) -> list[tuple[float, float]]:
        """(last note that the server was up, next start) of each stop noted (note_downtime), the newest first."""
        return [(row["began"], row["ended"]) for row in
                self._execute("SELECT began, ended FROM downtimes ORDER BY ended DESC")]

    def note_downtime(self, began: float, ended: float, forget_before: float) -> None:
        """Note a stop (a start from the same last note, a server that failed to start, stands for both) and forget
        those that ended before `forget_before`."""
        self._execute("INSERT OR REPLACE INTO downtimes VALUES (?, ?)", (began, ended))
        self._execute("DELETE FROM downtimes WHERE ended < ?", (forget_before,))

    # ----- datasets ----------------------------------------------------------------------------------
    def add_dataset(self, record: DatasetRecord) -> None:
        """Persist a validated upload."""
        self._execute("INSERT INTO datasets (id, owner, name, path, format, rows, features, size_bytes, "
                      "upload_seconds, created, target) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                      (record.id, record.owner, record.name, record.path, record.format, record.rows,
                       record.features, record.size_bytes, record.upload_seconds, record.created, record.target))

    def get_dataset(self, dataset_id: str, owner: str | None) -> DatasetRecord | None:
        """The dataset, if it exists and (when owner is given) belongs to owner."""
        rows = self._execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            return None
        return DatasetRecord(**dict(rows[0]))

    def list_datasets(self, owner: str | None) -> list[DatasetRecord]:
        """Datasets, oldest first, of one owner or all."""
        if owner is None:
            rows = self._execute("SELECT * FROM datasets ORDER BY created")
        else:
            rows = self._execute("SELECT * FROM datasets WHERE owner = ? ORDER BY created", (owner,))
        return [DatasetRecord(**dict(row)) for row in rows]

    # ----- jobs --------------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        values = dict(row)
        try:
            spec = json.loads(values["spec"])
        except (TypeError, ValueError, RecursionError):
            spec = None
        # A row edited by hand (or a damaged file): that job alone fails to start; the others, and every
        # listing, go on.
        values["spec"], values["spec_unreadable"] = (spec, False) if isinstance(spec, dict) else ({}, True)
        values["resume"] = bool(values["resume"])
        return JobRecord(**values)

    def add_job(self, job: JobRecord) -> bool:
        """Persist a new job; False when the id is taken, in any case of its letters: a job's directory is named by
        its id, and on a case-insensitive file system (macOS's by default, SMB, ext4's casefold) `a-Run` and
        `a-run` shared one (checkpoints, result, log). The check and the insert under one lock, so that no other
        insert of this server comes between them (one server per data dir: its lock file)."""
        with self._adding:
            if self._execute("SELECT 1 FROM jobs WHERE id = ? COLLATE NOCASE LIMIT 1", (job.id,)):
                return False
            try:
                self._execute("INSERT INTO jobs (id, owner, name, spec, state, pid, exit_code, error, resume, created, "
                              "started, ended, requested, run_token, handle) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                              (job.id, job.owner, job.name, json.dumps(job.spec), job.state, job.pid, job.exit_code,
                               job.error, int(job.resume), job.created, job.started, job.ended, job.requested,
                               job.run_token, job.handle))
            except sqlite3.IntegrityError:
                return False
        return True

    def get_job(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job, if it exists and (when owner is given) belongs to owner."""
        rows = self._execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            return None
        return self._job(rows[0])

    def list_jobs(self, owner: str | None = None, states: tuple[str, ...] | None = None) -> list[JobRecord]:
        """Jobs, oldest first, filtered by owner and states."""
        sql, params = f"SELECT {JOB_COLUMNS} FROM jobs WHERE 1=1", []
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params.extend(states)
        return [self._job(row) for row in self._execute(sql + " ORDER BY created", tuple(params))]

    def queued_jobs(self) -> list[JobRecord]:
        """Queued jobs in the order they start: by when each joined the queue, its resume's time or else its
        submission's (ordered by submission alone, a job resumed after a pause or a failure went before every job
        queued meanwhile, and after a restart before the jobs the server had paused while they ran)."""
        return [self._job(row) for row in self._execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' "
                                                        "ORDER BY COALESCE(queued_at, created), rowid")]

    def ended_without_run(self, states: tuple[str, ...], since: float,
                          unreported_since: float | None = None) -> list[JobRecord]:
        """Jobs in one of `states` that ended after `since`, or after `unreported_since` without a stored report,
        with no run handle or pid (the server ended them, or their process ended without publishing that end:
        killed, or overruled by a cancel), oldest first."""
        # Both unset: a row from before the handle column had a pid only, and its process published its end.
        rows = self._execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({','.join('?' * len(states))}) "
                             "AND handle IS NULL AND pid IS NULL AND (ended > ? OR (report IS NULL AND ended > ?)) "
                             "ORDER BY created",
                             (*states, since, since if unreported_since is None else unreported_since))
        return [self._job(row) for row in rows]

    def update_job(self, job_id: str, **changes) -> None:
        """Change some fields of a job. A write of `requested` records a stop that was sent (or none) unless it
        says `stop_unsent` too: an older mark of an unsent stop goes with it."""
        if "requested" in changes:
            changes.setdefault("stop_unsent", None)
        if "spec" in changes:
            changes["spec"] = json.dumps(changes["spec"])
        if "resume" in changes:
            changes["resume"] = int(changes["resume"])
        assignments = ", ".join(f"{name} = ?" for name in changes)
        self._execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))

    # ----- stored analytics reports ------------------------------------------------------------------
    def get_report(self, job_id: str) -> tuple[str, str] | None:
        """(owner, report JSON) of a job with a stored report. Bytes that are not UTF-8 (a damaged or edited row)
        read as U+FFFD: the report reads back as far as it is one (readable_report), where sqlite3 raised."""
        rows = self._execute("SELECT owner, CAST(report AS BLOB) AS report FROM jobs WHERE id = ? "
                             "AND report IS NOT NULL", (job_id,))
        return (rows[0]["owner"], bytes(rows[0]["report"]).decode("utf-8", "replace")) if rows else None

    def keep_report(self, job_id: str, report: str, ended: float) -> bool:
        """Keep the report of the run that ended at `ended`; False (nothing kept) when the job has moved on since
        (resumed: its end is gone, or another run's), so a report computed meanwhile is not the job's for good."""
        return bool(self._execute("UPDATE jobs SET report = ? WHERE id = ? AND ended = ? AND report IS NULL "
                                  "RETURNING id", (report, job_id, ended)))

    def jobs_to_report(self, states: tuple[str, ...], ended_after: float,
                       ended_before: float) -> list[tuple[str, float, str, str]]:
        """(id, end, state, owner) of jobs in one of `states` that ended in (ended_after, ended_before] without a
        stored report."""
        rows = self._execute(f"SELECT id, ended, state, owner FROM jobs WHERE report IS NULL AND state IN "
                             f"({','.join('?' * len(states))}) AND ended > ? AND ended <= ? ORDER BY ended",
                             (*states, ended_after, ended_before))
        return [(row["id"], row["ended"], row["state"], row["owner"]) for row in rows]

    # ----- endpoints (HTTP service discovery) -------------------------------------------------------------
    def set_endpoint(self, job_id: str, rank: int, address: str, scheme: str) -> None:
        """Record where one process of a job serves /metrics."""
        self._execute("INSERT OR REPLACE INTO endpoints VALUES (?,?,?,?)", (job_id, rank, address, scheme))

    def remove_endpoints(self, job_id: str, rank: int | None = None) -> None:
        """Forget one process's endpoint, or all of a job's."""
        if rank is None:
            self._execute("DELETE FROM endpoints WHERE job_id = ?", (job_id,))
        else:
            self._execute("DELETE FROM endpoints WHERE job_id = ? AND rank = ?", (job_id, rank))

    def endpoints(self) -> list[tuple[str, str, int, str, str]]:
        """(job id, owner, rank, address, scheme) of every recorded endpoint of a job that may have a process: not
        one that ended or is paused. A job's end is written before its endpoints are forgotten, and a server killed
        between the two (or whose forgetting failed) listed the ended job for Prometheus to scrape for good; a
        queued job's are kept (a Ray run whose submission's answer was lost starts before its record says so)."""
        rows = self._execute("SELECT e.job_id, j.owner, e.rank, e.address, e.scheme FROM endpoints e "
                             "JOIN jobs j ON j.id = e.job_id WHERE j.state NOT IN (?, ?, ?, ?) "
                             "ORDER BY e.job_id, e.rank", (*FINAL_STATES, "paused"))
        return [tuple(row) for row in rows]
