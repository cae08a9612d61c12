"""The Ray executor's reading of Ray's errors (error mapping only: a stand-in for the Jobs API client). Ray
answering "no such submission" (404: its head restarted, the run died with it) ends a run; Ray not answering
(its head or dashboard down, the network) leaves a run running: adopted, not started twice, stoppable through
its control file, and said once a minute, not at every poll. The flows themselves run on a real Ray head in
test_server.py."""

import calendar
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from trainmetrics.contract import REGISTER_TOKEN_VARIABLE
from trainmetrics.jobfiles import CONTROL_FILE_NAME
from trainmetrics.jobserver import ray_executor, supervisor as supervision
from trainmetrics.jobserver.executors import ExecutorUnavailable, Run
from trainmetrics.jobserver.jobs import JobService, ServerSettings
from trainmetrics.jobserver.ray_executor import RayExecutor
from trainmetrics.jobserver.store import JobRecord, JobStore
from trainmetrics.jobserver.supervisor import Supervisor, token_matches

GONE = RuntimeError("Request failed with status code 404: Job ray-1 does not exist.")
UNREACHABLE = requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=8265): Max retries "
                                                  "exceeded with url: /api/jobs/ray-1 " + "(Connection refused) " * 20)


@pytest.fixture(autouse=True)
def calls_far_apart(monkeypatch):
    """Each test's calls stand for calls far apart: no quiet period after an unanswered request (tested on
    its own below)."""
    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 0.0)


class Unanswering:
    """A Jobs API client whose every question raises `error`."""

    def __init__(self, error: Exception):
        self.error = error

    def get_job_status(self, submission):
        raise self.error

    def get_job_info(self, submission):
        raise self.error


def executor(error: Exception) -> RayExecutor:
    ray = RayExecutor("http://127.0.0.1:8265")
    ray._client = Unanswering(error)
    return ray


def test_a_submission_ray_no_longer_knows_has_ended(tmp_path):
    ray, run = executor(GONE), Run("job-1", "ray-1", tmp_path)
    assert ray.adopt("job-1", "ray-1", tmp_path) is None
    assert ray.poll(run) == (True, None)
    assert ray.signal(run, "cancelled") is False
    assert not (tmp_path / CONTROL_FILE_NAME).exists()


def test_a_ray_that_does_not_answer_leaves_its_runs_running_and_stoppable(tmp_path, caplog):
    ray, run = executor(UNREACHABLE), Run("job-1", "ray-1", tmp_path)
    adopted = ray.adopt("job-1", "ray-1", tmp_path)       # a server restarted in an outage: not run twice
    assert adopted is not None and adopted.handle == "ray-1"
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            ray._polled.clear()                           # as if a poll interval had passed each time
            assert ray.poll(run) == (False, None)
    said = [record.getMessage() for record in caplog.records if "did not answer" in record.getMessage()]
    assert len(said) == 2                                 # the adoption's and the first poll's; one line each
    assert all(len(line) < 400 and "\n" not in line for line in said)
    assert ray.signal(run, "paused") is True              # reaches the launcher through the shared file
    assert (tmp_path / CONTROL_FILE_NAME).read_text() == "paused"


@pytest.mark.parametrize("error", [GONE, UNREACHABLE], ids=["gone", "unreachable"])
def test_a_run_ray_reports_finished_after_an_outage_is_polled_afresh(error, tmp_path):
    ray, run = executor(error), Run("job-1", "ray-1", tmp_path)
    ray.poll(run)
    ray._polled.clear()
    ray._client = Unanswering(GONE)
    assert ray.poll(run) == (True, None)
    assert ray._polled == {} and ray._unanswered_said == {}


class Submissions:
    """A Jobs API client that refuses connections until told to answer, and keeps what it was given; like
    Ray, it refuses a submission id it already has."""

    def __init__(self, received_despite_error: bool = False):
        self.answering = False
        self.received_despite_error = received_despite_error    # the request landed, its answer was lost
        self.submitted: dict[str, dict] = {}
        self.entrypoints: dict[str, str] = {}
        self.stopped: list[str] = []
        self.calls: list[str] = []
        self.listed: list[SimpleNamespace] = []     # the submissions list_jobs answers (JobDetails' fields)

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.calls.append("submit_job")
        if not self.answering:
            if self.received_despite_error:
                self.submitted[submission_id] = runtime_env["env_vars"]
            raise UNREACHABLE
        if submission_id in self.submitted:
            raise RuntimeError(f"Request failed with status code 400: Job with submission_id {submission_id} "
                               "already exists. Please use a different submission_id.")
        self.submitted[submission_id] = runtime_env["env_vars"]
        self.entrypoints[submission_id] = entrypoint
        return submission_id

    def stop_job(self, submission_id):
        if not self.answering:
            raise UNREACHABLE
        self.stopped.append(submission_id)
        return submission_id in self.submitted

    def list_jobs(self):
        self.calls.append("list_jobs")
        if not self.answering and not self.received_despite_error:     # (that head answers, answers get lost)
            raise UNREACHABLE
        return self.listed


def supervised_on_ray(tmp_path, client, *job_ids: str, max_concurrent: int = 1) -> tuple[JobStore, Supervisor]:
    """A supervisor whose Ray executor talks to the fake `client`, with `job_ids` queued (an mlp on blobs)."""
    ray = RayExecutor("http://127.0.0.1:8265")
    ray._client = client
    store = JobStore(tmp_path / "db.sqlite")
    supervisor = Supervisor(store, tmp_path, None, max_concurrent=max_concurrent, executor=ray)
    for job_id in job_ids:
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    return store, supervisor


class SlowAnswers(Submissions):
    """A Jobs API client that answers every submission and question about a run after `seconds` (a loaded head)."""

    def __init__(self):
        super().__init__()
        self.answering, self.seconds, self.asked = True, 0.0, []

    def submit_job(self, **request):
        time.sleep(self.seconds)
        return super().submit_job(**request)

    def get_job_info(self, submission):
        self.asked.append(submission)
        time.sleep(self.seconds)
        return SimpleNamespace(status=ray_executor.JobStatus.RUNNING, driver_exit_code=None, message="")

    def get_job_status(self, submission):
        time.sleep(self.seconds)
        return ray_executor.JobStatus.RUNNING

    def list_jobs(self):
        time.sleep(self.seconds)
        return super().list_jobs()


def test_a_slow_ray_head_holds_a_tick_for_its_budget_only_and_every_job_gets_its_turn(tmp_path, monkeypatch):
    """Each tick polled every run and started every queued job it had room for, on the state thread that answers
    the API: a head answering in 9 s held it (every request behind it) for 9 s per run and per start. A tick now
    stops asking once its budget is spent, and the next asks the runs polled longest ago first; the queued jobs it
    did not reach say so in waiting_for (it said null: "starts at the next pass")."""
    monkeypatch.setattr(supervision, "TICK_BUDGET_SECONDS", 1.0)
    monkeypatch.setattr(ray_executor, "POLL_SECONDS", 0.0)
    client = SlowAnswers()
    store, supervisor = supervised_on_ray(tmp_path, client, *(f"run-{i}" for i in range(6)), max_concurrent=10)
    supervisor.tick()
    assert len(supervisor.runs) == 6
    client.seconds = 0.5
    polled = []
    for _ in range(3):
        asked_before = len(client.asked)
        supervisor.tick()
        polled.append(client.asked[asked_before:])
    assert all(1 <= len(tick) <= 2 for tick in polled), polled
    every = [submission for tick in polled for submission in tick]
    assert len(set(every)) == len(every)            # no run asked about twice before each was asked once

    for job_id in ("late-1", "late-2", "late-3", "late-4"):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    supervisor.runs.clear()
    supervisor.tick()
    assert 1 <= len(supervisor.runs) <= 2
    # The jobs the pass did not reach said None ("starts at the next pass") while a slow head took its budget.
    unreached = [job for job in store.list_jobs() if job.state == "queued"]
    assert unreached and all(supervisor.waiting_for(job).startswith("its turn: the last pass over the queue spent "
                                                                     "its 1 s") for job in unreached)
    for _ in range(4):
        supervisor.tick()
    assert {job.state for job in store.list_jobs() if job.id.startswith("late")} == {"running"}
    assert supervisor._not_reached == set()
    assert supervisor.held_back_since is None
    store.close()


def test_a_run_polled_before_is_polled_before_runs_started_since_and_its_overdue_cancel_is_killed(tmp_path,
                                                                                                   monkeypatch):
    """A run never polled was taken for one polled longest ago: on a slow head, while queued jobs kept starting,
    each tick spent its polls on the runs the tick before had started, and an older run went unpolled as long as
    the queue lasted (its cancel past its grace was never killed, its end never seen). A run started since counts
    as polled when the tick first sees it: the older run's turn comes first."""
    monkeypatch.setattr(supervision, "TICK_BUDGET_SECONDS", 0.5)
    monkeypatch.setattr(ray_executor, "POLL_SECONDS", 0.0)
    client = SlowAnswers()
    store, supervisor = supervised_on_ray(tmp_path, client, "old", max_concurrent=20)
    supervisor.tick()
    supervisor.request_stop(store.get_job("old"), "cancelled")
    for job_id in (f"new-{i}" for i in range(8)):
        store.add_job(JobRecord(id=job_id, owner="default", name=job_id, state="queued",
                                spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    client.seconds = 0.5                                # a tick's budget: one poll and one start a tick
    supervisor.tick()                                   # "old" polled, "new-0" started
    assert client.asked == [store.get_job("old").handle] and store.get_job("new-0").state == "running"
    supervisor.cancel_grace = 0.0                       # its cancel's grace runs out
    for _ in range(3):
        supervisor.tick()
    assert client.stopped == [store.get_job("old").handle]
    store.close()


def test_a_job_whose_start_a_slow_head_puts_off_lets_the_jobs_behind_it_start(tmp_path, monkeypatch):
    """A job at the head of the queue whose start Ray put off (a run of it no server recorded, still stopping)
    spent each tick's start budget on a slow head: every tick tried it first and stopped there, and the jobs
    queued behind it never started while it waited (docs/api.md: a job put off lets the jobs behind it start).
    A job put off in a tick its budget cut short waits for the jobs behind it to have their try."""
    monkeypatch.setattr(supervision, "TICK_BUDGET_SECONDS", 0.5)
    monkeypatch.setattr(ray_executor, "STRAY_SETTLE_SECONDS", 0.0)
    client = SlowAnswers()
    store, supervisor = supervised_on_ray(tmp_path, client, "lost", "behind-1", "behind-2", max_concurrent=5)
    entrypoint = supervisor.executor.entrypoint(1, supervisor.train_args(store.get_job("lost")),
                                                supervisor.job_path("lost"))
    stray = SimpleNamespace(submission_id="lost-1", status="RUNNING", metadata={"trainmetrics_job_id": "lost"},
                            entrypoint=entrypoint)
    client.listed, client.seconds = [stray], 0.5        # a stray whose stop takes long, on a head slow to answer
    for _ in range(4):
        supervisor.tick()
    assert [store.get_job(job_id).state for job_id in ("lost", "behind-1", "behind-2")] == ["queued", "running",
                                                                                           "running"]
    assert supervisor.waiting_for(store.get_job("lost")).startswith("its start, put off: its Ray submission lost-1")
    stray.status = "STOPPED"
    for _ in range(2):
        supervisor.tick()
    assert store.get_job("lost").state == "running"     # tried again in its turn
    store.close()


@pytest.mark.parametrize("received", [False, True], ids=["refused", "answer-lost"])
def test_a_job_submitted_while_ray_does_not_answer_waits_queued_and_runs_once(received, tmp_path, caplog, monkeypatch):
    client = Submissions(received_despite_error=received)
    store, supervisor = supervised_on_ray(tmp_path, client, "first", "second", max_concurrent=2)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            supervisor.tick()
    assert [job.state for job in store.list_jobs()] == ["queued", "queued"]     # not failed: Ray was away
    said = [record.getMessage() for record in caplog.records if "not started" in record.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and len(said[0]) < 400
    client.answering = True
    supervisor.tick()
    jobs = {job.id: job for job in store.list_jobs()}
    assert {job.state for job in jobs.values()} == {"running"}
    assert len(client.submitted) == 2                        # each job once, whatever reached Ray before
    for job in jobs.values():                                # the run's secret is the one Ray holds
        token = client.submitted[job.handle][REGISTER_TOKEN_VARIABLE]
        assert token_matches(job, token)
    store.close()


def test_a_run_ray_received_though_its_answer_was_lost_keeps_its_result_and_reports_its_endpoint(tmp_path):
    """The retry that takes such a run removed its result first (the files of the very run it adopts: one that
    finished before the retry got through ended `failed`, "exit code 0 without a result"), and the run's
    endpoint registration was a 401 until the retry recorded it (never scraped)."""
    client = Submissions(received_despite_error=True)
    store, supervisor = supervised_on_ray(tmp_path, client, "lost")
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    supervisor.tick()
    assert store.get_job("lost").state == "queued" and len(client.submitted) == 1
    token = next(iter(client.submitted.values()))[REGISTER_TOKEN_VARIABLE]
    # The run, started by Ray meanwhile, reports where it serves /metrics, trains, and writes its result.
    service.register_endpoint("lost", token, {"rank": 0, "address": "127.0.0.1:9999", "scheme": "http"})
    with pytest.raises(Exception, match="secret"):
        service.register_endpoint("lost", "not-its-secret", {"rank": 0, "address": "127.0.0.1:9998", "scheme": "http"})
    result = supervisor.result_path("lost")
    result.write_text(json.dumps({"state": "completed", "exit_code": 0}))
    client.answering = True
    supervisor.tick()
    assert store.get_job("lost").state == "running" and len(client.submitted) == 1
    assert result.exists() and [e[0] for e in store.endpoints()] == ["lost"]
    store.close()


def test_a_run_no_server_recorded_is_stopped_and_awaited_before_its_job_starts_again(tmp_path, monkeypatch):
    """A server killed between submitting a run and recording it left the job queued and the run going. The
    next server stopped that run and submitted the job again at once, with arguments built before the stop:
    the stopped run's checkpoint landed after them, the new run (no --resume) refused the directory and the job
    failed. The start now waits until Ray says the stray ended, and a moment more; the jobs behind it start."""
    monkeypatch.setattr(ray_executor, "STRAY_SETTLE_SECONDS", 0.3)
    client = Submissions()
    client.answering = True
    store, supervisor = supervised_on_ray(tmp_path, client, "lost", "behind", max_concurrent=2)
    lost = store.get_job("lost")
    entrypoint = supervisor.executor.entrypoint(1, supervisor.train_args(lost), supervisor.job_path("lost"))
    stray = SimpleNamespace(submission_id="lost-1", status="RUNNING", metadata={"trainmetrics_job_id": "lost"},
                            entrypoint=entrypoint)
    client.listed = [stray]
    for _ in range(2):
        supervisor.tick()
        assert store.get_job("lost").state == "queued" and store.get_job("behind").state == "running"
    assert client.stopped == ["lost-1"]                  # asked once
    stray.status = "STOPPED"                             # its stop's checkpoint written as it ended
    (supervisor.checkpoint_dir("lost") / "step-000000030.pt").write_bytes(b"written by the stray run")
    supervisor.tick()
    assert store.get_job("lost").state == "queued"       # its ranks may outlive the launcher for a moment
    time.sleep(0.35)
    supervisor.tick()
    job = store.get_job("lost")
    assert job.state == "running" and "--resume" in client.entrypoints[job.handle].split()
    store.close()


def test_a_head_that_cannot_list_its_submissions_is_not_asked_to_submit(tmp_path, caplog):
    """Ray unreachable when a start looks for the job's unrecorded submissions: the submission was tried all
    the same (a frozen head held the state thread two request timeouts per try, ~20 s, every API call waiting),
    and the listing's failure was logged at every try (every 5 s per queued job)."""
    ray, client = RayExecutor("http://127.0.0.1:8265"), Submissions()
    ray._client = client
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with pytest.raises(ExecutorUnavailable, match="Ray did not answer"):
                ray.clear_way("job-1", tmp_path)
    assert client.calls == ["list_jobs"] * 3
    assert not [record for record in caplog.records if "cannot list" in record.getMessage()]


def test_health_says_when_ray_does_not_answer(tmp_path):
    with socket.socket() as closed:             # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(ExecutorUnavailable, match=r"^Ray at http://127\.0\.0\.1:\d+ did not answer \(") as raised:
        RayExecutor(address).check()
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 300


def test_health_says_executor_unavailable_when_the_head_never_answers():
    """A head that takes connections and never answers: the check waited as long as /healthz itself, which
    answered a bare `timeout` where the docs say `executor_unavailable`."""
    from trainmetrics.edge import HEALTH_TIMEOUT_SECONDS

    assert ray_executor.CHECK_TIMEOUT_SECONDS < HEALTH_TIMEOUT_SECONDS
    with socket.socket() as frozen:             # takes connections (the backlog), answers nothing
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        with pytest.raises(ExecutorUnavailable, match="did not answer"):
            RayExecutor(f"http://127.0.0.1:{frozen.getsockname()[1]}").check()


def test_a_ray_head_that_never_answers_does_not_hold_the_state_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_executor, "REQUEST_TIMEOUT_SECONDS", 0.5)
    with socket.socket() as frozen:             # takes connections (the backlog), answers nothing
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        ray = RayExecutor(f"http://127.0.0.1:{frozen.getsockname()[1]}")
        began = time.monotonic()
        assert ray.poll(Run("job-1", "ray-1", tmp_path)) == (False, None)      # taken for running, said once
        with pytest.raises(ExecutorUnavailable):
            ray.start("job-2", 1, ["--model", "mlp"], tmp_path, {})
        assert time.monotonic() - began < 5


def test_after_one_unanswered_request_ray_is_left_alone_for_a_while(tmp_path, monkeypatch):
    """Every poll of every run waited the whole request timeout on a frozen head: a tick over 8 runs held the
    state thread for 80 s. After one unanswered request, nothing is asked for QUIET_SECONDS."""
    monkeypatch.setattr(ray_executor, "REQUEST_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 30.0)
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        ray = RayExecutor(f"http://127.0.0.1:{frozen.getsockname()[1]}")
        began = time.monotonic()
        runs = [Run(f"job-{i}", f"ray-{i}", tmp_path) for i in range(8)]
        assert [ray.poll(run) for run in runs] == [(False, None)] * 8          # taken for running
        assert ray.signal(runs[0], "paused") is True                           # through the shared file
        with pytest.raises(ExecutorUnavailable):
            ray.start("job-9", 1, ["--model", "mlp"], tmp_path, {})
        assert time.monotonic() - began < 2.5                                  # one timeout, not ten


class JsonAnswers(http.server.BaseHTTPRequestHandler):
    """A stand-in head's request handler: answers JSON text, logs nothing."""

    def answer(self, code: int, text: str):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


class StandInHead:
    """A stand-in for a Ray head: an HTTP server on a free loopback port, its `address`, its handler the subclass's."""

    def serve(self, handler: type) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class HeadBehindAProxy(StandInHead):
    """A stand-in for a Ray head behind a gateway that wants a header: /api/version answers only with it, and
    every request's headers are kept."""

    def __init__(self, wanted: dict[str, str]):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(dict(self.headers))
                allowed = all(self.headers.get(name) == value for name, value in wanted.items())
                body = json.dumps({"ray_version": "2.99.0", "version": "3"} if allowed else {"error": "no"})
                self.send_response(200 if allowed else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.serve(Handler)


def test_requests_to_ray_and_the_health_check_carry_ray_job_headers(monkeypatch):
    """A head behind an authenticating gateway: the job server sent no headers at all (its jobs could not be
    submitted), and /healthz asked without them. RAY_JOB_HEADERS, as `ray job submit` reads it, goes with every
    request now."""
    head = HeadBehindAProxy({"Authorization": "Bearer s3cret"})
    try:
        monkeypatch.delenv(ray_executor.HEADERS_VARIABLE, raising=False)
        with pytest.raises(ExecutorUnavailable, match="401"):
            RayExecutor(head.address).check()
        monkeypatch.setenv(ray_executor.HEADERS_VARIABLE, '{"Authorization": "Bearer s3cret"}')
        ray = RayExecutor(head.address)
        assert ray.check() == {"executor": "ray", "ray_version": "2.99.0"}
        ray.client                                      # made: its constructor asks the head for its version
        assert [seen.get("Authorization") for seen in head.seen[-2:]] == ["Bearer s3cret"] * 2
    finally:
        head.close()


@pytest.mark.parametrize("value", ['{"Authorization": ', '["Bearer x"]', '{"X-Retries": 3}'])
def test_unusable_ray_job_headers_stop_the_server_in_one_line(value, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainmetrics", "server", "--data-dir", str(tmp_path),
                             "--executor", "ray", "--ray-address", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, ray_executor.HEADERS_VARIABLE: value})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("trainmetrics server: error: RAY_JOB_HEADERS "), lines[0]


@pytest.mark.parametrize("answering", [False, True], ids=["ray-away", "ray-back"])
def test_a_job_cancelled_while_its_submission_went_unanswered_does_not_train_unseen(answering, tmp_path):
    """Ray received a submission but its answer was lost; the job, queued, was cancelled: the Ray job ran on,
    trained to its end and was never stopped. Its launcher now reads "cancelled" in the control file (before it
    places a rank, or while it runs), and Ray is asked to stop it when it answers."""
    client = Submissions(received_despite_error=True)
    store, supervisor = supervised_on_ray(tmp_path, client, "lost")
    supervisor.tick()
    assert store.get_job("lost").state == "queued" and len(client.submitted) == 1
    client.answering = answering
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    status, body = service.stop(None, "lost", "cancelled")
    assert status == 200 and body["state"] == "cancelled"
    assert (supervisor.job_path("lost") / CONTROL_FILE_NAME).read_text() == "cancelled"
    assert client.stopped == (list(client.submitted) if answering else [])
    supervisor.tick()
    assert store.get_job("lost").state == "cancelled" and len(client.submitted) == 1
    store.close()


def test_a_job_cancelled_after_a_server_submitted_it_unrecorded_stops_that_submission(tmp_path):
    """A server killed between submitting a run and recording it; the next server (which knows nothing of that
    submission: kept in memory) has the job queued and its user cancels it: only a start of it looked for the
    stray (clear_way), and a cancelled job never starts, so the submission trained on unseen. Its launcher reads
    "cancelled" in the control file."""
    store, supervisor = supervised_on_ray(tmp_path, Submissions(), "stray", max_concurrent=0)
    supervisor.job_path("stray").mkdir(parents=True)        # made by the start the killed server did not record
    status, _ = JobService(ServerSettings(data_dir=tmp_path), store, supervisor).stop(None, "stray", "cancelled")
    assert status == 200 and (supervisor.job_path("stray") / CONTROL_FILE_NAME).read_text() == "cancelled"
    store.close()


def test_the_control_file_is_written_through_nothing_planted_in_the_shared_job_directory(tmp_path):
    """The job directory is on storage the Ray nodes share, and the ranks write into it: a FIFO planted at the
    control file's fixed temp name blocked the state thread (the whole API) at the next pause or cancel, and a
    symlink there had "cancelled" written into the file it points to."""
    import os
    import signal as signals

    ray, run = executor(UNREACHABLE), Run("job-1", "ray-1", tmp_path)
    os.mkfifo(tmp_path / f".{CONTROL_FILE_NAME}.tmp")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / f".{ray_executor.STACKS_REQUEST_NAME}.tmp").symlink_to(victim)

    def timed_out(*_):
        raise TimeoutError("blocked on a planted file")

    previous = signals.signal(signals.SIGALRM, timed_out)
    signals.setitimer(signals.ITIMER_REAL, 3)
    try:
        assert ray.signal(run, "cancelled") is True
        assert ray.request_stacks(run) is True
    finally:
        signals.setitimer(signals.ITIMER_REAL, 0)
        signals.signal(signals.SIGALRM, previous)
    assert (tmp_path / CONTROL_FILE_NAME).read_text() == "cancelled" and victim.read_text() == "mine"


@pytest.mark.parametrize("args,cluster_gpus,gpus", [
    ([], 8, 1), ([], 0, 0), (["--device", "cpu"], 8, 0), (["--device=cuda"], 0, 1), (["--device", "cuda:1"], 8, 1),
    (["--target=--device", "--device", "cpu"], 8, 0)])
def test_a_rank_asks_ray_for_a_gpu_when_its_job_may_use_one(args, cluster_gpus, gpus):
    from trainmetrics.jobserver.ray_launch import gpus_per_rank, requested_device

    assert gpus_per_rank(requested_device(args), cluster_gpus) == gpus


def test_a_stop_that_reaches_a_rank_before_its_process_exists_is_sent_once_it_does(tmp_path):
    """The launcher passes a stop to every rank once (a second signal could land while a rank exits): one that
    reached a rank's actor before its `run` had started the process (a pause or cancel right after Ray placed
    the ranks) was dropped, and the job trained on with its stop accepted (202) and never carried out."""
    import signal as signals
    import sys

    from trainmetrics.jobserver.ray_launch import Rank

    rank = Rank.__ray_actor_class__()      # the actor's own class, run here without Ray
    rank.signal(int(signals.SIGTERM))
    # As a trainer does: the stop signals come blocked, and are unblocked once its handlers exist.
    waits = "import signal, time; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM]); time.sleep(20)"
    started = time.monotonic()
    assert rank.run([sys.executable, "-c", waits], {}, str(tmp_path / "train.log")) == -signals.SIGTERM
    assert time.monotonic() - started < 10


RANK_ACTOR = """
import sys, threading, time
from trainmetrics.jobserver.ray_launch import Rank
rank = Rank.__ray_actor_class__()
threading.Thread(target=rank.run, args=([sys.executable, "-c", sys.argv[1]], {}, sys.argv[2]), daemon=True).start()
while rank.process is None:
    time.sleep(0.01)
print(rank.process.pid, flush=True)
time.sleep(60)
"""
# A trainer in short: a SIGTERM is a cancel, said in its result.
TRAINER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("cancelled"), sys.exit(3)))
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
time.sleep(30)
"""


def test_a_rank_dies_with_its_actor_and_takes_no_cancel_from_rays_cleanup(tmp_path):
    """A rank's actor killed (Ray's memory monitor, `ray stop` on its node) left the rank's process to Ray's
    cleanup of the worker's process group, a SIGTERM: the rank took it for a cancel, checkpointed and said
    `cancelled` in its result, and the job, lost, ended cancelled (not resumable) as if a user had asked."""
    import signal as signals

    import psutil

    result = tmp_path / "result"
    trainer = TRAINER.replace("sys.argv[1]", repr(str(result)))
    actor = subprocess.Popen([sys.executable, "-c", RANK_ACTOR, trainer, str(tmp_path / "train.log")],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    rank = psutil.Process(int(actor.stdout.readline()))
    time.sleep(0.5)                                         # the trainer's handler is in place
    actor.kill()
    actor.wait()
    actor.stdout.close()
    try:
        os.killpg(actor.pid, signals.SIGTERM)               # as Ray ends what is left of the worker's group
    except ProcessLookupError:
        pass
    try:
        rank.wait(timeout=5)
    except psutil.TimeoutExpired:
        rank.kill()
        raise AssertionError("the rank's process outlived its actor") from None
    assert not result.exists(), "the rank took Ray's cleanup for a cancel"


def test_a_rank_whose_actor_died_is_named_and_counted_killed(monkeypatch, capsys):
    """The launcher died of the actor's error (a traceback) and the job said "exit code 1 without a result"."""
    from ray.exceptions import ActorDiedError

    from trainmetrics.jobserver import ray_launch

    def get(run):
        if run == "rank 1's run":
            raise ActorDiedError()
        return 0

    monkeypatch.setattr(ray_launch.ray, "get", get)
    assert ray_launch.rank_codes(["rank 0's run", "rank 1's run"]) == [0, -9]
    assert "rank 1: its Ray actor died, and the rank with it: The actor died" in capsys.readouterr().out


def test_a_rank_whose_run_raised_has_its_peers_killed_as_a_failed_one(monkeypatch):
    """A rank whose run raised before its process started (its node without the job's directory: the log could not
    be opened) never joined the others, and was taken for no failure: its peers waited in the rendezvous for its
    30-minute timeout, the job `running`, where a rank that failed so has its peers killed after 10 s."""
    from ray.exceptions import RayTaskError

    from trainmetrics.jobserver import ray_launch

    missing = FileNotFoundError(2, "No such file or directory", "/data/jobs/j/train.log")

    def get(run):
        if run == "rank 1's run":
            raise RayTaskError("Rank.run", "Traceback (most recent call last):\nFileNotFoundError", missing
                               ).as_instanceof_cause()
        return 0

    monkeypatch.setattr(ray_launch.ray, "get", get)
    assert ray_launch.lost_or_failed(0, "rank 0's run") is None
    why = ray_launch.lost_or_failed(1, "rank 1's run")
    assert why is not None and why.startswith("rank 1 failed (its run raised FileNotFoundError: "), why


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT"])
def test_rays_stop_by_either_of_its_stop_signals_cancels_a_run_waiting_for_placement(stop_signal, tmp_path,
                                                                                       monkeypatch):
    """Ray's stop of a submission sends its entrypoint SIGINT where the cluster sets RAY_JOB_STOP_SIGNAL=SIGINT:
    the launcher took SIGTERM only, so `ray job stop` there was a KeyboardInterrupt (a traceback, its ranks killed
    with their actors without a checkpoint) where the docs promise a cancel. Driven without Ray: its placement,
    which never comes, stands in for Ray's."""
    import signal as signals

    from trainmetrics.jobfiles import read_result
    from trainmetrics.jobserver import ray_launch

    sent = []

    def wait(refs, timeout):
        if not sent:            # Ray's stop, while the launcher waits for the placement
            sent.append(True)
            os.kill(os.getpid(), getattr(signals, stop_signal))
        return [], refs

    monkeypatch.setattr(ray_launch.ray, "init", lambda **_: None)
    monkeypatch.setattr(ray_launch.ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray_launch.ray, "wait", wait)
    monkeypatch.setattr(ray_launch, "placement_group", lambda *_, **__: SimpleNamespace(ready=lambda: "ready"))
    monkeypatch.setattr(ray_launch, "remove_placement_group", lambda group: None)
    previous = {signum: signals.getsignal(signum) for signum in (signals.SIGTERM, signals.SIGINT)}
    try:
        code = ray_launch.main(["--nproc", "2", "--job-dir", str(tmp_path), "--", "--device", "cpu"])
    finally:
        for signum, handler in previous.items():
            signals.signal(signum, handler)
    assert code == 3 and read_result(tmp_path / "result.json")["state"] == "cancelled"


def test_a_job_submitted_while_rays_head_has_no_job_agent_yet_waits_queued(tmp_path):
    """A head restarting (or its job agent not up yet) answers a submission 500, "No available agent to submit
    job, please try again later.": the job was failed for good ("could not start"), for the cluster's state, not
    its own. It waits queued as when Ray does not answer, and runs once Ray takes it."""
    busy = RuntimeError("Request failed with status code 500: No available agent to submit job, please try again "
                        "later..")

    class NoAgentYet(Submissions):
        def submit_job(self, **kwargs):
            if not self.answering:
                raise busy
            return super().submit_job(**kwargs)

        def list_jobs(self):            # the head answers: only its submission is refused
            return self.listed

    client = NoAgentYet()
    store, supervisor = supervised_on_ray(tmp_path, client, "early")
    supervisor.tick()
    assert store.get_job("early").state == "queued" and client.submitted == {}
    client.answering = True
    supervisor.tick()
    job = store.get_job("early")
    assert job.state == "running" and list(client.submitted) == [job.handle]
    store.close()


def test_a_queued_job_says_it_waits_for_a_ray_that_keeps_failing_its_submissions(tmp_path, monkeypatch):
    """A Ray whose every submission fails inside (500) keeps its jobs queued (the next try may succeed: a head
    whose job agent is starting answers so), and said so only in the server's log, once a minute: a user saw a
    job queued for ever with nothing to say why. Its `waiting_for` now says what Ray answered and since when,
    through the pause Ray is left alone for after it (the executor's "did not answer lately" keeps the cause),
    and a queue that is full says so; once Ray takes the submissions, nothing."""
    failing = RuntimeError("Request failed with status code 500: Failed to start supervisor actor: the runtime_env "
                           "could not be set up")
    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 3600.0)

    class Failing(RayJobs):
        def submit_job(self, **kwargs):
            if not self.answering:
                self.calls.append("submit_job")
                raise failing
            return super().submit_job(**kwargs)

        def list_jobs(self):            # the head answers: only its submissions fail
            return self.listed

    client = Failing()
    client.answering = False
    store, supervisor = supervised_on_ray(tmp_path, client, "first", "second")
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    before = time.time()
    for _ in range(3):      # the first asks Ray, the others find it left alone
        supervisor.tick()
    assert client.calls.count("submit_job") == 1
    views = [service.get(None, job_id) for job_id in ("first", "second")]
    assert [view["state"] for view in views] == ["queued", "queued"]
    for view in views:
        said = view["waiting_for"]
        assert said.startswith("the ray executor to start jobs again: Ray did not answer lately (RuntimeError: "
                               "Request failed with status code 500: Failed to start supervisor actor"), said
        since = calendar.timegm(time.strptime(said.split("(since ")[1].split(";")[0], "%Y-%m-%dT%H:%M:%SZ"))
        assert before - 1 <= since <= time.time()
        assert "\n" not in said and len(said) < 500
    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 0.0)
    supervisor.executor._quiet_until = float("-inf")
    client.answering = True
    supervisor.tick()           # one slot: the first runs, the second waits for it
    assert service.get(None, "first")["waiting_for"] is None
    assert service.get(None, "second")["waiting_for"] == ("a free slot: 1 job(s) running, at most 1 at once "
                                                              "(--max-concurrent)")
    client.ends[store.get_job("first").handle] = ("SUCCEEDED", 0, None)
    supervisor.tick()
    supervisor.tick()
    assert store.get_job("second").state == "running" and service.get(None, "second")["waiting_for"] is None
    store.close()


def test_a_job_ray_refused_shows_no_register_token_ray_quoted_in_its_error_or_the_log(tmp_path, caplog):
    """A submission Ray refuses (a 400: the job fails) may quote the runtime_env, the run's register token among
    its env_vars: it went whole into the job's error and, with its traceback, the server's log."""
    tokens = []

    class Refusing(RayJobs):
        def submit_job(self, **kwargs):
            tokens.append(kwargs["runtime_env"]["env_vars"][REGISTER_TOKEN_VARIABLE])
            raise RuntimeError(f"Request failed with status code 400: invalid runtime_env {kwargs['runtime_env']}")

    store, supervisor = supervised_on_ray(tmp_path, Refusing(), "refused")
    with caplog.at_level(logging.WARNING):
        supervisor.tick()
    job = store.get_job("refused")
    assert job.state == "failed" and "status code 400: invalid runtime_env" in job.error and "<hidden>" in job.error
    assert tokens and not any(token[:8] in job.error or token[:8] in caplog.text for token in tokens)
    store.close()


def test_a_queued_jobs_waiting_for_shows_no_register_token_ray_quoted(tmp_path, monkeypatch):
    """Ray's 500 may quote the submission's runtime_env, the run's register token among its env_vars: what it
    said went whole into "Ray did not answer lately (...)", shown in every queued job's waiting_for (another
    owner's too) while Ray was left alone. The run's secrets are hidden before the line is cut."""
    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 3600.0)
    tokens = []

    class Quoting(RayJobs):
        def submit_job(self, **kwargs):
            tokens.append(kwargs["runtime_env"]["env_vars"][REGISTER_TOKEN_VARIABLE])
            raise RuntimeError(f"Request failed with status code 500: runtime_env {kwargs['runtime_env']} "
                               "could not be set up")

    store, supervisor = supervised_on_ray(tmp_path, Quoting(), "first", "second")
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    supervisor.tick()
    supervisor.tick()
    for job_id in ("first", "second"):
        said = service.get(None, job_id)["waiting_for"]
        assert "Request failed with status code 500" in said and "<hidden>" in said, said
        assert tokens and all(token[:8] not in said for token in tokens), said
    store.close()


class RayJobs(Submissions):
    """A Jobs API client that answers, and reports each submission RUNNING until a test sets its end in `ends`:
    submission id -> (Ray's status, the entrypoint's exit code, Ray's message)."""

    def __init__(self):
        super().__init__()
        self.answering = True
        self.ends: dict[str, tuple[str, int | None, str | None]] = {}

    def get_job_info(self, submission):
        from ray.job_submission import JobStatus

        status, code, message = self.ends.get(submission, ("RUNNING", None, None))
        return SimpleNamespace(status=JobStatus(status), driver_exit_code=code, message=message)

    def get_job_status(self, submission):
        return self.get_job_info(submission).status


def running_on_ray(tmp_path, monkeypatch, job_id: str = "job") -> tuple[RayJobs, JobStore, Supervisor]:
    """A job running on the fake Ray (polled afresh at every tick)."""
    monkeypatch.setattr(ray_executor, "POLL_SECONDS", 0.0)
    client = RayJobs()
    store, supervisor = supervised_on_ray(tmp_path, client, job_id)
    supervisor.tick()
    assert store.get_job(job_id).state == "running"
    return client, store, supervisor


def test_a_run_ray_failed_without_a_result_says_rays_message_in_one_bounded_line(tmp_path, monkeypatch):
    """Ray's message for a submission it failed (the entrypoint's shell could not open the job's log on a node
    without the shared directory; a runtime_env that could not be set up; a traceback) was shown nowhere: the
    job said "exit code 2 without a result" and nothing of why."""
    client, store, supervisor = running_on_ray(tmp_path, monkeypatch)
    handle = store.get_job("job").handle
    log_line = f"/bin/sh: 1: cannot create {tmp_path}/jobs/job/train.log: Directory nonexistent"
    client.ends[handle] = ("FAILED", 2, "Job entrypoint command failed with exit code 2, last available logs "
                                        f"(truncated to 20,000 chars):\n\x1b[31m{log_line}\r\n\u2028\x00")
    supervisor.tick()
    job = store.get_job("job")
    assert job.state == "failed" and job.exit_code == 2
    assert job.error == ("exit code 2 without a result; Ray said: Job entrypoint command failed with exit code 2, "
                         "last available logs (truncated to 20,000 chars): \\x1b[31m/bin/sh: 1: cannot create "
                         "<data dir>/jobs/job/train.log: Directory nonexistent \\x00")
    store.close()


def test_a_run_a_signal_killed_says_the_signal_alone_not_rays_message(tmp_path, monkeypatch):
    """Ray's message for a run a signal killed is its exit code again and the log's tail: "killed by SIGKILL
    without a result" was followed by 500 characters of it (found by the real-Ray tests of a killed rank)."""
    client, store, supervisor = running_on_ray(tmp_path, monkeypatch)
    client.ends[store.get_job("job").handle] = ("FAILED", -9, "Job entrypoint command failed with exit code -9, "
                                                              "last available logs (truncated to 20,000 chars): ...")
    supervisor.tick()
    job = store.get_job("job")
    assert (job.state, job.exit_code, job.error) == ("failed", -9, "killed by SIGKILL without a result")
    store.close()


def test_rays_message_is_bounded_to_its_beginning_and_its_end():
    traceback = ("Failed to start supervisor actor job-1: 'boom'. Full traceback:\n" + "  frame\n" * 5000 +
                 "ValueError: x")
    said = ray_executor.ray_message(traceback)
    assert len(said) <= ray_executor.RAY_MESSAGE_LENGTH and "\n" not in said
    assert said.startswith("Failed to start supervisor actor job-1: 'boom'.") and said.endswith("frame ValueError: x")
    assert ray_executor.ray_message(None) is None and ray_executor.ray_message(" \n") is None


def test_a_run_ray_stopped_or_that_completed_says_no_message(tmp_path, monkeypatch):
    client, store, supervisor = running_on_ray(tmp_path, monkeypatch)
    client.ends[store.get_job("job").handle] = ("STOPPED", None, "Job was intentionally stopped.")
    supervisor.tick()
    job = store.get_job("job")
    assert job.state == "failed" and "Ray said" not in job.error
    store.close()


@pytest.mark.parametrize("ends_as,state", [("FAILED", "failed"), ("STOPPED", "cancelled")])
@pytest.mark.parametrize("with_result", [True, False], ids=["its-result", "no-result"])
def test_a_run_that_failed_by_itself_as_its_cancels_kill_went_out_ends_failed(ends_as, state, with_result, tmp_path,
                                                                                monkeypatch):
    """A cancelled run failed by itself just as its cancel's grace ran out: the kill went out (Ray's stop of a
    submission whose supervisor still lives answers that it stopped it), and the job read `cancelled`, its
    failure hidden. Ray's status says which ended it: FAILED the run itself, STOPPED the kill."""
    client, store, supervisor = running_on_ray(tmp_path, monkeypatch)
    supervisor.cancel_grace = 0.0
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    status, _ = service.stop(None, "job", "cancelled")
    assert status == 202
    handle = store.get_job("job").handle
    if with_result:
        supervisor.result_path("job").write_text(json.dumps({"state": "failed", "exit_code": 1,
                                                             "error_type": "RuntimeError", "error": "CUDA error"}))
    client.ends[handle] = (ends_as, 1 if ends_as == "FAILED" else None,
                           "Job entrypoint command failed with exit code 1. No logs available."
                           if ends_as == "FAILED" else "Job was intentionally stopped.")
    supervisor.tick()                                   # the kill goes out, then the poll sees the end
    job = store.get_job("job")
    assert client.stopped == [handle]
    assert job.state == state
    if ends_as == "FAILED":
        assert job.error == ("CUDA error" if with_result else
                             "exit code 1 without a result; Ray said: Job entrypoint command failed with exit code 1. "
                             "No logs available.")
    store.close()


PROXY_404S = [RuntimeError("Request failed with status code 404: <html><head><title>404 Not Found</title></head>"
                           "<body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>."),
              RuntimeError("Request failed with status code 404: 404 page not found."),
              RuntimeError("Request failed with status code 404: Job other-1 was not found."),
              RuntimeError("Version check returned 404. Please ensure the cluster is running Ray 1.9 or higher.")]


@pytest.mark.parametrize("error", PROXY_404S, ids=["nginx", "plain", "not-rays-words", "version-check"])
def test_a_404_that_is_not_rays_is_ray_not_answering_not_a_run_ray_lost(error, tmp_path):
    """Any 404 was read as Ray's "no such submission": a gateway in front of the head whose route was missing
    for a moment (its 404 page) ended every running job as lost (failed, or resumed), and a server restarted then
    started its jobs' runs a second time. Only Ray's own answer, "Job <submission id> does not exist", says so."""
    ray, run = executor(error), Run("job-1", "ray-1", tmp_path)
    assert ray.adopt("job-1", "ray-1", tmp_path) is not None
    assert ray.poll(run) == (False, None)
    assert ray.signal(run, "cancelled") is True
    assert ray_executor.unanswered(error) and not ray_executor.unknown_to_ray(error, "ray-1")


def test_only_rays_own_404_for_the_submission_asked_says_ray_does_not_know_it():
    assert ray_executor.unknown_to_ray(GONE, "ray-1") and not ray_executor.unanswered(GONE)
    assert not ray_executor.unknown_to_ray(GONE, "ray-10")


@pytest.mark.parametrize("error", PROXY_404S[:2], ids=["nginx", "plain"])
def test_a_job_submitted_or_running_while_a_gateway_answers_404_is_neither_failed_nor_lost(error, tmp_path,
                                                                                          monkeypatch):
    client, store, supervisor = running_on_ray(tmp_path, monkeypatch, "running")
    store.add_job(JobRecord(id="queued", owner="default", name="queued", state="queued",
                            spec={"model": "mlp", "dataset": "blobs", "nproc": 1}))
    supervisor.max_concurrent = 2

    class Gateway404:
        def __getattr__(self, name):
            def refused(*args, **kwargs):
                raise error
            return refused

    supervisor.executor._client = Gateway404()
    for _ in range(3):
        supervisor.tick()
    assert store.get_job("running").state == "running" and store.get_job("queued").state == "queued"
    supervisor.executor._client = client                # the gateway's route back
    supervisor.tick()
    assert store.get_job("running").state == "running" and store.get_job("queued").state == "running"
    store.close()


@pytest.mark.parametrize("stop_answered", [True, False], ids=["stop-answered", "stop-refused"])
def test_a_retry_that_fails_on_another_error_stops_the_submission_its_first_try_may_have_left(stop_answered,
                                                                                              tmp_path):
    """The first submission's answer was lost (it may run at Ray); the retry under the same id was refused for
    another reason, and the job failed: nothing stopped that first submission, which trained on unseen."""
    refused = RuntimeError("Request failed with status code 413: Request Entity Too Large.")

    class RefusesTheRetry(Submissions):
        def submit_job(self, **kwargs):
            if self.answering:
                raise refused
            return super().submit_job(**kwargs)

        def stop_job(self, submission_id):
            if not stop_answered:
                raise refused
            return super().stop_job(submission_id)

    client = RefusesTheRetry(received_despite_error=True)
    store, supervisor = supervised_on_ray(tmp_path, client, "lost")
    supervisor.tick()
    assert store.get_job("lost").state == "queued" and len(client.submitted) == 1
    client.answering = True
    supervisor.tick()
    job = store.get_job("lost")
    assert job.state == "failed" and "413" in job.error
    assert client.stopped == (list(client.submitted) if stop_answered else [])
    assert (supervisor.job_path("lost") / CONTROL_FILE_NAME).read_text() == "cancelled"     # its launcher stops
    store.close()


def test_a_ray_message_with_an_undecodable_path_still_ends_the_job_failed(tmp_path, monkeypatch):
    """Ray's message comes as JSON, which carries lone surrogates: a runtime_env error naming a path of bytes that
    are not UTF-8 (os.fsdecode's "\\udcff") reached the job's error as is, SQLite refused to store it ("surrogates
    not allowed"), and the run was reaped again at every tick, its job `running` for good."""
    client, store, supervisor = running_on_ray(tmp_path, monkeypatch)
    client.ends[store.get_job("job").handle] = ("FAILED", 1, "runtime_env setup failed: no such file: /data/\udcff.whl")
    supervisor.tick()
    job = store.get_job("job")
    assert job.state == "failed"
    assert job.error.endswith("Ray said: runtime_env setup failed: no such file: /data/\\udcff.whl")
    assert "job" not in supervisor.runs
    store.close()


@pytest.mark.parametrize("ended_by", ["refused-retry", "cancel-while-queued"])
def test_a_first_try_that_is_stopped_unrecorded_leaves_service_discovery(ended_by, tmp_path):
    """The first submission's run (its answer lost) reported its endpoint with the start's secret; the retry was
    refused for another reason (or the queued job cancelled) and that run stopped, but its endpoint stayed in GET
    /api/training/sd: Prometheus scraped a dead target of a failed (cancelled) job until the job ran again."""
    class RefusesTheRetry(Submissions):
        def submit_job(self, **kwargs):
            if self.answering:
                raise RuntimeError("Request failed with status code 413: Request Entity Too Large.")
            return super().submit_job(**kwargs)

    client = RefusesTheRetry(received_despite_error=True)
    store, supervisor = supervised_on_ray(tmp_path, client, "lost")
    service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
    supervisor.tick()
    token = next(iter(client.submitted.values()))[REGISTER_TOKEN_VARIABLE]
    service.register_endpoint("lost", token, {"rank": 0, "address": "127.0.0.1:9999", "scheme": "http"})
    assert [target["targets"] for target in service.discovery()] == [["127.0.0.1:9999"]]
    if ended_by == "refused-retry":
        client.answering = True
        supervisor.tick()
    else:
        assert service.stop(None, "lost", "cancelled")[0] == 200
    assert store.get_job("lost").state == ("failed" if ended_by == "refused-retry" else "cancelled")
    assert service.discovery() == []
    store.close()


class HeadAnswering(StandInHead):
    """A stand-in for a Ray head that answers its version, and every Jobs API request with `status` and `body`
    (a request to /api/jobs/ is kept: its submission id), so that Ray's real client reads the answers."""

    def __init__(self, status: int, body: str):
        submitted = self.submitted = []

        class Handler(JsonAnswers):
            def do_GET(self):
                if self.path == "/api/version":
                    self.answer(200, json.dumps({"ray_version": "2.99.0", "version": "3"}))
                else:
                    self.answer(status, body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                submitted.append(request.get("submission_id"))
                self.answer(status, body)

        self.serve(Handler)


@pytest.mark.parametrize("status", [401, 403, 407, 429])
def test_a_head_that_refuses_the_servers_credentials_keeps_its_jobs_queued(status, tmp_path):
    """A head (or its gateway) refusing the job server's credentials (Ray's token rotated, a gateway's token
    expired: 401, 403, 407) or asking it to come back later (429) failed every queued job for good, one by one
    ("could not start: AuthenticationError: ..."), for the server's configuration, not the jobs'. They wait
    queued, as when Ray does not answer, their waiting_for saying what the head answered, and run once it takes
    the credentials."""
    head = HeadAnswering(status, json.dumps({"error": "token expired"}))
    try:
        store, supervisor = supervised_on_ray(tmp_path, ray_executor.TimedJobSubmissionClient(head.address),
                                              "first", "second", max_concurrent=2)
        service = JobService(ServerSettings(data_dir=tmp_path), store, supervisor)
        for _ in range(3):
            supervisor.tick()
        assert [job.state for job in store.list_jobs()] == ["queued", "queued"]
        said = service.get(None, "first")["waiting_for"]
        assert "Ray did not answer" in said and ("token expired" in said or str(status) in said), said
        client = RayJobs()
        supervisor.executor._client = client          # the credentials taken again
        supervisor.tick()
        assert [job.state for job in store.list_jobs()] == ["running", "running"]
        store.close()
    finally:
        head.close()


@pytest.mark.parametrize("body", ['{"submission_id": "other"}', '["accepted"]', '"accepted"'],
                         ids=["field-missing", "a-list", "a-string"])
def test_a_submission_answered_in_words_the_client_cannot_read_is_taken_not_failed(body, tmp_path):
    """A head answered the submission 200 with a body Ray's client could not read (a field missing: another Ray
    version's answer; not a JSON object), raising TypeError: the job failed for good ("could not start"), while
    Ray, which had taken the submission, ran it unseen and unstoppable. It is taken for an answer lost: the job
    waits queued, and the retry under the same submission id is taken when Ray says it has it."""
    head = HeadAnswering(200, body)
    try:
        store, supervisor = supervised_on_ray(tmp_path, ray_executor.TimedJobSubmissionClient(head.address), "job")
        supervisor.tick()
        assert store.get_job("job").state == "queued" and len(head.submitted) == 1
        client = RayJobs()
        client.submitted[head.submitted[0]] = {}      # Ray has it: the retry is told it already exists
        supervisor.executor._client = client
        supervisor.tick()
        job = store.get_job("job")
        assert job.state == "running" and job.handle == head.submitted[0] and len(client.submitted) == 1
        store.close()
    finally:
        head.close()


class HeadWithStatuses(StandInHead):
    """A stand-in for a Ray head whose job routes answer each submission with the status in `statuses` (as Ray's
    dashboard does: a job's details, JSON), and take every submission."""

    def __init__(self, statuses: dict[str, str], exits: dict[str, tuple[int, str]] | None = None):
        exits = exits or {}

        class Handler(JsonAnswers):
            def do_GET(self):
                if self.path == "/api/version":
                    self.answer(200, json.dumps({"ray_version": "2.99.0", "version": "3"}))
                else:
                    submission = self.path.rstrip("/").rsplit("/", 1)[-1]
                    code, message = exits.get(submission, (0, None))
                    self.answer(200, json.dumps({"type": "SUBMISSION", "submission_id": submission, "entrypoint": "x",
                                                 "status": statuses[submission], "driver_exit_code": code,
                                                 "message": message}))

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.answer(200, json.dumps({"submission_id": request["submission_id"], "job_id": None}))

        self.serve(Handler)


def test_a_run_in_a_status_this_client_cannot_read_holds_up_neither_other_runs_nor_starts(tmp_path, monkeypatch):
    """A head on a newer Ray answered one run's status in a word this client's model refuses (a status Ray added):
    the answer, read as Ray not answering, left Ray alone for the quiet period, and the next poll of that run (the
    first of each tick) did so again: the other runs were never seen to end and no queued job started, for as
    long as that run stayed so."""
    monkeypatch.setattr(ray_executor, "QUIET_SECONDS", 3600.0)
    head = HeadWithStatuses({"odd-1": "SUSPENDED", "done-1": "SUCCEEDED"})
    try:
        ray = RayExecutor(head.address)
        ray._client = ray_executor.TimedJobSubmissionClient(head.address)
        assert ray.poll(Run("odd", "odd-1", tmp_path)) == (False, None)         # taken for running
        assert ray.poll(Run("done", "done-1", tmp_path)) == (True, 0)
        assert ray.start("next", 1, ["--model", "mlp"], tmp_path, {}).job_id == "next"
    finally:
        head.close()


def test_a_paused_or_cancelled_run_is_not_logged_as_a_failure(tmp_path, caplog):
    """Ray calls every nonzero exit FAILED, a pause's 4 and a cancel's 3 too: each pause and cancel of a Ray job
    was logged at warning level as "Ray says its submission ... failed"."""
    ended = {f"{name}-1": (code, f"Job entrypoint command failed with exit code {code}")
             for name, code in (("paused", 4), ("cancelled", 3), ("failed", 1))}
    head = HeadWithStatuses(dict.fromkeys(ended, "FAILED"), ended)
    try:
        ray = RayExecutor(head.address)
        ray._client = ray_executor.TimedJobSubmissionClient(head.address)
        with caplog.at_level(logging.INFO, logger=ray_executor.log.name):
            assert [ray.poll(Run(name, name, tmp_path)) for name in ended] == [(True, 4), (True, 3), (True, 1)]
        warned = " ".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)
        assert "failed-1 failed" in warned and "paused-1" not in warned and "cancelled-1" not in warned
    finally:
        head.close()
