"""Runs the job server's jobs through an executor, queued beyond a limit, and owns every state change that
follows a process: it starts queued jobs, learns each run's outcome from the result file the job writes
(trainmetrics.jobfiles; never from its log), adopts jobs that survived a server restart, resumes the ones
whose process died with the server, and signals stops. A cancel the job does not act on within
CANCEL_GRACE_SECONDS (a rank hung in C never reaches the step boundary it waits for) is carried out by
killing every process of the run.

Not thread-safe by design: the job server calls it from its one state thread only.
"""

import dataclasses
import errno
import hashlib
import hmac
import logging
import os
import secrets
import signal
import time
from pathlib import Path

from trainmetrics.contract import (BUILTIN_DATASETS, EXIT_STATES, REGISTER_TOKEN_VARIABLE, RESULT_PUBLISHED,
                                  RESULT_STARTED, STOP_VERBS, WAITING_STATES, ExitCode, exit_code_for,
                                  train_args)
from trainmetrics.edge import storage_full
from trainmetrics.jobfiles import (CONTROL_FILE_NAME, FINAL_MODEL_NAME, GPUS_FILE_NAME, LOG_NAME,
                                   PLACEMENT_WAIT_NAME, RESULT_FILE_NAME, may_hold_checkpoints, rank_result_path,
                                   read_result, read_small, replace_atomically, storable_text)
from trainmetrics.jobmap import gpu_spelling, same_gpu
from trainmetrics.jobserver.executors import Executor, ExecutorUnavailable, Run, StartDeferred
from trainmetrics.jobserver.local import LocalExecutor
from trainmetrics.jobserver.store import DatasetRecord, JobRecord, JobStore


log = logging.getLogger("trainmetrics.server")

# The stop the server itself asks of a running job when it stops: a pause, recorded as its own (not a user's),
# so that whenever the job is seen paused by it (at once, or after the next start adopted it) it is queued to
# resume, while a user's pause stays paused.
SHUTDOWN_PAUSE = "shutdown"
# Signals a process dies of by its own fault (a native crash, an abort), not a kill from outside: a run that dies of one
# while its accepted stop is under way failed (it was `paused` with no error, its crash unsaid).
CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS,
                     signal.SIGTRAP})
# How strongly each stop binds: a cancel accepted after a pause wins, a pause never undoes a cancel, and a
# user's pause or cancel takes over from the server's own shutdown pause.
STOP_STRENGTH = {None: 0, SHUTDOWN_PAUSE: 0, "paused": 1, "cancelled": 2}
# The stopped states a run may tell by a stop the server sent, for each stop under way: another (a rank stopped by
# torchrun's SIGTERM after a peer died) is its launcher's.
SENT_STOPS = {None: (), SHUTDOWN_PAUSE: ("paused",), "paused": ("paused",), "cancelled": ("paused", "cancelled")}
# When the executor cannot be asked to start a run (Ray's head down; the executor itself waits before it
# asks again), the outage is said at most once per this many seconds.
UNAVAILABLE_LOG_SECONDS = 60.0
# A cancelled job that has not stopped this long after its cancel was accepted is killed, every process of it,
# and ends cancelled: a rank hung in C or in a collective never reaches the step boundary the cancel waits
# for, and would hold its slot until the collective's own timeout (30 minutes for gloo). A pause is never
# killed: it exists to leave a checkpoint.
CANCEL_GRACE_SECONDS = 60.0
# One tick polls (and kills) runs until this long has gone on them, and starts queued jobs until this long has gone
# on starts (one at least, whatever the polls took): the rest wait for the next tick, the runs polled longest ago
# first. A Ray head answering each request in 9 s held the state thread (every API request behind it) for 9 s per
# run and per start, a minute and more a tick; a local executor never reaches it.
TICK_BUDGET_SECONDS = 2.0
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
# The largest gpus file read: 64 ranks' UUIDs are under 6 KiB.
MAX_GPUS_FILE_BYTES = 64 * 1024
# What a job's error shows in place of the server's data dir (no answer shows a server path).
DATA_DIR_SHOWN = "<data dir>"
# The most of a result's error a job keeps (a multi-rank job's, naming its ranks, too): a trainer's is 500 at most.
MAX_ERROR_LENGTH = 1000


def token_digest(token: str) -> str:
    """How a run's secret is kept: its SHA-256, never the secret."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(job: JobRecord, presented: str) -> bool:
    """True when `presented` is the secret of the job's current run (constant time)."""
    return job.run_token is not None and hmac.compare_digest(job.run_token, token_digest(presented))


def _first_to_fail(failed: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    """The (rank, result) of the failed rank that ended first, by the end each result tells; None unless every
    failed rank tells one (a rank that failed before its metrics existed tells none: no order to go by)."""
    if not failed or not all(isinstance(said.get("end_time"), (int, float)) and not isinstance(said["end_time"], bool)
                             for _, said in failed):
        return None
    return min(failed, key=lambda rank_said: rank_said[1]["end_time"])


def _error_of(result: dict) -> str:
    """A failed result's error with its type once: a trainer's error begins with its type already ("rank 1:
    RuntimeError: RuntimeError: ..." was said)."""
    kind, error = result.get("error_type") or "failed", result.get("error") or ""
    return error if error.startswith(f"{kind}: ") else f"{kind}: {error}".rstrip(": ")


class StopRefused(Exception):
    """A stop that cannot be accepted; the message says why."""


class Supervisor:
    """Starts, watches and signals the job processes."""

    def __init__(self, store: JobStore, data_dir: Path, job_dir: Path | None, max_concurrent: int,
                 linger_timeout: float = 15.0, executor: Executor | None = None,
                 advertise_url: str | None = None, cancel_grace: float = CANCEL_GRACE_SECONDS,
                 gpus: tuple[str, ...] = ()):
        self.store = store
        self.data_dir = Path(data_dir)
        self.job_dir = job_dir
        self.advertise_url = advertise_url      # how jobs reach this server, to report their endpoints
        self.max_concurrent = max_concurrent
        self.linger_timeout = linger_timeout
        self.executor = executor or LocalExecutor()
        self.cancel_grace = cancel_grace
        self.runs: dict[str, Run] = {}      # job id -> its process, started here or adopted
        # The GPUs local jobs are given (CUDA_VISIBLE_DEVICES entries: host indices, or what the server's own
        # CUDA_VISIBLE_DEVICES lists), and which job holds which: every local job had trained on GPU 0 (its ranks
        # on 0 to nproc - 1), however many GPUs --max-concurrent counted one job per.
        self.gpus = tuple(gpu_spelling(gpu) or gpu for gpu in gpus)     # spelt as the gpus files are read
        self._gpus_held: dict[str, tuple[str, ...]] = {}
        self._unavailable_said_at = float("-inf")
        # Why queued jobs wait, as the last pass over them found (waiting_for): the executor could not start
        # any (Ray's head down or failing inside, a full disk): (what it said, since when, unix time, the owner of
        # the job whose start it said it of), until one start gets an answer; and each job whose start the executor
        # put off, with its words.
        self._held_back: tuple[str, float, str] | None = None
        self._deferred: dict[str, str] = {}
        self._untaken_tokens: dict[str, str] = {}   # job id -> the run secret of a start the executor did not take
        # job id -> when its cancel was accepted (monotonic; at adoption after a restart), while it runs
        self._cancelled_at: dict[str, float] = {}
        self._killed: set[str] = set()      # runs killed for not stopping within the cancel's grace
        # Runs whose stop went out though the store still marks it unsent (the write that clears the mark failed):
        # the mark is cleared again at each tick (JobRecord.stop_unsent).
        self._sent_unmarked: set[str] = set()
        self._polled_at: dict[str, float] = {}      # job id -> when a tick last polled its run (monotonic)
        self._put_off_cut: set[str] = set()         # queued jobs the next pass skips (tick)
        self._not_reached: set[str] = set()         # queued jobs the last pass ran out of its budget before

    def job_path(self, job_id: str) -> Path:
        """The job's own directory (checkpoints, final model, log, result)."""
        return self.data_dir / "jobs" / job_id

    def checkpoint_dir(self, job_id: str) -> Path:
        """Where the job's checkpoints and model.pt go."""
        return self.job_path(job_id) / "checkpoints"

    def log_path(self, job_id: str) -> Path:
        """The job process's stdout and stderr."""
        return self.job_path(job_id) / LOG_NAME

    def result_path(self, job_id: str) -> Path:
        """Where the job's process writes its outcome."""
        return self.job_path(job_id) / RESULT_FILE_NAME

    def final_model(self, job_id: str) -> Path:
        """Path of the job's final weights (may not exist yet)."""
        return self.checkpoint_dir(job_id) / FINAL_MODEL_NAME

    def datasets_dir(self) -> Path:
        """Where uploaded datasets are kept."""
        return self.data_dir / "datasets"

    def dataset_file(self, job: JobRecord) -> str:
        """The job's --dataset: a built-in's name, or its uploaded file in this data dir, found by its dataset
        id when the job starts (a spec holds no server path; a data dir moved or reached by another relative
        path still works)."""
        dataset = job.spec.get("dataset", "blobs")
        if dataset in BUILTIN_DATASETS:
            return dataset
        record = self.store.get_dataset(dataset, None)
        if record is None:
            raise FileNotFoundError(f"dataset {dataset} is not in the data dir")
        return str(self.uploaded_file(record))

    def uploaded_file(self, record: DatasetRecord) -> Path:
        """An uploaded dataset's file in this data dir (by its file name: the stored path may be relative to an
        older server's working directory)."""
        return self.datasets_dir() / Path(record.path).name

    # ----- starting ----------------------------------------------------------------------------------
    def train_args(self, job: JobRecord) -> list[str]:
        """The `trainmetrics train` arguments of a job: its spec, and what the server decides."""
        spec = job.spec
        values = {**{name: value for name, value in spec.items() if name not in ("dataset", "nproc")},
                  "job_id": job.id, "job_name": job.name, "owner": job.owner, "dataset": self.dataset_file(job),
                  "checkpoint_dir": self.checkpoint_dir(job.id), "result_file": self.result_path(job.id),
                  "job_dir": self.job_dir, "linger_timeout": self.linger_timeout,
                  # A job whose directory holds checkpoints continues from them: a run this server lost before
                  # recording it (killed at the next start) wrote them, and a fresh run refuses such a directory.
                  # (Read bounded, on the state thread: one too full to tell resumes, its run reading them all.)
                  "resume": job.resume or may_hold_checkpoints(self.checkpoint_dir(job.id)),
                  "submitted_at": job.created, "diagnostics_dir": self.job_path(job.id),
                  "register_url": f"{self.advertise_url}/api/internal/jobs/{job.id}/endpoints"
                  if self.advertise_url else None}
        return train_args(values)

    def start(self, job: JobRecord, gpus_owed: tuple[int, str] | None = None) -> None:
        """Start the job's process; an older run's result is removed first, so only this run's can be read.
        `gpus_owed`: how many GPUs a job queued before it waits for (GpusDeferred), which the free ones go to
        first, and that job's owner."""
        if job.spec_unreadable:
            raise ValueError("its stored spec is not a JSON object (the server's database was edited or damaged)")
        gpus = self._gpus_for(job, gpus_owed)        # first: a job that must wait for GPUs changes nothing
        self.checkpoint_dir(job.id).mkdir(parents=True, exist_ok=True)
        self.executor.clear_way(job.id, self.job_path(job.id))      # before the arguments: --resume is decided
        # A retry of a start the executor may have received though its answer was lost (a Ray submission, taken
        # by the retry, not started twice) keeps the files: they are that run's. Its own result was removed, and
        # the job's run ended after it, so a run that finished before the retry got through was `failed`.
        if job.id not in self._untaken_tokens:
            result = self.result_path(job.id)
            ranks_results = [rank_result_path(result, rank) for rank in range(1, job.spec.get("nproc", 1))]
            # (And what an earlier Ray launcher killed while Ray placed its ranks left: the new run was published
            # `queued`, waiting for that placement, until its own launcher removed it.)
            for leftover in (result, *ranks_results, self.job_path(job.id) / CONTROL_FILE_NAME,
                             self.job_path(job.id) / PLACEMENT_WAIT_NAME):
                leftover.unlink(missing_ok=True)          # only this run's may be read
            self.store.remove_endpoints(job.id)
        token = self._untaken_tokens.pop(job.id, None) or secrets.token_urlsafe(24)
        try:
            environment = {REGISTER_TOKEN_VARIABLE: token}
            if gpus:
                environment[CUDA_VISIBLE_DEVICES] = ",".join(gpus)
            if self.executor.name == "local":
                # For a restart's adoption; written empty for a run given none: an older run's file, left, was read
                # as this run's GPUs, and no file at all is a run of a server from before the files. Replaced, not
                # written through: a link planted at its name had the file it named overwritten.
                replace_atomically(self.job_path(job.id) / GPUS_FILE_NAME, ",".join(gpus), mode=0o644)
            run = self.executor.start(job.id, job.spec.get("nproc", 1), self.train_args(job), self.job_path(job.id),
                                      environment)
        except ExecutorUnavailable:
            self._untaken_tokens[job.id] = token    # the submission a retry may find received keeps its secret
            raise
        try:
            self.store.update_job(job.id, state="running", pid=run.pid, handle=run.handle,
                                  executor=self.executor.name, started=job.started or time.time(), exit_code=None,
                                  error=None, requested=None, run_token=token_digest(token), reason=None)
        except Exception as error:
            # Not recorded: the run must not train on unwatched while its job stays queued (or is failed).
            self.executor.kill(run)
            deadline = time.monotonic() + 5.0
            while not self.executor.poll(run)[0] and time.monotonic() < deadline:     # reaped, no zombie left
                time.sleep(0.05)
            raise ExecutorUnavailable(f"its start could not be recorded ({type(error).__name__}: {error}); "
                                      "the run was killed and the job stays queued") from error
        self.runs[job.id] = run
        if gpus:
            self._gpus_held[job.id] = gpus
        log.info("job %s: started %s %s%s%s", job.id, self.executor.name, run.handle,
                 f" on GPU {','.join(gpus)}" if gpus else "", " (resuming)" if job.resume else "")

    def _gpus_for(self, job: JobRecord, gpus_owed: tuple[int, str] | None = None) -> tuple[str, ...]:
        """The GPUs a local job is given, one per rank, in the server's order (rank r's cuda:r is the r-th): none on
        a machine without GPUs, on another executor (Ray places its own), for a job whose device is `cpu` or names
        its GPU (`cuda:N`). GpusDeferred while fewer are free, or while a job queued before it waits for GPUs
        (`gpus_owed`): GPUs go in the queue's order, else a stream of jobs needing fewer kept a larger one waiting
        for good. ValueError for one with more ranks than the server has GPUs (gpus_lacking)."""
        if problem := self.gpus_lacking(job.spec):
            raise ValueError(problem)
        nproc = self._gpu_ranks(job.spec)
        if nproc is None:
            return ()
        if gpus_owed is not None:
            owed, owner = gpus_owed
            # How many another owner's job waits for is not this owner's to read (that job is "not found" to them).
            needs = f", which waits for {owed}" if owner == job.owner else ""
            raise GpusDeferred(nproc, f"{nproc} free GPU(s): the GPUs freed go first to a job queued before "
                                      f"it{needs}")
        held = {gpu for gpus in self._gpus_held.values() for gpu in gpus}
        free = [gpu for gpu in self.gpus if gpu not in held]
        if len(free) < nproc:
            raise GpusDeferred(nproc, f"{nproc} free GPU(s) of the {len(self.gpus)} local jobs are given: "
                                      f"{len(free)} free now")
        return tuple(free[:nproc])

    def _gpu_ranks(self, spec: dict) -> int | None:
        """How many ranks of a job of this spec would each take a GPU of this server's, or None where it is given
        none (no GPUs, another executor, a device of `cpu` or `cuda:N`)."""
        nproc = spec.get("nproc", 1)
        if (not self.gpus or self.executor.name != "local" or spec.get("device", "auto") not in ("auto", "cuda")
                or not isinstance(nproc, int)):
            return None
        return nproc

    def gpus_lacking(self, spec: dict) -> str | None:
        """Why a job of this spec can never be given its GPUs here, or None: more ranks, each taking a GPU, than this
        server has GPUs. (Started with none of its own, such a job's ranks took cuda:0, cuda:1, ..., GPUs other jobs
        had been given, until the one past the last failed with CUDA's "invalid device ordinal".)"""
        nproc = self._gpu_ranks(spec)
        if nproc is None or nproc <= len(self.gpus):
            return None
        return (f"{nproc} ranks on device {spec.get('device', 'auto')!r} each take a GPU of their own, and this "
                f"server gives its local jobs {len(self.gpus)} GPU(s): ask for at most {len(self.gpus)} rank(s), or "
                "for device 'cpu'")

    def untaken_token_matches(self, job_id: str, presented: str) -> bool:
        """True when `presented` is the secret of a start of the job the executor may have received though its
        answer was lost: that run reports its endpoint before a retry records it (constant time)."""
        token = self._untaken_tokens.get(job_id)
        return token is not None and hmac.compare_digest(token_digest(token), token_digest(presented))

    def abandon(self, job: JobRecord) -> None:
        """A queued job cancelled: a start of it that the executor may have received without answering (a Ray
        submission whose answer was lost), or that a server killed before it recorded the run left running,
        must not train on unseen (clear_way stops those when the job starts again: a cancelled job never does)."""
        self._untaken_tokens.pop(job.id, None)
        self.store.remove_endpoints(job.id)     # what such a start reported: that run is stopped
        if self.job_path(job.id).is_dir():       # never started: nothing can run for it
            self.executor.abandon(job.id, self.job_path(job.id))

    # ----- watching ----------------------------------------------------------------------------------
    def running_count(self) -> int:
        """Job processes alive now."""
        return len(self.runs)

    def tick(self) -> None:
        """Kill cancelled runs past their grace, reap ended ones, then start queued jobs while there is room."""
        for job_id in list(self._sent_unmarked):
            self._mark_sent(job_id)
        polls_began = time.monotonic()
        # A run this tick sees first counts as polled now, behind the runs polled before: taken for one polled
        # longest ago, each run started since went first, and on a slow head, whose tick polls one run and starts
        # one, the runs started the tick before took every poll while the queue lasted (an older run's end, and
        # its cancel's kill, never came).
        self._polled_at = {job_id: self._polled_at.get(job_id, polls_began) for job_id in self.runs}
        for job_id in sorted(self._polled_at, key=self._polled_at.get):
            if time.monotonic() - polls_began >= TICK_BUDGET_SECONDS:
                break
            self._polled_at[job_id] = time.monotonic()
            run = self.runs[job_id]
            self._kill_if_cancel_overdue(job_id, run)
            ended, code = self.executor.poll(run)
            if ended:
                self._reap(job_id, code)
        self.executor.reap()
        queued = self.store.queued_jobs()
        self._deferred = {job.id: self._deferred[job.id] for job in queued if job.id in self._deferred}
        held_back = False       # this pass's start found the executor unable to start any
        starts_began = time.monotonic()
        gpus_owed = None        # the GPUs the first job of this pass to wait for them needs, and its owner
        # The jobs the executor put off in passes the budget cut short: skipped until a pass is not cut short.
        skipped, put_off = self._put_off_cut, set()
        for position, job in enumerate(queued):
            if self.running_count() >= self.max_concurrent:
                break
            if job.id in skipped:
                continue
            if time.monotonic() - starts_began >= TICK_BUDGET_SECONDS:
                # Not a held back: this pass tried no more (nor a reset of one: _held_back kept). The jobs it put
                # off wait for the jobs behind them to have their try: tried first at every pass, a job the executor
                # kept putting off spent each budget, and the jobs behind it never started.
                self._put_off_cut = (skipped | put_off) & {waiting.id for waiting in queued}
                self._not_reached = {waiting.id for waiting in queued[position:]}
                return
            try:
                self.start(job, gpus_owed)
            except StartDeferred as why:     # not yet: it stays queued; the jobs behind it may start
                log.debug("job %s: not started yet: %s", job.id, why)
                self._deferred[job.id] = str(why)
                if isinstance(why, GpusDeferred):
                    gpus_owed = (why.nproc, job.owner) if gpus_owed is None else gpus_owed
                    # Put off before the executor was asked: no answer of its. (Taken as one, a job waiting for
                    # GPUs began the held back anew at each pass, which JobServerNotStartingJobs then never saw.)
                    # (Never skipped: it keeps its place, the GPUs freed going to it first.)
                    continue
                put_off.add(job.id)
            except ExecutorUnavailable as error:     # not the job's failure: it stays queued, tried again later
                self._executor_unavailable(job, error)
                held_back = True
                break
            except Exception as error:      # this job's own failure: the jobs queued behind it still start
                if storage_full(error) or _short_of_resources(error):
                    # Not the job's either (it was failed for good, and so was every job behind it in the same
                    # pass): queued until there is room, or a process, a descriptor or memory to start it with.
                    self._executor_unavailable(job, error)
                    held_back = True
                    break
                self._failed_to_start(job, error)
            else:
                self._deferred.pop(job.id, None)
            self._held_back = None          # the executor answered this start
        self._put_off_cut = set()       # a pass not cut short (all tried, or no slot left): each is tried again
        self._not_reached = set()
        if not held_back:
            # No start of this pass failed: none was tried (the queue emptied, a cancel took the job that failed;
            # every slot taken) or one got through. Kept, a held back with no job queued stayed published and
            # paged JobServerNotStartingJobs, and a job queued later was said to wait for it before any try.
            self._held_back = None

    @property
    def held_back_since(self) -> float | None:
        """Since when (unix time) the executor could not start any job, while it cannot; else None."""
        held = self._held_back
        return None if held is None else held[1]

    def waiting_for(self, job: JobRecord) -> str | None:
        """What a queued job waits for, as the last pass over the queue found, in words that follow "waiting
        for": the executor to start jobs again (it could not start one: a permanent Ray 500 kept every job queued
        with nothing but a log line to say why), its own start the executor put off, its turn in a pass that ran out
        of its budget before it, or a free slot; None when it starts at the next pass."""
        if job.state != "queued":
            return None
        if self._held_back is not None:
            said, since, whose = self._held_back
            if whose != job.owner:
                # Its words are of another owner's job's start (a full disk names that job's files): not theirs to
                # read, nor that job's id.
                said = "it could not start a queued job"
            return (f"the {self.executor.name} executor to start jobs again: {said} (since "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}; tried again until it does)")
        if job.id in self._deferred:
            return f"its start, put off: {self._deferred[job.id]}"
        if job.id in self._not_reached:
            # (Said as None, "starts at the next pass", while a slow head took every pass's budget before it.)
            return (f"its turn: the last pass over the queue spent its {TICK_BUDGET_SECONDS:g} s starting the jobs "
                    f"before it (the {self.executor.name} executor is slow to start jobs)")
        if self.running_count() >= self.max_concurrent:
            return (f"a free slot: {self.running_count()} job(s) running, at most {self.max_concurrent} at once "
                    "(--max-concurrent)")
        return None

    def _kill_if_cancel_overdue(self, job_id: str, run: Run) -> None:
        """Kill the run when its cancel was accepted more than the grace ago (once the kill went out)."""
        accepted = self._cancelled_at.get(job_id)
        if accepted is None or job_id in self._killed or time.monotonic() - accepted < self.cancel_grace:
            return
        if self.executor.kill(run):
            self._killed.add(job_id)
            log.warning("job %s: not stopped %g s after its cancel: killing every process of it", job_id,
                        self.cancel_grace)

    def _reap(self, job_id: str, code: int | None) -> None:
        """A run ended: record how, and forget it."""
        # Recorded first: a write that fails (the database locked, a full disk) leaves the run to be reaped again at
        # the next tick, instead of forgetting it with its job `running` for good. Once (a job no longer running
        # has its end: decided again, with its stop request cleared, a cancel accepted after a pause came out
        # paused), what failed after it done again.
        job, run = self.store.get_job(job_id), self.runs[job_id]
        if job is not None and job.state == "running":
            # A kill that came after the run had ended by itself (failed on its own as its cancel's grace ran out)
            # is not what ended it: the run's end stands, not `cancelled`.
            killed = job_id in self._killed and run.ended_by_itself is not True
            self._ended(job_id, code, killed, job, said=run.end_said)
        else:
            if job is None:
                # Deleted from the store by hand while it ran: no record to end (deciding its end raised at every
                # tick, so its slot was never freed and no queued job started again).
                log.warning("job %s: its run ended, but the job is no longer in the store: forgotten", job_id)
            self.store.remove_endpoints(job_id)
        del self.runs[job_id]
        self._gpus_held.pop(job_id, None)
        self._cancelled_at.pop(job_id, None)
        self._killed.discard(job_id)
        self._sent_unmarked.discard(job_id)     # its end's record cleared the mark (a write of `requested`)

    def _executor_unavailable(self, job: JobRecord, error: Exception) -> None:
        # Masked before it is cut: a data dir the cut went through was shown in part.
        said = " ".join(self._without_data_dir(str(error)).split())[:300]
        self._held_back = (said, self._held_back[1] if self._held_back is not None else time.time(), job.owner)
        now = time.monotonic()
        if now - self._unavailable_said_at >= UNAVAILABLE_LOG_SECONDS:
            self._unavailable_said_at = now
            log.warning("job %s: not started: %s; queued jobs stay queued and are tried again", job.id, error)

    def _failed_to_start(self, job: JobRecord, error: Exception) -> None:
        self.runs.pop(job.id, None)
        self._gpus_held.pop(job.id, None)
        # A retried start's first try, which the executor may have received (a Ray submission whose answer was
        # lost), reported its endpoint with the start's secret; that run is stopped with the job's failure, and its
        # endpoint left service discovery with it (it stayed, a dead target of a failed job).
        self.store.remove_endpoints(job.id)
        # Masked before it is cut: a data dir the cut went through was shown in part.
        message = self._without_data_dir(f"could not start: {type(error).__name__}: {error}").splitlines()[0][:500]
        self.store.update_job(job.id, state="failed", error=message, ended=time.time(), pid=None, handle=None,
                              exit_code=None, requested=None, run_token=None)
        log.exception("job %s: %s", job.id, message)

    def _ended(self, job_id: str, code: int | None, killed: bool = False, job: JobRecord | None = None,
               at: float | None = None, said: str | None = None) -> None:
        """Record how a run ended: its result decides; without one, a signal or exit code is a failure. A run
        killed after its cancel's grace is cancelled, unless it completed first. (`job`: its record, where the
        caller just read it; `at`: when the run ended, where not now; `said`: the executor's own words for the
        run's failure, Ray's message, which a failure without a result carries.)"""
        job = job or self.store.get_job(job_id)
        # The stop a user was answered for: a stop recorded but never sent is none (a pause under way, then a cancel
        # that was not sent, ended the paused job cancelled).
        job = dataclasses.replace(job, requested=self._stop_under_way(job))
        result = read_result(self.result_path(job_id))
        reason = published = None
        told = result is not None and result.get("state") in EXIT_STATES.values()
        if told:
            # The result says how the run ended, whatever killed the process after it was written.
            state, error = result["state"], result.get("error")
            error = error[:MAX_ERROR_LENGTH] if error is not None else None
            # The process published it, unless its result says no scraper read it: it ended before it published
            # anything (refused its arguments; a Ray run stopped before Ray placed a rank: Prometheus and the
            # analytics kept the job `queued` or `paused`), or no scrape came during its final linger (Prometheus
            # down: the process's last `running` stayed the job's last word, and its stored report said
            # `vanished` for good). The server publishes such an end itself.
            published = state if result.get(RESULT_PUBLISHED) is not False else None
            code = _code_of(state, result.get("exit_code"), code)
            reason = result["reason"][:500] if result.get("reason") is not None else None
        elif self._stop_stands(job) and (code is None or (code < 0 and -code not in CRASHES)):
            # Lost (Ray's head gone, an adopted process), or killed without a result by a signal the server did not
            # send (the OOM killer, a person; it was `failed` then) or by its cancel's kill, after a stop was
            # accepted with a 202: that stop stands, as at a server restart (_resume_or_fail); a pause resumes from
            # the last checkpoint. Not a crash of its own (CRASHES): that is the run's failure, said as such. The
            # server's own shutdown pause stands as the restart keeps it: queued to resume (below).
            state, error = ("paused" if job.requested == SHUTDOWN_PAUSE else job.requested), None
            if code is not None and not killed:     # (its cancel's kill was said as it went out)
                log.warning("job %s: killed by %s without a result; %s as requested before", job_id,
                            _signal_name(-code), state)
        elif code is not None and code < 0:
            state, error = "failed", f"killed by {_signal_name(-code)} without a result"
        elif code is not None:
            state, error = "failed", f"exit code {code} without a result"
        else:
            state, error = "failed", ("its process ended without a result or an exit code (adopted after a server "
                                      "restart, or its Ray submission stopped or lost)")
        # What failed it, where no result tells and no signal does: Ray's message for a run a signal killed is
        # its entrypoint's exit code again and the log's tail (500 characters of it, after "killed by SIGKILL").
        if said and not told and state == "failed" and (code is None or code >= 0):
            error = f"{error}; {said}"
        if told and state not in SENT_STOPS[job.requested] and state in ("paused", "cancelled") \
                and self._another_rank_failed(job, result):
            # A stop the server never sent: torchrun stops the other ranks (SIGTERM) when one fails, and rank 0,
            # stopped so before it noticed the failure (waiting for the ranks to join), said `cancelled`: the job
            # read as cancelled by its user, the failure unsaid.
            error = f"{state} by a stop the server did not send (its launcher's, after another rank failed)"
            state, code, reason = "failed", int(ExitCode.FAILED), None
        if state in ("paused", "cancelled") and STOP_STRENGTH[job.requested] > STOP_STRENGTH[state]:
            state = job.requested    # a cancel accepted after the pause that stopped the process
        if state == "paused" and job.requested == SHUTDOWN_PAUSE and reason is None:
            # Paused by a server's stop: it resumes at this (or the next) start, queued as a resume queues it,
            # without the run's outcome (a pause's exit code 4 showed on the job cancelled while it waited). Not a
            # run that paused itself meanwhile (its reason: a loss spike), which waits for its user: it was
            # resumed at the next start, the spike's reason dropped.
            state, code, reason = "queued", None, None
        if killed and state == "failed":
            state = "cancelled"      # the kill (or the hang it ended) failed it: the cancel was accepted first
        if state in ("completed", "paused", "cancelled") and code is not None and EXIT_STATES.get(code) != state:
            # A code that stands for the state the job ends in: a paused or cancelled job killed (-9) while its
            # stop's checkpoint was written, or a cancel accepted after the pause the run said (4), kept the run's.
            code = int(exit_code_for(state))
        if state != "failed":
            error = None
        elif job.spec.get("nproc", 1) > 1:
            error = self._ranks_said(job, result, error)
        if isinstance(error, str):       # a trainer's error names the files it could not use: no server path
            error = self._without_data_dir(error)
        waiting = state in WAITING_STATES
        # A run no rank of which started (stopped while Ray placed its ranks, its arguments refused) ended the job's
        # wait, not a run: a resumed job's end says it had waited to resume (WaitingJob.resuming), as a cancel while
        # it was queued does. (Said as a run's end, the analytics took it, after a killed run, for the notice of that
        # death: the job ended at the kill, and its wait to the cancel was in no phase.)
        wait_ended = job.resume and result is not None and result.get(RESULT_STARTED) is False
        # A final state its process did not publish (killed without a result, or a cancel that overrode what it
        # said): the run's handle goes, so the server publishes it (JobService.waiting_jobs) and Prometheus, the
        # analytics and the dashboards end the job as the job API does, not `running` gone stale.
        unpublished = {"pid": None, "handle": None} if not waiting and state != published else {}
        self.store.update_job(job_id, state=state, exit_code=code if isinstance(code, int) else None, error=error,
                              ended=None if waiting else at or time.time(), resume=waiting or wait_ended,
                              requested=None, run_token=None, reason=reason, **unpublished)
        self.store.remove_endpoints(job_id)
        log.info("job %s: %s (exit code %s)%s", job_id, state, code, _ended_how(state, killed, self.cancel_grace))

    def _without_data_dir(self, error: str) -> str:
        """An error with the server's data dir shown as DATA_DIR_SHOWN (no answer shows a server path), as text the
        store can hold (storable_text: the data dir is text, cli.check_text_path, but what an error names may not
        be)."""
        for data_dir in sorted({str(self.data_dir.resolve()), str(self.data_dir)}, key=len, reverse=True):
            error = error.replace(data_dir, DATA_DIR_SHOWN)       # the longer first: one may hold the other
        return storable_text(error)

    def _stop_stands(self, job: JobRecord) -> bool:
        """True when the job's accepted stop decides a run's end that left no result: a user's pause or cancel, or
        the server's own shutdown pause where the job has a checkpoint to resume from (as _resume_or_fail keeps
        it at a restart; one without fails)."""
        if job.requested == SHUTDOWN_PAUSE:
            return may_hold_checkpoints(self.checkpoint_dir(job.id))
        return job.requested in ("paused", "cancelled")

    def _another_rank_failed(self, job: JobRecord, result: dict) -> bool:
        """True when a rank other than 0 of a multi-rank run says it failed, or left no result at all: every rank
        writes one as it ends, so a silent rank was killed (the OOM killer, a crash) before it could. Not where rank
        0's `result` says no rank started (a Ray run stopped while Ray placed its ranks, `ray job stop` included):
        no rank wrote one, and the job ended `failed`."""
        if result.get(RESULT_STARTED) is False:
            return False
        path = self.result_path(job.id)
        return any((read_result(rank_result_path(path, rank)) or {"state": "failed"}).get("state") == "failed"
                   for rank in range(1, job.spec.get("nproc", 1)))

    def _ranks_said(self, job: JobRecord, result: dict | None, error: str | None) -> str:
        """A failed multi-rank run's error, naming its ranks: those that ended without a result while others
        wrote theirs (killed, lost: the likely cause; the others then fail in a collective, "connection reset by
        peer"), the rank that failed first when another than rank 0 did (its error the cause, rank 0's then its
        consequence), or, when rank 0 left no result, the first failure another rank reported."""
        nproc = job.spec["nproc"]
        results = {0: result, **{rank: read_result(rank_result_path(self.result_path(job.id), rank))
                                 for rank in range(1, nproc)}}
        silent = [rank for rank, said in results.items() if said is None]
        if len(silent) == nproc:        # all died together (the launcher killed, a node lost): nothing to tell apart
            return error
        parts = [f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} ended without a result "
                 f"(killed or lost: see {LOG_NAME})"] if silent else []
        failed = [(rank, said) for rank, said in results.items() if said and said.get("state") == "failed"]
        first = _first_to_fail(failed)
        if first is None and result is not None and result.get("state") != "failed" and failed:
            first = failed[0]       # rank 0 stopped, not failed (_ended): the other ranks' failure is the cause
        if result is None:
            parts += [f"rank {rank}: {_error_of(said)}" for rank, said in ([first] if first else failed[:1])]
        elif first is not None and first[0] != 0 and _error_of(first[1]) != _error_of(result):
            parts.append(f"rank {first[0]} failed first: {_error_of(first[1])}")
        parts.append(f"rank 0: {error or 'failed'}" if result is not None else str(error))
        return "; ".join(parts)[:MAX_ERROR_LENGTH]

    def _resume_or_fail(self, job: JobRecord, why: str) -> None:
        """A run gone without a result: the stop a user was promised (202) stands; else it resumes from its last
        checkpoint, or fails without one."""
        self.store.remove_endpoints(job.id)
        # A stop recorded but never sent was promised to no one (its request was answered with an error).
        job = dataclasses.replace(job, requested=job.stop_under_way)
        if job.requested in ("paused", "cancelled"):
            paused = job.requested == "paused"
            # No handle: its process is gone without a final state; the server publishes this one (jobs.py).
            self.store.update_job(job.id, state=job.requested, resume=paused, pid=None, handle=None, requested=None,
                                  run_token=None, error=None, ended=None if paused else time.time())
            log.warning("job %s: %s; %s as requested before", job.id, why, job.requested)
        elif may_hold_checkpoints(self.checkpoint_dir(job.id)):
            self.store.update_job(job.id, state="queued", resume=True, pid=None, requested=None, run_token=None)
            log.warning("job %s: %s; queued to resume from its last checkpoint", job.id, why)
        else:
            # (Not resuming: this end is the notice of the run's loss, not of a wait's end: WaitingJob.resuming.)
            self.store.update_job(job.id, state="failed", error=f"{why} before its first checkpoint",
                                  ended=time.time(), resume=False, requested=None, run_token=None, pid=None,
                                  handle=None)
            log.warning("job %s: %s and had no checkpoint: failed", job.id, why)

    def _adopt_gpus(self, job: JobRecord) -> None:
        """The GPUs an adopted local run was given, as its start noted them (the job's gpus file): given again to
        no other job while it runs. A run without the file was started by a server from before it, which gave
        none: a GPU job's ranks took the server's first GPUs (cuda:0 to nproc - 1), and a job given those again
        shared them. A file that does not say which (damaged, edited, something else at its name) leaves the run
        holding every GPU until it ends: it held none, and its GPUs went to the next job."""
        if not self.gpus or self.executor.name != "local":
            return
        path = self.job_path(job.id) / GPUS_FILE_NAME
        if not os.path.lexists(path):
            nproc = self._gpu_ranks(job.spec)
            noted = self.gpus[:nproc] if nproc is not None else ()
        else:
            noted = _gpus_noted(path)
            if noted is None:
                log.warning("job %s: its %s file does not say which GPUs its run was given: the run holds every GPU "
                            "until it ends", job.id, GPUS_FILE_NAME)
                noted = self.gpus
        # (A GPU it names that this server does not give, this server's share changed since: nobody's to hold. One
        # it names otherwise, a UUID where the server lists a prefix of it or the reverse, is the same GPU.)
        gpus = tuple(gpu for gpu in self.gpus if any(same_gpu(gpu, named) for named in noted))
        if gpus:
            self._gpus_held[job.id] = gpus

    def recover(self) -> None:
        """After a (re)start: adopt running jobs whose process lives on; for the others, their result decides,
        else they resume from their last checkpoint (or fail without one)."""
        for job in self.store.list_jobs(states=("running",)):
            run = self.executor.adopt(job.id, job.run_handle, self.job_path(job.id))
            if run is not None:
                self.runs[job.id] = run
                self._adopt_gpus(job)
                if job.stop_unsent is not None:
                    # A stop recorded, never sent, whose record's undo failed (a full disk) before the server died:
                    # under way is the stop before it, as the store's mark says; taken back now, where it can be.
                    self._undo_stop(job.id, job.stop_under_way, quiet=True)
                if job.stop_under_way == "cancelled":     # the grace starts again: when it began died with the server
                    self._cancelled_at[job.id] = time.monotonic()
                log.info("job %s: still running as %s, adopted", job.id, run.handle)
            elif (result := read_result(self.result_path(job.id))) is not None:
                # It ended while no server watched it: when, its result says (the restart may be hours later).
                self._ended(job.id, None, job=job, at=_end_told(result, job))
            else:
                self._resume_or_fail(job, "the server restarted and its process was gone")

    # ----- signalling --------------------------------------------------------------------------------
    def request_stop(self, job: JobRecord, outcome: str) -> None:
        """Ask a running job to stop at its next step boundary; the request is recorded, then the signal sent (and
        the record undone when none could be), so the job ends in the state this answer promises. StopRefused
        otherwise. Recorded first: a write that fails (the database locked, a full disk) has sent nothing, where
        a signal already sent was sent again by the client's retry.

        A stop already under way is not signalled again: a second signal that lands while the process exits
        can kill it there. A pause during the server's own shutdown pause needs no signal either."""
        run = self.runs.get(job.id)
        if job.state != "running" or run is None:
            raise StopRefused(f"job {job.id} is {job.state}: cannot {STOP_VERBS[outcome]} it")
        under_way = self._stop_under_way(job)
        if STOP_STRENGTH[under_way] > STOP_STRENGTH[outcome]:
            raise StopRefused(f"job {job.id} is being cancelled: cannot {STOP_VERBS[outcome]} it")
        if under_way == outcome:
            if job.requested != outcome:    # the record holds a stop never sent after it: the one under way again
                self._undo_stop(job.id, outcome)
            return
        signalled = outcome == "paused" and under_way == SHUTDOWN_PAUSE
        if job.requested != outcome:     # (else recorded already, with its mark: a retry of a stop never sent)
            # Recorded with its mark of a stop not sent yet, in one write: where neither the signal nor the undo of
            # this record gets through (a full disk), the mark says so to this server and to the next one.
            self.store.update_job(job.id, requested=outcome, stop_unsent=under_way or "")
        try:
            sent = signalled or self.executor.signal(run, outcome)
        except BaseException:       # nothing sent (a control file that could not be written): nor recorded
            self._undo_stop(job.id, under_way)
            raise
        if not sent:
            self._undo_stop(job.id, under_way)
            raise StopRefused(f"job {job.id} is ending: cannot {STOP_VERBS[outcome]} it")
        if outcome == "cancelled":
            self._cancelled_at[job.id] = time.monotonic()
        self._mark_sent(job.id)

    def _stop_under_way(self, job: JobRecord) -> str | None:
        """The stop under way: the recorded one, unless that was never sent (the store's mark, JobRecord.stop_unsent),
        then the one before it."""
        return job.requested if job.id in self._sent_unmarked else job.stop_under_way

    def _mark_sent(self, job_id: str) -> None:
        """Clear the mark of a stop that went out. Where that write fails (the disk full since the stop's record),
        the stop was sent all the same: the request is answered as accepted, this server knows it sent it, and the
        next tick clears the mark. (A server killed before that adopts the job with the stop marked unsent, and a
        retry sends it again: the only way a run gets a stop twice.)"""
        try:
            self.store.update_job(job_id, stop_unsent=None)
        except Exception as error:
            if job_id not in self._sent_unmarked:
                log.warning("job %s: its stop went out, but the store could not note that (%s: %s); noted again "
                            "at the next tick", job_id, type(error).__name__, error)
            self._sent_unmarked.add(job_id)
            return
        self._sent_unmarked.discard(job_id)

    def _undo_stop(self, job_id: str, before: str | None, quiet: bool = False) -> None:
        """Take back the record of a stop that was not sent. Where that write fails too (the disk still full), the
        record keeps its mark of a stop not sent (JobRecord.stop_unsent), written with it: found recorded, the
        client's retry was taken for a stop under way and answered 202 with nothing sent (the job trained on), by
        this server and, after a crash, by the next. `quiet`: a failure is left to the mark, not raised."""
        try:
            self.store.update_job(job_id, requested=before)
        except Exception:
            if not quiet:
                raise

    def _pause_for_shutdown(self, job_id: str) -> None:
        """The server's own pause of a running job, unless a stop is already under way (a user's stands)."""
        job = self.store.get_job(job_id)
        # (A stop recorded but never sent is none: left training, the job was adopted at the next start with it.)
        if job is None or job.state != "running" or self._stop_under_way(job) is not None:
            return
        # Recorded as the server's (with its mark of a stop not sent yet) before the signal, as request_stop
        # records a user's: signalled first, a record held up past the store's timeout (another process holding
        # the write lock) or a kill -9 before it left the job paused with no word of whose pause it was, and the
        # restart kept it `paused` for good as if its user had asked. A record that fails now sends nothing.
        self.store.update_job(job_id, requested=SHUTDOWN_PAUSE, stop_unsent="")
        self._sent_unmarked.discard(job_id)
        try:
            sent = self.executor.signal(self.runs[job_id], "paused")
        except BaseException:       # nothing sent (a control file that could not be written): nor recorded
            self._undo_stop(job_id, None, quiet=True)     # (where the undo fails, the mark says it was not sent)
            raise
        if sent:
            self._mark_sent(job_id)
        else:
            self._undo_stop(job_id, None, quiet=True)     # the run is ending by itself: its own end decides

    def shutdown(self, timeout: float = 30.0) -> None:
        """Pause every running job, adopted ones included (checkpoint, exit 4), to resume on the next start; a
        job whose user already asked for a pause or a cancel ends as they asked. A job that does not stop in
        time keeps running, is adopted next time, and is queued to resume once it has paused."""
        for job_id in list(self.runs):
            self._pause_for_shutdown(job_id)
        deadline = time.monotonic() + timeout
        while self.runs and time.monotonic() < deadline:
            time.sleep(0.1)
            for job_id, run in list(self.runs.items()):
                ended, code = self.executor.poll(run)
                if ended:
                    self._reap(job_id, code)


class GpusDeferred(StartDeferred):
    """A local job waits for GPUs: `nproc` of them (the jobs queued behind it that take GPUs wait for it)."""

    def __init__(self, nproc: int, message: str):
        super().__init__(message)
        self.nproc = nproc


def _gpus_noted(path: Path) -> tuple[str, ...] | None:
    """The GPUs a job's gpus file names (an empty file: none), each under its one spelling; None where the file
    does not say: not a regular file (a FIFO blocked the server's start for good, a link to /dev/zero read until its
    memory ran out), larger than any list of GPUs, not UTF-8 (raised out of the server's start), or an entry that
    names no GPU."""
    data = read_small(path, MAX_GPUS_FILE_BYTES)
    try:
        text = data.decode("utf-8").strip() if data is not None else None
    except UnicodeDecodeError:
        return None
    if not text:
        return None if text is None else ()
    noted = tuple(gpu_spelling(entry.strip()) for entry in text.split(","))
    return None if None in noted else noted


def _short_of_resources(error: BaseException) -> bool:
    """A start that found the server short of something that frees itself: a process to fork (EAGAIN: the user's
    process limit), memory, or a descriptor (its own EMFILE, the system's ENFILE)."""
    return isinstance(error, OSError) and error.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE)


def _end_told(result: dict, job: JobRecord) -> float | None:
    """When a run ended, as its result tells it, where it can be right: a number between the job's start and now
    (a clock set wrong, a result edited, a run that failed before its metrics existed: None)."""
    end = result.get("end_time")
    plausible = isinstance(end, (int, float)) and not isinstance(end, bool)
    return float(end) if plausible and (job.started or job.created) <= end <= time.time() else None


def _code_of(state: str, told: int | None, exited: int | None) -> int:
    """The exit code recorded for a run whose result says `state`: the result's, else the process's, where it stands
    for that state (ExitCode); else the state's own (a result that said `completed` with exit code 1, or whose
    process then died of a signal, was recorded completed with that code, where a completed run exits 0)."""
    for code in (told, exited):
        if code is not None and EXIT_STATES.get(code) == state:
            return int(code)
    return int(exit_code_for(state))


def _signal_name(signum: int) -> str:
    """SIGKILL, or "signal 35" for one signal.Signals has no member for (the real-time signals: the name
    raised ValueError, the run was forgotten unrecorded, and its job stayed `running` for good)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _ended_how(state: str, killed: bool, grace: float) -> str:
    """The end of a run's log line: why it ended in that state, when the state alone does not say."""
    if state == "queued":
        return " after the server's shutdown pause, to resume"
    if killed and state == "cancelled":
        return f", killed after it did not stop within {grace:g} s of its cancel"
    return ""
