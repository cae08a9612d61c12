"""The Ray executor: each run of a job is a Ray job, submitted through Ray's Jobs API to an existing cluster
(`trainmetrics server --executor ray --ray-address http://HEAD:8265`). Its entrypoint is the launcher
(ray_launch.py), which places one Ray actor per rank where Ray decides, across nodes, and runs
`trainmetrics train` in each with torch.distributed's rendezvous variables.

Ray has no pause and its stop is a signal to the entrypoint only: a pause or cancel is written to the job's
control file, which the launcher watches and turns into SIGUSR1 or SIGTERM for every rank, wherever it runs.
The job's directory (checkpoints, log, result, control file) must therefore be on storage every Ray node
shares with the job server, as checkpoints must be for a resume to land on any node.
"""

import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import requests
from ray import exceptions as ray_exceptions
from ray.job_submission import JobStatus, JobSubmissionClient

from trainmetrics.contract import CONTROL_CHARACTERS, ExitCode
from trainmetrics.jobfiles import (CONTROL_FILE_NAME, LOG_NAME, STACKS_REQUEST_NAME, read_small_text,
                                   replace_atomically)
from trainmetrics.jobserver.executors import ExecutorUnavailable, Run, StartDeferred

log = logging.getLogger("trainmetrics.server")

# A run's status is asked of Ray at most this often (each ask is an HTTP request to the head).
POLL_SECONDS = 1.0
FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
# While Ray does not answer about a run, this is said at most once per this many seconds per run.
UNANSWERED_LOG_SECONDS = 60.0
# Every request to Ray's head gives up after this long: the calls run on the job server's one state thread,
# and a head that accepts connections but never answers must not stop supervision for good.
REQUEST_TIMEOUT_SECONDS = 10.0
# /healthz asks the head for its version within this: under the health check's own limit (edge, 3 s), so a
# head that takes connections and never answers is `executor_unavailable` there, not a bare `timeout`.
CHECK_TIMEOUT_SECONDS = 2.0
# After a request Ray did not answer, no other is sent for this long: with a frozen head every request waits
# its whole timeout, and a tick asking about every run would hold the state thread for runs x 10 s.
QUIET_SECONDS = 5.0
HIDDEN_SHOWN = "<hidden>"       # a secret in what Ray said (the run's register token, quoted in its runtime_env)
# A stray run (one no server recorded) that Ray says ended may still be ending: its ranks' actors outlive the
# launcher Ray stopped for a moment, and one may be writing its stop's checkpoint. The job starts again this
# long after Ray said it ended.
STRAY_SETTLE_SECONDS = 3.0
# Ray's message for a submission it failed, as a job's error carries it: at most this many characters.
RAY_MESSAGE_LENGTH = 500
# HTTP headers for every request to Ray's head (a proxy's or gateway's credentials), a JSON object: the
# variable Ray's own `ray job submit` reads.
HEADERS_VARIABLE = "RAY_JOB_HEADERS"


def headers_from_environment() -> dict[str, str]:
    """The headers RAY_JOB_HEADERS names ({} without it); ValueError, in one line, unless it is a JSON object
    of header names to strings."""
    text = os.environ.get(HEADERS_VARIABLE)
    if text is None:
        return {}
    try:
        headers = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{HEADERS_VARIABLE} is not JSON ({error})") from None
    if not isinstance(headers, dict) or not all(isinstance(value, str) for value in headers.values()):
        raise ValueError(f'{HEADERS_VARIABLE} must be a JSON object of header names to strings, e.g. '
                         '{"Authorization": "Bearer ..."}')
    return headers


def token_headers(headers: dict[str, str]) -> dict[str, str]:
    """The Authorization header Ray's client adds when the cluster uses Ray's token authentication (none when
    `headers` has one already or the token is off): /healthz asks the head as the client does."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
        return get_auth_headers_if_auth_enabled(headers)
    except Exception:       # a private helper of Ray's: without it, the user's own headers still go
        return {}


# What Ray's client raises for a 401 or 403 (recent Rays; older ones a RuntimeError naming the status code).
CREDENTIALS_REFUSED = tuple(error for error in [getattr(ray_exceptions, "AuthenticationError", None)] if error)

# Ray's own answer for a submission it does not have (its dashboard's job routes), as its client raises it.
RAY_UNKNOWN_SUBMISSION = re.compile(r"Request failed with status code 404: Job (\S+) does not exist")


def unknown_to_ray(error: Exception, submission: str) -> bool:
    """Ray answered that it has no such submission (it never had it, or its head restarted since): its dashboard's
    own 404, "Job <submission> does not exist", which Ray's client raises as "Request failed with status code 404:
    Job <submission> does not exist.". Any other 404 (a gateway's or proxy's page, a path that is not Ray's) says
    nothing of the run: unanswered()."""
    found = RAY_UNKNOWN_SUBMISSION.match(str(error)) if isinstance(error, RuntimeError) else None
    return found is not None and found.group(1) == submission


def unanswered(error: Exception) -> bool:
    """Ray could not be asked: refused, timed out or cut off (requests' errors and the client's own
    ConnectionError are OSErrors), or its dashboard answered that it cannot serve now (502-504), or failed
    inside (500: "No available agent to submit job, please try again later" while its head or job agent
    starts, its GCS unreachable; a request Ray finds wrong is its 400), or something other than Ray's dashboard
    answered (a 404 that is not Ray's "Job ... does not exist": a gateway or proxy in front of the head, its
    route to the head missing or not up yet; the client's version check answered 404), or the head or its
    gateway refused the server's credentials or asked it to come back later (401, 403, 407; 408, 429). Taken for
    the job's own failure, a job submitted then was failed for good (with expired credentials, every queued job
    in turn); taken for Ray's "no such submission", a running job was ended as lost."""
    if isinstance(error, (OSError, *CREDENTIALS_REFUSED)):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(f"status code {code}" in text for code in (401, 403, 407, 408, 429, 500, 502, 503, 504)) or \
        ("status code 404" in text and not RAY_UNKNOWN_SUBMISSION.match(text)) or \
        text.startswith("Version check returned 404")


def misread(error: Exception) -> bool:
    """Ray's client could not read an answer (a body that is not a JSON object, a field missing: another Ray
    version's answer, or a gateway's): a submission so answered may have been taken (a 200 is read so). Taken
    for the job's own failure, the job failed while Ray ran its submission unseen. Not any ValueError: the
    client's own check of a submission's arguments raises those, and such a job would wait queued for good."""
    return isinstance(error, (TypeError, KeyError, requests.exceptions.JSONDecodeError))


def already_submitted(error: Exception) -> bool:
    """Ray refused a submission id it already has: an earlier submit of it reached Ray after all."""
    return isinstance(error, RuntimeError) and "already exists" in str(error)


class TimedJobSubmissionClient(JobSubmissionClient):
    """Ray's Jobs API client with a timeout on every request (Ray's own sets none)."""

    def _do_request(self, method, endpoint, **kwargs):
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_SECONDS)
        return super()._do_request(method, endpoint, **kwargs)


class RayExecutor:
    """Runs jobs as Ray jobs on the cluster whose dashboard answers at `address`."""

    name = "ray"

    def __init__(self, address: str, python: str | None = None):
        self.address = address
        self.python = python or sys.executable     # the interpreter on the cluster's nodes that has trainmetrics
        self._client: JobSubmissionClient | None = None
        self.headers = headers_from_environment()
        self._polled: dict[str, tuple[float, tuple[bool, int | None]]] = {}
        self._unanswered_said: dict[str, float] = {}     # per run: when "Ray did not answer" was last logged
        self._unconfirmed: dict[str, str] = {}     # job id -> a submission id Ray may or may not have received
        self._quiet_until = float("-inf")           # no request before this (monotonic): Ray did not answer
        self._quiet_because = ""                    # how it did not
        self._strays: dict[str, set[str]] = {}      # job id -> its unrecorded submissions Ray took a stop for
        self._strays_ended: dict[str, float] = {}   # job id -> when those were first seen ended (monotonic)

    @property
    def client(self) -> JobSubmissionClient:
        """The Jobs API client, made on first use (its constructor asks the head for its version)."""
        if self._client is None:
            self._client = TimedJobSubmissionClient(self.address, headers=dict(self.headers))
        return self._client

    def entrypoint(self, nproc: int, train_args: list[str], job_dir: Path) -> str:
        """The shell command Ray runs: the launcher, its output appended to the job's log."""
        command = [self.python, "-m", "trainmetrics.jobserver.ray_launch", "--nproc", str(nproc),
                   "--job-dir", str(job_dir), "--", *train_args]
        return f"exec {shlex.join(command)} >> {shlex.quote(str(job_dir / LOG_NAME))} 2>&1"

    def start(self, job_id: str, nproc: int, train_args: list[str], job_dir: Path, env: dict[str, str]) -> Run:
        """Submit the run; its submission id names it (unique per run: the job id and the time).

        When Ray does not answer (or its answer cannot be read), ExecutorUnavailable: the job stays queued, and
        the next try submits under the same id, so a submission that reached Ray despite the error (its answer
        lost) is taken, not doubled."""
        if self._quiet():
            raise ExecutorUnavailable(f"Ray did not answer lately ({self._quiet_because})")
        submission = self._unconfirmed.get(job_id) or f"{job_id}-{time.time_ns()}"
        # The run's secrets, hidden in whatever Ray says back: its answer may quote the runtime_env, and what it
        # said is shown in every queued job's waiting_for (their owners' too) or in this job's error.
        secrets = [value for value in env.values() if value]
        try:
            self.client.submit_job(entrypoint=self.entrypoint(nproc, train_args, job_dir), submission_id=submission,
                                   runtime_env={"env_vars": env}, metadata={"trainmetrics_job_id": job_id})
        except Exception as error:
            if already_submitted(error) and job_id in self._unconfirmed:
                log.warning("job %s: Ray had received its submission %s after all", job_id, submission)
            elif unanswered(error) or misread(error):
                # Retried under the same id: Ray's "already exists" then says it took this one.
                self._unconfirmed[job_id] = submission
                self._went_quiet(error, secrets)
                raise ExecutorUnavailable(f"Ray did not answer ({_one_line(error, secrets)})") from error
            else:
                retried = self._unconfirmed.pop(job_id, None)
                if retried is not None:
                    # The earlier try's request may have reached Ray (its answer lost) and run now: the job fails
                    # with this error, and nothing would stop that run (only a start looks for strays).
                    self._stop_unconfirmed(job_id, job_dir, retried)
                said = _hidden(str(error), secrets)
                if said != str(error):      # (not chained: the log's traceback would show the original)
                    raise RuntimeError(said) from None
                raise
        self._unconfirmed.pop(job_id, None)
        return Run(job_id, submission, job_dir)

    def clear_way(self, job_id: str, job_dir: Path) -> None:
        """Stop the job's submissions Ray still runs but no server recorded (a server killed between submitting
        a run and recording it left the job queued: started again, it ran twice), told apart by the job's
        directory in their entrypoint (another server's job may share the id, never the directory). The start
        waits (StartDeferred) until Ray says they ended and STRAY_SETTLE_SECONDS more (a rank's actor outlives
        its launcher for a moment): the checkpoint a stopped run writes must be there when the new run's
        arguments are built, or a fresh run would refuse the directory and the job fail."""
        if self._quiet():
            raise ExecutorUnavailable(f"Ray did not answer lately ({self._quiet_because})")
        try:
            listed = self.client.list_jobs()
        except Exception as error:
            if unanswered(error):
                # Not the submission too (a frozen head held the state thread two timeouts per try, and this
                # was said at every try): the supervisor says once a minute that the job waits.
                self._went_quiet(error)
                raise ExecutorUnavailable(f"Ray did not answer ({_one_line(error)})") from error
            log.warning("job %s: cannot list Ray's submissions to find one no server recorded: %s", job_id,
                        _one_line(error))
            return
        marker, retried = f"--job-dir {shlex.quote(str(job_dir))} ", self._unconfirmed.get(job_id)
        strays = [details.submission_id for details in listed
                  if details.submission_id != retried and not JobStatus(details.status).is_terminal()
                  and (details.metadata or {}).get("trainmetrics_job_id") == job_id
                  and marker in (details.entrypoint or "")]
        asked = self._strays.setdefault(job_id, set())      # the strays Ray took a stop for
        for stray in strays:
            if stray not in asked and self._stop(job_id, stray):
                asked.add(stray)
                log.warning("job %s: Ray still runs its submission %s, which no server recorded (one killed as it "
                            "submitted it): stopping it before the job starts again", job_id, stray)
        if strays:
            raise StartDeferred(f"its Ray submission {', '.join(strays)}, which no server recorded, is stopping")
        if asked:
            ended = self._strays_ended.setdefault(job_id, time.monotonic())
            if time.monotonic() - ended < STRAY_SETTLE_SECONDS:
                raise StartDeferred("its Ray submission that no server recorded stopped a moment ago")
        self._strays.pop(job_id, None)
        self._strays_ended.pop(job_id, None)

    def adopt(self, job_id: str, handle: str | None, job_dir: Path) -> Run | None:
        """A run a previous server submitted, if Ray still runs it."""
        if not handle:
            return None
        if self._quiet():
            return Run(job_id, handle, job_dir)
        try:
            status = self.client.get_job_status(handle)
        except Exception as error:
            if unknown_to_ray(error, handle):
                log.warning("job %s: Ray no longer knows its submission %s", job_id, handle)
                return None
            self._went_quiet(error)
            # Unreachable (a restart of its head or dashboard, the network): it may well run on. Adopted, so
            # it is not started a second time; polling tells its fate once Ray answers.
            log.warning("job %s: Ray did not answer about %s (%s); adopted until it does", job_id, handle,
                        _one_line(error))
            return Run(job_id, handle, job_dir)
        return None if status in FINISHED else Run(job_id, handle, job_dir)

    def poll(self, run: Run) -> tuple[bool, int | None]:
        """(ended, the launcher's exit code), asked of Ray at most every POLL_SECONDS."""
        now = time.monotonic()
        known = self._polled.get(run.handle)
        if known is not None and now - known[0] < POLL_SECONDS:
            return known[1]
        if self._quiet():
            return False, None
        try:
            info = self.client.get_job_info(run.handle)
        except Exception as error:
            # Its head restarted: the run died with it, and no result tells how.
            if unknown_to_ray(error, run.handle):
                log.warning("job %s: Ray no longer knows its submission %s: it ended", run.job_id, run.handle)
                self._forget(run)
                return True, None
            # Left alone only when it did not answer: an answer about this run the client could not read (a status
            # Ray added that this client's model refuses) came at once, and other runs' ends and the starts must go on.
            if unanswered(error):
                self._went_quiet(error)
            if now - self._unanswered_said.get(run.handle, float("-inf")) >= UNANSWERED_LOG_SECONDS:
                self._unanswered_said[run.handle] = now
                how = "did not answer" if unanswered(error) else "answered in words this server cannot read"
                log.warning("job %s: Ray %s about %s (%s); still taken for running", run.job_id, how, run.handle,
                            _one_line(error))
            self._polled[run.handle] = (now, (False, None))
            return False, None
        answer = (info.status in FINISHED, info.driver_exit_code if info.status in FINISHED else None)
        if answer[0]:
            self._forget(run)
            # Ray's STOPPED is its stop's end (kill(): a cancel's kill); FAILED or SUCCEEDED, the run ended by
            # itself, a stop that came after it too late to be the cause.
            run.ended_by_itself = info.status != JobStatus.STOPPED
            said = ray_message(info.message) if info.status == JobStatus.FAILED else None
            run.end_said = f"Ray said: {said}" if said else None
            if said:
                # Ray calls FAILED every nonzero exit, a pause's (4) and a cancel's (3) too: those are no failure.
                stopped = info.driver_exit_code in (ExitCode.PAUSED, ExitCode.CANCELLED)
                log.log(logging.INFO if stopped else logging.WARNING, "job %s: Ray says its submission %s %s: %s",
                        run.job_id, run.handle, "ended" if stopped else "failed", said)
        else:
            self._polled[run.handle] = (now, answer)
            self._unanswered_said.pop(run.handle, None)
        return answer

    def _forget(self, run: Run) -> None:
        self._polled.pop(run.handle, None)
        self._unanswered_said.pop(run.handle, None)

    def signal(self, run: Run, outcome: str) -> bool:
        """Ask every rank to stop at its next step boundary, through the control file the launcher watches
        (written atomically); True while Ray runs the job."""
        if not self._running(run):
            return False
        _replace(run.job_dir / CONTROL_FILE_NAME, outcome)
        return True

    def kill(self, run: Run) -> bool:
        """Ray's stop of the submission: SIGTERM to the launcher, SIGKILL to it and its processes a few seconds
        later (Ray's RAY_JOB_STOP_WAIT_TIME_S), and the ranks' actors end with it. False when Ray did not
        answer (asked again after the quiet period)."""
        return self._stop(run.job_id, run.handle)

    def abandon(self, job_id: str, job_dir: Path) -> None:
        """"cancelled" in the job's control file stops any launcher of the job (it reads the file before it places
        any rank, and watches it after): a submission Ray may have received although it did not answer, which
        Ray is also asked to stop, if it answers; one a server killed before recording it submitted (not known
        here: kept in memory only)."""
        self._strays.pop(job_id, None)
        self._strays_ended.pop(job_id, None)
        _replace(job_dir / CONTROL_FILE_NAME, "cancelled")
        submission = self._unconfirmed.pop(job_id, None)
        if submission is None:
            return
        self._stop(job_id, submission)      # not received, or Ray away: the control file stops it if it runs
        log.info("job %s: cancelled while Ray had not answered its submission %s; that submission, if Ray "
                 "received it, is stopped", job_id, submission)

    def _stop_unconfirmed(self, job_id: str, job_dir: Path, submission: str) -> None:
        """A retried submission failed on an error of its own (not Ray away): the earlier try, which Ray may have
        received though its answer was lost, is stopped: "cancelled" in the job's control file (its launcher stops
        before it places a rank, or at once if it runs; a later start removes the file) and Ray's stop of it."""
        try:
            _replace(job_dir / CONTROL_FILE_NAME, "cancelled")
        except OSError as error:        # (the retry's own error is the one the job fails with)
            log.warning("job %s: cannot write its control file: %s", job_id, _one_line(error))
        self._stop(job_id, submission)      # not received, or Ray away: the control file stops it if it runs
        log.warning("job %s: its retried submission %s failed; that submission, if Ray received it at the earlier "
                    "try, is stopped", job_id, submission)

    def _stop(self, job_id: str, submission: str) -> bool:
        """Ask Ray to stop a submission; True when it did, or has no such submission (its own 404). Ray not
        answering, or refusing (said), leaves it alone for the quiet period."""
        if self._quiet():
            return False
        try:
            self.client.stop_job(submission)
        except Exception as error:
            if unknown_to_ray(error, submission):
                return True
            if not unanswered(error):
                log.warning("job %s: Ray refused to stop %s (%s)", job_id, submission, _one_line(error))
            self._went_quiet(error)
            return False
        return True

    def request_stacks(self, run: Run) -> bool:
        """Ask every rank for its thread stacks: the launcher passes SIGUSR2 on when the request file's number
        changes (it may sit on another node: only the shared job directory reaches it)."""
        if not self._running(run):
            return False
        path = run.job_dir / STACKS_REQUEST_NAME
        try:
            number = int((read_small_text(path) or "0").strip() or 0)
        except ValueError:
            number = 0
        _replace(path, str(number + 1))
        return True

    def reap(self) -> None:
        """Nothing to collect: a Ray job's processes are no children of the server."""

    def check(self) -> dict:
        """Ray's head answers its version (one request, not through the client the state thread uses)."""
        try:
            headers = {**self.headers, **token_headers(self.headers)}
            answer = requests.get(f"{self.address.rstrip('/')}/api/version", headers=headers,
                                  timeout=CHECK_TIMEOUT_SECONDS)
            answer.raise_for_status()
            version = answer.json()["ray_version"]
        except Exception as error:
            raise ExecutorUnavailable(f"Ray at {self.address} did not answer ({_one_line(error)})") from error
        return {"executor": "ray", "ray_version": version}

    def _running(self, run: Run) -> bool:
        """True while Ray runs it, or cannot be asked: a stop written to the shared control file then reaches
        the launcher if it runs on, and polling settles the run once Ray answers."""
        if self._quiet():
            return True
        try:
            return self.client.get_job_status(run.handle) not in FINISHED
        except Exception as error:
            if unknown_to_ray(error, run.handle):
                return False
            if unanswered(error):       # (an answer it could not read came at once: see poll)
                self._went_quiet(error)
            return True

    def _quiet(self) -> bool:
        """Ray did not answer a moment ago: ask nothing yet."""
        return time.monotonic() < self._quiet_until

    def _went_quiet(self, error: Exception, hidden: Iterable[str] = ()) -> None:
        self._quiet_until = time.monotonic() + QUIET_SECONDS
        self._quiet_because = _one_line(error, hidden)      # said while it is left alone (a queued job's waiting_for)


def ray_message(message: object) -> str | None:
    """Ray's message for a failed submission (a traceback, the tail of its entrypoint's output: "/bin/sh: 1:
    cannot create .../train.log: Directory nonexistent") as one line a job's error can carry: its runs of
    whitespace (line breaks included) one space, any other control character escaped (the escape of a coloured
    log: "\\x1b"), and at most RAY_MESSAGE_LENGTH characters, its beginning and its end (a traceback's first
    line says what failed, its last the error). None when Ray said nothing. A lone surrogate (JSON carries them: a
    path of bytes that are not UTF-8, as os.fsdecode gives it) is escaped too: SQLite refuses to store one, and the
    job's end was then never recorded."""
    if not isinstance(message, str):
        return None
    text = " ".join(message.encode("utf-8", "backslashreplace").decode("utf-8").split())
    text = CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)
    if len(text) > RAY_MESSAGE_LENGTH:
        head = RAY_MESSAGE_LENGTH * 2 // 5
        text = f"{text[:head]} ... {text[-(RAY_MESSAGE_LENGTH - head - 5):]}"
    return text or None


def _hidden(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of `secrets` shown as HIDDEN_SHOWN."""
    for secret in secrets:
        text = text.replace(secret, HIDDEN_SHOWN)
    return text


def _one_line(error: Exception, hidden: Iterable[str] = ()) -> str:
    """An error as one short line (requests' connection errors run to hundreds of characters), each of `hidden`
    (secrets) shown as HIDDEN_SHOWN: replaced before the cut, which leaves none in part."""
    text = " ".join(_hidden(str(error), hidden).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _replace(path: Path, text: str) -> None:
    """Write a small file of the shared job directory atomically (a reader sees the old text or the new),
    through an unpredictable temp file (jobfiles.replace_atomically: nothing planted there is written
    through); readable by the launcher, which may run as another user on another node."""
    replace_atomically(path, text, mode=0o644)
