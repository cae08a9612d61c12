"""The job server's HTTP side: upload datasets, submit jobs, pause/resume/cancel them, list and download
checkpoints. Handlers are thin: they read the request, run one JobService operation on the state thread and
answer. The event loop never blocks: SQLite, process starts, psutil and file inspection run off it.

build_component() gives the edge (trainmetrics.edge) the routes, the lifespan (store, supervisor, the state
thread and the supervision loop), the /metrics registry and the health check.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import anyio
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from trainmetrics.contract import JOB_STATES, SPAWN_BLOCKED_SIGNALS, Trainer
from trainmetrics.edge import ApiError, Component, error_response, read_json
from trainmetrics.jobserver import stacks
from trainmetrics.jobserver.executors import ExecutorUnavailable, build_executor
from trainmetrics.jobserver.hangs import HangStacks
from trainmetrics.jobserver.reports import ReportKeeper
from trainmetrics.jobserver.jobs import JobService, ServerSettings, WaitingJob

from trainmetrics.jobserver.store import DATABASE_NAME, JobStore
from trainmetrics.jobserver.supervisor import Supervisor
from trainmetrics.jobserver.uploads import (CONCURRENT_INSPECTIONS, check_upload_request,
                                            discard_unfinished_uploads, discard_unrecorded_datasets,
                                            receive_dataset)

log = logging.getLogger("trainmetrics.server")

TICK_SECONDS = 0.2
# How often ended jobs are checked for a report to store (reports.py).
REPORT_ROUND_SECONDS = 1.0
# How often the server asks whether TrainerHang fires for one of its jobs (the rule evaluates every second).
HANG_ROUND_SECONDS = 2.0
# The supervision loop is healthy while it has ticked within this long.
STALE_TICK_SECONDS = 10.0
# A round that fails as the one before it did (a full disk, a database locked: every round until it is over) is
# said again at most this often.
REPEATED_FAILURE_LOG_SECONDS = 60.0
Result = TypeVar("Result")


class StateThread:
    """One worker thread that owns the store and the supervisor: every operation on them runs here, one at a
    time, so they need no locks and the event loop waits on nothing."""

    def __init__(self):
        # Job processes are started from this thread: with the stop and stacks signals blocked here, a job
        # starts with them blocked and gets any that came early once its handlers exist (trainer/stopping.py,
        # trainer/watchdog.py).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="jobserver-state",
            initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, SPAWN_BLOCKED_SIGNALS))

    async def run(self, operation: Callable[..., Result], *args) -> Result:
        """Run operation(*args) on the state thread and wait for it without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, operation, *args)

    def close(self) -> None:
        """Finish what is queued and stop the thread."""
        self._executor.shutdown(wait=True)


class JobServer:
    """What the routes share: the settings, the operations and the state thread (set up by the lifespan)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.service: JobService | None = None
        self.state = StateThread()
        # Jobs whose state no process publishes (queued, paused, ended by the server) as of the last tick.
        self.waiting: list[WaitingJob] = []
        # (the executor's name, since when) while it could not start any job, as of the last tick.
        self.held_back: tuple[str, float] | None = None
        self.last_tick: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WaitingJobsCollector(self))
        self.inspections = anyio.CapacityLimiter(CONCURRENT_INSPECTIONS)      # uploads checked at once

    async def call(self, operation: Callable[..., Result], *args) -> Result:
        """Run a JobService operation on the state thread."""
        return await self.state.run(operation, *args)

    def tick(self) -> None:
        """One round of supervision (on the state thread)."""
        self.service.supervisor.tick()
        self.service.uptime.note()
        self.waiting = self.service.waiting_jobs()
        supervisor = self.service.supervisor
        since = supervisor.held_back_since
        self.held_back = None if since is None else (supervisor.executor.name, since)
        self.last_tick = time.monotonic()

    @contextlib.asynccontextmanager
    async def lifespan(self):
        """Open the store, recover jobs, supervise them while serving; on the way out pause running jobs (they
        resume at the next start)."""
        settings = self.settings
        data_dir = Path(settings.data_dir)
        (data_dir / "datasets").mkdir(parents=True, exist_ok=True)
        discard_unfinished_uploads(data_dir / "datasets")

        def open_service() -> JobService:
            store = JobStore(data_dir / DATABASE_NAME)
            discard_unrecorded_datasets(data_dir / "datasets", {Path(d.path).name for d in store.list_datasets(None)})
            executor = build_executor(settings.executor, settings.ray_address, settings.ray_python)
            supervisor = Supervisor(store, data_dir, settings.job_dir, settings.max_concurrent,
                                    settings.linger_timeout, executor=executor, advertise_url=settings.advertise_url,
                                    gpus=settings.gpus)
            supervisor.recover()
            return JobService(settings, store, supervisor)

        self.service = await self.call(open_service)
        self.reports = ReportKeeper(settings.archive, self.call, self.service.store, self.service.uptime,
                                    settings.owners)
        if settings.archive is not None:
            settings.archive.load = self.reports.load
        self.hang_stacks = HangStacks(settings.hangs, self.call, self.service)
        # Each in its own loop: a Prometheus slow to answer must not hold up supervision, nor a rank slow to
        # write its stacks the stored reports.
        tasks = [asyncio.create_task(repeat(work, seconds, what)) for work, seconds, what in (
            (lambda: self.call(self.tick), TICK_SECONDS, "supervisor tick"),
            (self.reports.round, REPORT_ROUND_SECONDS, "storing job reports"),
            (self.hang_stacks.round, HANG_ROUND_SECONDS, "taking the stacks of hung jobs"))]
        try:
            yield {"jobserver": self}
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.call(self.service.supervisor.shutdown)
            await self.call(self.service.store.close)
            self.state.close()

    async def health(self, request: Request) -> dict:
        """Supervising: the loop ticked lately (the state thread is not stuck), and the executor can run jobs
        (Ray's head answers; asked off the state thread, which may be waiting on it)."""
        if self.last_tick is None or time.monotonic() - self.last_tick > STALE_TICK_SECONDS:
            raise ApiError(503, "not_supervising", "the job supervision loop has not run lately")
        try:
            executor = await asyncio.to_thread(self.service.supervisor.executor.check)
        except ExecutorUnavailable as error:
            raise ApiError(503, "executor_unavailable", str(error)) from error
        return {"running_jobs": self.service.supervisor.running_count(), **executor}


async def repeat(work, seconds: float, what: str) -> None:
    """Await `work()` every `seconds`, for good; a round that fails is logged and the next one comes. A failure
    the round before had too (the same error) is said again once a minute, in one line: a job that ended while the
    disk was full failed the supervisor's tick 5 times a second, a traceback each, until there was room."""
    said, said_at = None, 0.0
    while True:
        try:
            await work()
            said = None
        except Exception as error:
            failure, now = (type(error), str(error)), time.monotonic()
            if failure != said:
                log.exception("%s failed", what)
                said, said_at = failure, now
            elif now - said_at >= REPEATED_FAILURE_LOG_SECONDS:
                log.error("%s still failing: %s: %s", what, type(error).__name__, error)
                said_at = now
        await asyncio.sleep(seconds)


class WaitingJobsCollector:
    """trainer_job_state for jobs without a process (queued, paused, or ended by the server: cancelled while
    waiting, or never started, with their end), so Prometheus sees every state, and their trainer_job_info
    (its name and owner: a job is an owner's by that series' `owner` in the analytics' owner scope, and a
    queued job was no one's). Reads the last tick's list: collecting never touches the database."""

    def __init__(self, server: JobServer):
        self.server = server

    def collect(self):
        family = GaugeMetricFamily(Trainer.JOB_STATE, "1 for the job's current lifecycle state, 0 for the others.",
                                   labels=["job_id", "state"])
        submitted = GaugeMetricFamily(Trainer.JOB_SUBMITTED, "Unix time the job was submitted.", labels=["job_id"])
        ended = GaugeMetricFamily(Trainer.JOB_END, "Unix time the job server ended the job (no process did).",
                                  labels=["job_id"])
        resuming = GaugeMetricFamily(Trainer.JOB_RESUMING, "1 for a queued job that ran before: it waits to resume "
                                     "(with an end: it had run and waited so when the server ended it).",
                                     labels=["job_id"])
        info = GaugeMetricFamily(Trainer.JOB_INFO, "Job metadata; always 1.", labels=["job_id", "job_name", "owner"])
        held_back = GaugeMetricFamily(Trainer.STARTS_HELD_BACK_SINCE, "Unix time since which the executor could not "
                                      "start any job (queued jobs wait: the job API's waiting_for says why); "
                                      "absent while it can.", labels=["executor"])
        held = getattr(self.server, "held_back", None)
        if held is not None:
            held_back.add_metric([held[0]], held[1])
        for waiting in self.server.waiting:
            job_id = waiting.job.id
            for state in JOB_STATES:
                family.add_metric([job_id, state], 1 if state == waiting.state else 0)
            submitted.add_metric([job_id], waiting.job.created)
            info.add_metric([job_id, waiting.job.name, waiting.job.owner or ""], 1)
            if waiting.end is not None:
                ended.add_metric([job_id], waiting.end)
            # 0 too: the last value before or at an end says which end it is (a killed run's notice says 0, where
            # the samples of the wait before that run said 1).
            resuming.add_metric([job_id], int(waiting.resuming))
        yield family
        yield submitted
        yield ended
        yield resuming
        yield info
        yield held_back


def _server(request: Request) -> JobServer:
    return request.state.jobserver


def _caller(request: Request) -> str | None:
    return getattr(request.state, "owner", None)


def _allow_only(request: Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"{unknown[0][:40]}: unknown parameter (allowed: "
                                           f"{', '.join(sorted(allowed)) or 'none'})")
    repeated = sorted(name for name in allowed if len(request.query_params.getlist(name)) > 1)
    if repeated:        # which one would count is anybody's guess
        raise ApiError(400, "bad_request", f"{repeated[0]}: given more than once")


# ----- routes ----------------------------------------------------------------------------------------------

async def upload_dataset(request: Request) -> JSONResponse:
    """POST /api/training/datasets?name=FILE.csv|.npz[&target=COLUMN] with the file as the raw body (streamed
    to disk)."""
    server = _server(request)
    _allow_only(request, {"name", "target"})
    max_bytes = server.settings.max_upload_bytes
    name, target = check_upload_request(request, max_bytes)
    fields = await receive_dataset(request, name, target, Path(server.settings.data_dir) / "datasets", max_bytes,
                                   server.inspections)
    recording = asyncio.ensure_future(server.call(server.service.add_dataset, _caller(request), fields))
    try:
        recorded = await asyncio.shield(recording)
    except BaseException:
        # A stop cancels this request, not the record the state thread may be writing (a database locked by
        # another process holds it up to 5 s): its file was removed under a record that went in after.
        if not await _succeeded(recording):
            Path(fields["path"]).unlink(missing_ok=True)     # not recorded: no file of it is left behind
        raise
    return JSONResponse(recorded, status_code=201)


async def _succeeded(future: asyncio.Future) -> bool:
    """Whether the future ended with a result, waited for however often this request is cancelled meanwhile."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})
    return not future.cancelled() and future.exception() is None


async def list_datasets(request: Request) -> JSONResponse:
    """GET /api/training/datasets."""
    server = _server(request)
    _allow_only(request, set())
    return JSONResponse({"datasets": await server.call(server.service.list_datasets, _caller(request))})


async def submit_job(request: Request) -> JSONResponse:
    """POST /api/training/jobs with a JSON spec -> 201 {job_id, state, ...}."""
    server = _server(request)
    _allow_only(request, set())
    body = await read_json(request)
    return JSONResponse(await server.call(server.service.submit, _caller(request), body), status_code=201)


async def list_jobs(request: Request) -> JSONResponse:
    """GET /api/training/jobs?state=... (the server's own jobs, queued ones included)."""
    server = _server(request)
    _allow_only(request, {"state"})
    jobs = await server.call(server.service.list_jobs, _caller(request), request.query_params.get("state"))
    return JSONResponse({"jobs": jobs})


async def get_job(request: Request) -> JSONResponse:
    """GET /api/training/jobs/{job_id}."""
    server = _server(request)
    _allow_only(request, set())
    return JSONResponse(await server.call(server.service.get, _caller(request), request.path_params["job_id"]))


async def pause_job(request: Request) -> JSONResponse:
    """POST .../pause: a running job checkpoints at its next step boundary and stops, resumable (202)."""
    server = _server(request)
    _allow_only(request, set())
    status, job = await server.call(server.service.stop, _caller(request), request.path_params["job_id"], "paused")
    return JSONResponse(job, status_code=status)


async def cancel_job(request: Request) -> JSONResponse:
    """POST .../cancel: queued or paused -> cancelled at once (200); running -> at its next step (202)."""
    server = _server(request)
    _allow_only(request, set())
    status, job = await server.call(server.service.stop, _caller(request), request.path_params["job_id"],
                                    "cancelled")
    return JSONResponse(job, status_code=status)


async def resume_job(request: Request) -> JSONResponse:
    """POST .../resume: paused (or failed with a checkpoint) -> queued, continuing from its checkpoint."""
    server = _server(request)
    _allow_only(request, set())
    return JSONResponse(await server.call(server.service.resume, _caller(request), request.path_params["job_id"]))


async def list_job_checkpoints(request: Request) -> JSONResponse:
    """GET .../checkpoints."""
    server = _server(request)
    _allow_only(request, set())
    return JSONResponse(await server.call(server.service.checkpoints, _caller(request),
                                          request.path_params["job_id"]))


async def download_model(request: Request) -> Response:
    """GET .../download/model: the final weights (a state dict, torch.load(weights_only=True))."""
    server = _server(request)
    _allow_only(request, set())
    job_id, handle = await server.call(server.service.open_model, _caller(request), request.path_params["job_id"])
    return _download(handle, f"{job_id}-model.pt")


async def download_checkpoint(request: Request) -> Response:
    """GET .../download/checkpoints/{name}: only names like step-000000123.pt inside the job's dir."""
    server = _server(request)
    _allow_only(request, set())
    name = request.path_params["name"]
    job_id, handle = await server.call(server.service.open_checkpoint, _caller(request),
                                       request.path_params["job_id"], name)
    return _download(handle, f"{job_id}-{name}")


def _download(handle: BinaryIO, filename: str) -> Response:
    """An opened file as an attachment, with what a file answer has (Range requests for a resumed download of a
    large checkpoint, ETag, HEAD without a read): served through /proc/self/fd, which opens the file this
    descriptor holds even once it is deleted; the descriptor is closed when the answer was sent."""
    fd = handle.fileno()
    return _RangeErrorsAsJson(FileResponse(f"/proc/self/fd/{fd}", stat_result=os.fstat(fd), filename=filename,
                                           media_type="application/octet-stream",
                                           background=BackgroundTask(handle.close)), handle)


class _RangeErrorsAsJson(Response):
    """A FileResponse whose own answers to a Range it cannot serve (400 malformed, 416 past the file's end, in
    plain text, and without running its background task) are the API's error shape, the descriptor closed."""

    CODES = {400: "bad_request", 416: "range_not_satisfiable"}

    def __init__(self, response: FileResponse, handle: BinaryIO):
        self.response, self.handle = response, handle
        self.status_code, self.background = response.status_code, None

    async def __call__(self, scope, receive, send) -> None:
        refused: dict = {}

        async def sending(message) -> None:
            if message["type"] == "http.response.start" and message["status"] in self.CODES:
                refused.update(message, text=b"")
            elif not refused:
                await send(message)
            else:
                refused["text"] += message.get("body", b"")
                if not message.get("more_body", False):
                    status = refused["status"]
                    said = refused["text"].decode("utf-8", "replace").removeprefix("Range header: ")
                    reason = said or ("not a byte range this file has" if status == 416 else "malformed")
                    headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in refused["headers"]
                               if key.lower() == b"content-range"}
                    answer = error_response(status, self.CODES[status], f"Range header: {reason}", headers)
                    await answer(scope, receive, send)

        try:
            await self.response(scope, receive, sending)
        finally:
            if refused:
                self.handle.close()


async def job_stacks(request: Request) -> JSONResponse:
    """GET .../stacks: every rank's Python thread stacks, taken now (a running job), else the last ones its
    hang watchdog wrote (`fresh: false`)."""
    server = _server(request)
    _allow_only(request, set())
    job, path, before, asked_at = await server.call(server.service.request_stacks, _caller(request),
                                                    request.path_params["job_id"])
    if before is None:
        answer = await asyncio.to_thread(stacks.earlier, path, job["spec"].get("nproc", 1))
    else:
        answer = await stacks.collect(path, before, asked_at)
    # Encoded off the event loop too: up to 16 MiB of stacks (64 ranks), ~70 ms of the loop per request, and a
    # burst of requests shares one dump but encodes it once each.
    return await asyncio.to_thread(JSONResponse, {"job_id": job["job_id"], "state": job["state"], **answer})


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def register_endpoint(request: Request) -> JSONResponse:
    """POST /api/internal/jobs/{job_id}/endpoints: a job process reports its /metrics (its run's secret)."""
    server = _server(request)
    _allow_only(request, set())
    body = await read_json(request)
    return JSONResponse(await server.call(server.service.register_endpoint, request.path_params["job_id"],
                                          _bearer(request), body), status_code=201)


async def withdraw_endpoint(request: Request) -> Response:
    """DELETE /api/internal/jobs/{job_id}/endpoints?rank=N: the process is done being scraped."""
    server = _server(request)
    _allow_only(request, {"rank"})
    await server.call(server.service.withdraw_endpoint, request.path_params["job_id"], _bearer(request),
                      request.query_params.get("rank"))
    return Response(status_code=204)


async def service_discovery(request: Request) -> JSONResponse:
    """GET /api/training/sd: Prometheus http_sd targets, every running job process's /metrics."""
    server = _server(request)
    _allow_only(request, set())
    return JSONResponse(await server.call(server.service.discovery))


ROUTES = [
    Route("/api/training/datasets", upload_dataset, methods=["POST"]),
    Route("/api/training/datasets", list_datasets, methods=["GET"]),
    Route("/api/training/jobs", submit_job, methods=["POST"]),
    Route("/api/training/jobs", list_jobs, methods=["GET"]),
    Route("/api/training/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/api/training/jobs/{job_id}/pause", pause_job, methods=["POST"]),
    Route("/api/training/jobs/{job_id}/resume", resume_job, methods=["POST"]),
    Route("/api/training/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/training/jobs/{job_id}/checkpoints", list_job_checkpoints, methods=["GET"]),
    Route("/api/training/jobs/{job_id}/stacks", job_stacks, methods=["GET"]),
    Route("/api/training/jobs/{job_id}/download/model", download_model, methods=["GET"]),
    Route("/api/training/jobs/{job_id}/download/checkpoints/{name:path}", download_checkpoint, methods=["GET"]),
    Route("/api/training/sd", service_discovery, methods=["GET"]),
    Route("/api/internal/jobs/{job_id}/endpoints", register_endpoint, methods=["POST"]),
    Route("/api/internal/jobs/{job_id}/endpoints", withdraw_endpoint, methods=["DELETE"]),
]


def build_component(settings: ServerSettings) -> Component:
    """The job server as a component of an app (trainmetrics.edge.build_app)."""
    server = JobServer(settings)
    return Component(name="jobs", routes=ROUTES, lifespan=server.lifespan, registry=server.registry,
                     health=server.health, extra={"server": server})
