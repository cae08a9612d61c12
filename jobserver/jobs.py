"""What the job API does, as plain synchronous operations on the store and the supervisor. The routes
(app.py) run each one on the job server's state thread, one at a time, so requests and supervision never
race and the event loop never waits on SQLite, psutil or a process start.

Every operation takes the caller's owner; another owner's job or dataset is "not found" (404), never 403.
"""

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from trainmetrics.contract import (BUILTIN_DATASETS, FINAL_STATES, JOB_STATES, SpecError, device_for_ranks_problem,
                                  WAITING_STATES, new_job_id, parse_spec, validate_job_id)
from trainmetrics.datafiles import csv_columns, first_columns
from trainmetrics.edge import ApiError
from trainmetrics.jobfiles import (CHECKPOINT_PATTERN, FINAL_MODEL_NAME, MAX_LISTED_ENTRIES, PLACEMENT_WAIT_NAME,
                                   may_hold_checkpoints, open_directory, open_regular, read_small_text,
                                   scan_checkpoints)
from trainmetrics.jobserver import stacks
from trainmetrics.hangs import HangFeed
from trainmetrics.reports import ReportArchive
from trainmetrics.jobserver.auth import job_id_prefix
from trainmetrics.jobserver.reports import UpTime, readable_report
from trainmetrics.jobserver.store import DatasetRecord, JobRecord, JobStore
from trainmetrics.jobserver.supervisor import StopRefused, Supervisor, token_matches

log = logging.getLogger("trainmetrics.server")

DEFAULT_OWNER = "default"     # the owner of every job when the server has no tokens
# The service discovery counts as read by a scraper for this long after a read (deploy/'s refresh_interval
# is 1 s). A job reported while nobody reads it does not wait for a first scrape that would never come.
DISCOVERY_WATCHED_SECONDS = 10.0
# The final state of a job the server ended without a process is published this long of the server's up time (a
# scraper reading the server once a minute still sees it several times; a run that ended while the server was down
# ended then, by its result), and longer until its report is stored (waiting_jobs); Prometheus keeps its last
# samples after.
FINAL_STATE_HOLD_SECONDS = 300.0
# HOST:PORT a job reports: a DNS name or IPv4 address, or an IPv6 address in brackets.
ENDPOINT_ADDRESS = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                              r":[0-9]{1,5}$")


@dataclass
class ServerSettings:
    """What `trainmetrics server` was started with."""

    data_dir: Path
    job_dir: Path | None = None
    advertise_url: str | None = None           # how jobs reach this server (set once it listens)
    executor: str = "local"                    # "local" or "ray" (executors.py)
    ray_address: str | None = None
    ray_python: str | None = None
    owners: bool = False                       # True with --tokens: ids and data are per owner
    max_concurrent: int = 1
    gpus: tuple[str, ...] = ()                 # the GPUs local jobs are given, one per rank (cli.local_gpus)
    max_upload_bytes: int = 256 * 1024 * 1024
    linger_timeout: float = 15.0
    archive: ReportArchive | None = None       # stored reports, shared with the analytics (trainmetrics.reports)
    hangs: HangFeed | None = None              # the jobs TrainerHang fires for, from the analytics (trainmetrics.hangs)
    data_dir_lock: object | None = None        # the data dir's lock file, held open for the server's life (cli.py)


class JobService:
    """The job API's operations."""

    def __init__(self, settings: ServerSettings, store: JobStore, supervisor: Supervisor):
        self.settings, self.store, self.supervisor = settings, store, supervisor
        self.uptime = UpTime(store)     # read before this server notes it is up
        self.discovery_read_at: float | None = None     # when a scraper last read the service discovery
        # The last stacks request per job: (monotonic time, the run asked, each rank's stacks-file length before).
        self._stacks_asked: dict[str, tuple[float, object, dict[int, int]]] = {}

    def _view(self, job: JobRecord) -> dict:
        """The API view of a job, with `waiting_for`: what a queued job waits for (Supervisor.waiting_for), or
        a running one before any of its processes starts (Ray to place its ranks), as its launcher says it;
        else None."""
        return {**job.public(), "waiting_for": self._placing(job) or self.supervisor.waiting_for(job)}

    def _placing(self, job: JobRecord) -> str | None:
        if job.state != "running":
            return None
        return read_small_text(self.supervisor.job_path(job.id) / PLACEMENT_WAIT_NAME)     # (None: no such file)

    def owner(self, caller: str | None) -> str:
        """The owner recorded on jobs and datasets: the caller's, or 'default' without tokens."""
        return caller or DEFAULT_OWNER

    # ----- datasets ----------------------------------------------------------------------------------
    def add_dataset(self, caller: str | None, fields: dict) -> dict:
        """Record an uploaded dataset."""
        record = DatasetRecord(owner=self.owner(caller), created=time.time(), **fields)
        self.store.add_dataset(record)
        return record.public()

    def list_datasets(self, caller: str | None) -> list[dict]:
        """The caller's datasets."""
        return [d.public() for d in self.store.list_datasets(self.owner(caller))]

    # ----- jobs --------------------------------------------------------------------------------------
    def job(self, caller: str | None, job_id: str) -> JobRecord:
        """The job, if the caller may see it (404 otherwise)."""
        try:
            validate_job_id(job_id)
        except ValueError as error:
            raise ApiError(400, "bad_request", f"job_id: {error}") from None
        job = self.store.get_job(job_id, self.owner(caller))
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return job

    def submit(self, caller: str | None, body: object) -> dict:
        """Check a spec against the contract and queue the job (started at once when there is room)."""
        owner = self.owner(caller)
        try:
            values = parse_spec(body)
        except SpecError as error:
            raise ApiError(400, "bad_request", str(error)) from None
        device = values.get("device", "auto")
        if self.supervisor.executor.name == "ray" and device.startswith("cuda:") and int(device[5:]) > 0:
            # Ray gives each rank the one GPU it asked for, the only one it sees (cuda:0): cuda:1 failed every rank
            # at its start ("only 1 CUDA device(s)").
            raise ApiError(400, "bad_request", f"device: {device!r} names a GPU of one machine; on Ray each rank is "
                                               "given a GPU of Ray's choosing, which it sees as cuda:0: ask for cuda")
        ranks_here = values.get("nproc", 1) if self.supervisor.executor.name == "local" else 1   # (Ray's: above)
        if problem := device_for_ranks_problem(device, ranks_here):
            raise ApiError(400, "bad_request", f"device: {problem}")
        if problem := self.supervisor.gpus_lacking(values):
            raise ApiError(400, "bad_request", f"nproc: {problem}")
        prefix = job_id_prefix(caller if self.settings.owners else None)
        job_id = values.pop("job_id", None) or prefix + new_job_id()
        if not job_id.startswith(prefix):
            raise ApiError(400, "bad_request", f"job_id: must start with {prefix!r}: job ids are per owner")
        name = values.pop("job_name", None) or job_id
        dataset = values.get("dataset", "blobs")
        if dataset in BUILTIN_DATASETS:
            values.update(dataset=dataset, upload_seconds=None)
        else:
            record = self.store.get_dataset(dataset, owner)
            if record is None:
                raise ApiError(400, "bad_request", f"dataset: no dataset {dataset[:80]!r} (built-ins: "
                                                   f"{', '.join(BUILTIN_DATASETS)})")
            if not self.supervisor.uploaded_file(record).is_file():
                # Removed from the data dir behind the server's back (a clean-up, a lost mount): a job on it
                # would fail at its start, its error naming the server's path; naming another target was a 500.
                raise ApiError(409, "conflict", f"dataset: the file of dataset {record.id} is gone from the "
                                                "server's data dir; upload it again")
            values.update(dataset=dataset, upload_seconds=record.upload_seconds)
            if record.format == "csv":
                values["target"] = self._target(record, values.get("target"))
        values.setdefault("nproc", 1)
        job = JobRecord(id=job_id, owner=owner, name=name, spec=values, state="queued")
        if not self.store.add_job(job):
            if self.store.get_job(job_id) is None:      # (another owner's ids differ from the caller's: auth.py)
                raise ApiError(409, "conflict", f"job_id: a job whose id differs from {job_id!r} in case alone "
                                                "exists: the two would share a directory on a case-insensitive "
                                                "file system")
            raise ApiError(409, "conflict", f"job_id: {job_id!r} exists")
        self._start_queued()
        return self._view(self.store.get_job(job_id))

    def _start_queued(self) -> None:
        """Start queued jobs there is room for now, once a request's own change is recorded. A tick that fails is
        not the request's failure (another job's end that a full disk cannot record): the supervision loop meets it
        again, says it and retries. Answered 507 "try again", a stored submission's retry was 409 "exists" (one
        without a job_id was stored and run twice), a resume's "is queued"."""
        try:
            self.supervisor.tick()
        except Exception as error:
            log.debug("starting queued jobs after a request failed: %s: %s", type(error).__name__, error)

    def _target(self, record: DatasetRecord, asked: str | None) -> str:
        """The target column of a job on an uploaded CSV: the spec's, which must be one of its columns, else the
        one named at upload."""
        if asked is None or asked == record.target_column:
            return record.target_column
        columns = csv_columns(self.supervisor.uploaded_file(record))
        if asked not in columns:
            raise ApiError(400, "bad_request", f"target: no column {asked[:40]!r} in dataset {record.id} (its "
                                               f"{len(columns)} columns: {first_columns(columns)})")
        if columns.count(asked) > 1:     # as the upload refuses a target of two columns: accepted, the job failed
            raise ApiError(400, "bad_request", f"target: {columns.count(asked)} columns of dataset {record.id} are "
                                               f"named {asked[:40]!r}: a target column's name must be unique")
        return asked

    def list_jobs(self, caller: str | None, state: str | None) -> list[dict]:
        """The caller's jobs, oldest first, optionally in one state."""
        if state is not None and state not in JOB_STATES:
            raise ApiError(400, "bad_request", f"state: one of {', '.join(JOB_STATES)}")
        return [self._view(job) for job in self.store.list_jobs(self.owner(caller), (state,) if state else None)]

    def get(self, caller: str | None, job_id: str) -> dict:
        """One job, with its checkpoint count (of a bounded listing: _checkpoints) and whether its analytics report
        is stored."""
        job = self.job(caller, job_id)
        stored = self.store.get_report(job.id)
        # A report the analytics would serve: one that cannot be read (an edited row) is ignored there, so none.
        return {**self._view(job), "checkpoints": len(self._checkpoints(job.id)[0]),
                "report_stored": stored is not None and readable_report(job.id, stored[1]) is not None}

    def stop(self, caller: str | None, job_id: str, outcome: str) -> tuple[int, dict]:
        """Pause or cancel. A queued or paused job is cancelled at once (200); a running one is signalled and
        stops at its next step boundary (202, `stop_requested` says which stop is under way)."""
        job = self.job(caller, job_id)
        if outcome == "cancelled" and job.state in WAITING_STATES:
            # No process publishes this end: the server does (waiting_jobs), for a job without a run handle.
            # (`resume` kept: the server says whether the job it ended had run and waited to resume, the end of that
            # wait, not a run's: WaitingJob.resuming.) No run of it ended cancelled: a paused job's exit code 4 stood
            # under `cancelled`, a code of another state. Its `reason` stays: why its last run stopped.
            self.store.update_job(job.id, state="cancelled", ended=time.time(), exit_code=None, pid=None, handle=None)
            self.supervisor.abandon(job)
            return 200, self._view(self.store.get_job(job.id))
        try:
            self.supervisor.request_stop(job, outcome)
        except StopRefused as error:
            raise ApiError(409, "conflict", str(error)) from None
        return 202, self._view(self.store.get_job(job.id))

    def resume(self, caller: str | None, job_id: str) -> dict:
        """Paused, or failed with a checkpoint: queued again, to continue from its last checkpoint."""
        job = self.job(caller, job_id)
        has_checkpoint = may_hold_checkpoints(self.supervisor.checkpoint_dir(job.id))
        if not (job.state == "paused" or (job.state == "failed" and has_checkpoint)):
            raise ApiError(409, "conflict", f"job {job.id} is {job.state}: only paused jobs, or failed ones with "
                                            "a checkpoint, resume")
        if problem := self.supervisor.gpus_lacking(job.spec):     # (a server restarted with fewer GPUs)
            raise ApiError(409, "conflict", f"job {job.id} cannot resume here: {problem}")
        # The previous run's outcome goes with its end: its exit code and reason (a pause's 4, "loss spike at step
        # 85") stayed until the next start, so a resumed job cancelled while queued showed them.
        # At the back of the queue (queued_at): its first submission's place went to the jobs queued while it waited.
        self.store.update_job(job.id, state="queued", resume=True, ended=None, error=None, exit_code=None,
                              reason=None, report=None, queued_at=time.time())
        self._start_queued()
        return self._view(self.store.get_job(job.id))

    def request_stacks(self, caller: str | None, job_id: str) -> tuple[dict, Path, dict[int, int] | None, float]:
        """Ask a running job's ranks for their thread stacks: (the job, its directory, each rank's stacks-file
        length before the request, when the ranks were asked), the lengths None when no process was asked (the
        job is not running, or waits for Ray to place its ranks).

        Requests within stacks.ANSWER_SECONDS of the one that asked share its answer: the ranks are asked once
        (a burst of requests is one dump in their files, and every caller gets that same dump, taken when that
        one asked)."""
        job = self.job(caller, job_id)
        path, nproc = self.supervisor.job_path(job.id), job.spec.get("nproc", 1)
        run = self.supervisor.runs.get(job.id)
        # A Ray job whose ranks Ray is still placing has no process to ask: waited for, they answered nothing.
        if job.state != "running" or run is None or self._placing(job) is not None:
            return self._view(job), path, None, time.time()
        now = time.monotonic()
        asked = self._stacks_asked.get(job.id)
        if asked is not None and asked[1] is run and now - asked[0] < stacks.ANSWER_SECONDS:
            return self._view(job), path, asked[2], asked[3]
        stacks.make_room(path, nproc)
        before, asked_at = stacks.sizes(path, nproc), time.time()
        if not self.supervisor.executor.request_stacks(run):
            return self._view(job), path, None, asked_at
        self._stacks_asked = {other: entry for other, entry in self._stacks_asked.items()
                              if now - entry[0] < stacks.ANSWER_SECONDS}
        self._stacks_asked[job.id] = (now, run, before, asked_at)
        return self._view(job), path, before, asked_at

    # ----- checkpoints and downloads -----------------------------------------------------------------
    def checkpoints(self, caller: str | None, job_id: str) -> dict:
        """The job's checkpoints, oldest first, and whether the listing stopped before the directory's end."""
        job = self.job(caller, job_id)
        checkpoints, truncated = self._checkpoints(job.id)
        return {"job_id": job.id, "checkpoints": checkpoints, "truncated": truncated}

    def _checkpoints(self, job_id: str) -> tuple[list[dict], bool]:
        """The regular checkpoint files in the job's own checkpoint directory, oldest first (none when that
        directory, or the job's, is a symlink: open_directory), and whether the listing was cut. Read on the state
        thread, so from MAX_LISTED_ENTRIES entries of it at most: a job's process can fill it, and 300,000 files
        held every owner's requests 4 s a listing."""
        try:
            directory = self._checkpoint_dir_fd(job_id)
        except OSError:
            return [], False
        try:
            found, truncated = scan_checkpoints(directory, MAX_LISTED_ENTRIES)
        finally:
            os.close(directory)
        return [{"name": checkpoint.path.name, "step": checkpoint.step, "size_bytes": checkpoint.size_bytes,
                 "modified": checkpoint.modified} for checkpoint in found], truncated

    def _checkpoint_dir_fd(self, job_id: str) -> int:
        """The job's checkpoint directory, opened through neither a symlinked job directory nor a symlinked
        `checkpoints` (a job's process can plant either: its downloads were another owner's files)."""
        path = self.supervisor.checkpoint_dir(job_id)
        return open_directory(path.parent.parent, path.parent.name, path.name)

    def _open_checkpoint_file(self, job_id: str, name: str, missing: str) -> BinaryIO:
        """A regular file `name` of the job's own checkpoint directory, opened (404 `missing` otherwise)."""
        try:
            directory = self._checkpoint_dir_fd(job_id)
        except OSError:
            raise ApiError(404, "not_found", missing) from None
        try:
            return _open_file(name, missing, directory)
        finally:
            os.close(directory)

    def open_model(self, caller: str | None, job_id: str) -> tuple[str, BinaryIO]:
        """The job's final weights file, opened (404 until it completed)."""
        job = self.job(caller, job_id)
        missing = f"job {job.id} has no final model (state {job.state})"
        if job.state != "completed":    # written just before the process ends: running still, or killed after it
            raise ApiError(404, "not_found", missing)
        return job.id, self._open_checkpoint_file(job.id, FINAL_MODEL_NAME, missing)

    def open_checkpoint(self, caller: str | None, job_id: str, name: str) -> tuple[str, BinaryIO]:
        """One checkpoint file, opened, only by a checkpoint's name, only inside the job's directory."""
        job = self.job(caller, job_id)
        if not CHECKPOINT_PATTERN.fullmatch(name):
            raise ApiError(400, "bad_request", "name: a checkpoint name like step-000000123.pt")
        # The name is a file name (the pattern): the job's own checkpoint directory holds it, or nothing.
        return job.id, self._open_checkpoint_file(job.id, name, f"job {job.id} has no checkpoint {name}")

    # ----- endpoints for Prometheus' HTTP service discovery ---------------------------------------------
    def _reporting_job(self, job_id: str, token: str) -> JobRecord:
        """The running job whose current run holds this secret; 401 for anything else (one answer for all)."""
        try:
            validate_job_id(job_id)
            job = self.store.get_job(job_id)
        except ValueError:
            job = None
        running = job is not None and job.state == "running" and token_matches(job, token)
        # A run whose start went out unconfirmed (its answer lost) reports before a retry records it: it is the
        # job's run all the same (401 there, it was never scraped).
        unconfirmed = job is not None and job.state == "queued" and self.supervisor.untaken_token_matches(job.id, token)
        if not (running or unconfirmed):
            raise ApiError(401, "unauthorized", "not a running job's endpoint secret")
        return job

    def register_endpoint(self, job_id: str, token: str, body: object) -> dict:
        """A job process reports where it serves /metrics: {rank, address: "HOST:PORT", scheme}."""
        job = self._reporting_job(job_id, token)
        if not isinstance(body, dict) or set(body) != {"rank", "address", "scheme"}:
            raise ApiError(400, "bad_request", "body: expected {rank, address, scheme}")
        rank, address, scheme = body["rank"], body["address"], body["scheme"]
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < job.spec.get("nproc", 1):
            raise ApiError(400, "bad_request", "rank: one of the job's ranks")
        if not isinstance(address, str) or not ENDPOINT_ADDRESS.fullmatch(address) or \
                not 0 < int(address.rsplit(":", 1)[1]) < 65536:
            raise ApiError(400, "bad_request", "address: HOST:PORT")
        if scheme not in ("http", "https"):
            raise ApiError(400, "bad_request", "scheme: http or https")
        self.store.set_endpoint(job.id, rank, address, scheme)
        # `watched`: a scraper reads the service discovery, so the job can wait for its first scrape.
        read_at = self.discovery_read_at
        watched = read_at is not None and time.monotonic() - read_at < DISCOVERY_WATCHED_SECONDS
        return {"job_id": job.id, "rank": rank, "address": address, "scheme": scheme, "watched": watched}

    def withdraw_endpoint(self, job_id: str, token: str, rank: str | None) -> None:
        """A job process is done being scraped."""
        job = self._reporting_job(job_id, token)
        # As register_endpoint asks: a rank of 30 digits overflowed SQLite's integer (a 500).
        ranks = job.spec.get("nproc", 1)
        if not (rank and rank.isascii() and rank.isdigit() and len(rank) < 10 and int(rank) < ranks):
            raise ApiError(400, "bad_request", "rank: one of the job's ranks")
        self.store.remove_endpoints(job.id, int(rank))

    def discovery(self) -> list[dict]:
        """Every running job process's /metrics, in Prometheus' http_sd format; the job's identity goes in
        __meta_ labels (the series carry job_id themselves: a target label of that name would clash)."""
        self.discovery_read_at = time.monotonic()
        return [{"targets": [address], "labels": {"__scheme__": scheme, "__meta_trainmetrics_job_id": job_id,
                                                  "__meta_trainmetrics_owner": owner,
                                                  "__meta_trainmetrics_rank": str(rank)}}
                for job_id, owner, rank, address, scheme in self.store.endpoints()]

    def waiting_jobs(self) -> list["WaitingJob"]:
        """Every job whose state no process of its own publishes, for /metrics: queued and paused jobs (end None),
        and for FINAL_STATE_HOLD_SECONDS after it (and until its report is stored), the end of a job no process
        published (no run handle: cancelled while queued or paused, one that could not start, one whose process was
        killed without a result), so that Prometheus, the analytics' ledger and its stored report see it end."""
        waiting = [WaitingJob(job, job.state, None, job.state == "queued" and job.resume)
                   for job in self.store.list_jobs(states=WAITING_STATES)]
        # Running as the server sees it, but no process yet: queued, as far as Prometheus and the ledger are concerned.
        waiting += [WaitingJob(job, "queued", None, job.resume) for job in self.store.list_jobs(states=("running",))
                    if self._placing(job) is not None]
        now = time.time()
        # And after that until its report is stored (for as long as the keeper asks for it): a Prometheus down
        # for the whole hold came back to the dead process's last `running` (a paused or queued job's state) as
        # the job's last word, and the report stored then said `vanished` (`paused`) for good, or none was.
        unreported = self.uptime.asked_after(now) if self.settings.archive is not None else None
        ended = self.store.ended_without_run(FINAL_STATES, self.uptime.back(now, FINAL_STATE_HOLD_SECONDS), unreported)
        return waiting + [WaitingJob(job, job.state, job.ended, job.resume) for job in ended]


@dataclass(frozen=True)
class WaitingJob:
    """A job without a process of its own, as /metrics publishes it: its state, its end (one the server gave
    it), and whether it waits to resume (a queued job that ran before, resumed or queued again by a server's stop:
    the fleet's ledger counts that wait as paused, not queued); with an end, whether the job had run and waited to
    resume (queued or paused) when the server ended it (cancelled, or failed to start), not ended a run (killed
    without a result): after a killed run, the analytics take only the latter for the notice of its death."""

    job: JobRecord
    state: str
    end: float | None
    resuming: bool


def _open_file(name: str, missing: str, directory: int) -> BinaryIO:
    """A regular file of the open `directory` opened for a download (404 `missing` when there is none,
    or a symlink, a hard link or anything else is there: jobfiles.open_regular). Opened here, not by path when the
    answer is sent: a job prunes its checkpoints while it runs, and one deleted between the check and the send was
    a 500, or an answer cut after its headers; an open file stays readable to its end. A checkpoint is written to a
    temp file and renamed (one name): a file of two names is a hard link the job's own process planted, to the
    server's database or another owner's checkpoint, which O_NOFOLLOW does not see."""
    try:
        return open(open_regular(name, os.O_RDONLY, dir_fd=directory, one_name=True), "rb")
    except OSError:
        raise ApiError(404, "not_found", missing) from None
