"""The job server: upload datasets, submit jobs, pause/resume/cancel them, list and download checkpoints.

Starlette, one route table; state in SQLite (trainer/jobstore.py); processes in trainer/supervisor.py.
Errors are JSON: {"error": {"code", "message"}}. With a tokens file every request needs a bearer token
and each owner sees only their own datasets and jobs (another owner's job answers 404).
"""

import asyncio
import contextlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from trainer.checkpoint import CHECKPOINT_PATTERN, list_checkpoints
from trainer.config import BUILTIN_DATASETS, MODELS, TrainConfig
from trainer.jobstore import FINAL_STATES, JOB_STATES, STOP_VERBS, DatasetRecord, JobRecord, JobStore
from trainer.supervisor import Supervisor
from trainmetrics.names import JOB_ID_PATTERN, validate_job_id

log = logging.getLogger("trainmetrics.server")

DATASET_FORMATS = {".csv": "csv", ".npz": "npz"}
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# An uploaded NPZ may inflate to this many times the upload limit, no more (zip bombs).
NPZ_INFLATION_LIMIT = 4
# The body is the file itself; a multipart form or JSON wrapping is a client mistake worth naming. (curl
# --data-binary labels a raw file application/x-www-form-urlencoded, so that type is accepted.)
REFUSED_UPLOAD_TYPES = ("multipart/form-data", "application/json")
TICK_SECONDS = 0.2
SPEC_DEFAULTS = {"model": "mlp", "epochs": 3, "batch_size": 64, "lr": 1e-3, "device": "auto", "seed": 0,
                 "log_every": 50, "checkpoint_every": 0, "target": "label", "nproc": 1}
MAX_NPROC = 64


class ApiError(Exception):
    """An error answer: HTTP status, a stable code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_json(status: int, code: str, message: str) -> JSONResponse:
    """The one error shape."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@dataclass
class ServerSettings:
    """What `trainmetrics server` was started with."""

    data_dir: Path
    targets_dir: Path | None = None
    job_dir: Path | None = None
    tokens: dict[str, str] | None = None       # bearer token → owner; None: no auth, owner "default"
    max_concurrent: int = 1
    max_upload_bytes: int = 256 * 1024 * 1024
    linger_timeout: float = 15.0


def load_tokens(path: Path) -> dict[str, str]:
    """A tokens file: one `TOKEN OWNER` per line, `#` comments. Raises ValueError on a bad line."""
    tokens = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) < 16:
            raise ValueError(f"{path}: line {number}: expected 'TOKEN OWNER' with a token of 16+ characters")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


class JobServer:
    """The routes' shared state: settings, store and supervisor."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        (self.data_dir / "datasets").mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.data_dir / "trainmetrics.db")
        self.supervisor = Supervisor(self.store, self.data_dir, settings.targets_dir, settings.job_dir,
                                     settings.max_concurrent, settings.linger_timeout)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(QueuedJobsCollector(self.store))
        self.extra_registries: list[CollectorRegistry] = []      # the analytics' request metrics

    # ----- helpers -----------------------------------------------------------------------------------
    def owner(self, request: Request) -> str:
        """The caller's owner name (from the bearer token), or 'default' without auth."""
        if self.settings.tokens is None:
            return "default"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer":
            for known, owner in self.settings.tokens.items():
                if hmac.compare_digest(known, token.strip()):
                    return owner
        raise ApiError(401, "unauthorized", "missing or unknown bearer token")

    def job_for(self, request: Request) -> JobRecord:
        """The job named in the path, if the caller may see it (404 otherwise, never 403)."""
        job_id = request.path_params["job_id"]
        try:
            validate_job_id(job_id)
        except ValueError as error:
            raise ApiError(400, "bad_request", f"job_id: {error}") from None
        job = self.store.get_job(job_id, self.owner(request))
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return job

    # ----- datasets ----------------------------------------------------------------------------------
    async def upload_dataset(self, request: Request) -> JSONResponse:
        """POST /api/training/datasets?name=FILE.csv|.npz with the file as the raw body (streamed to disk)."""
        owner = self.owner(request)
        name = request.query_params.get("name", "")
        if not DATASET_NAME.fullmatch(name) or Path(name).suffix.lower() not in DATASET_FORMATS:
            raise ApiError(400, "bad_request", "name: give the file name, ending in .csv or .npz "
                                               "(letters, digits, '.', '_', '-')")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in REFUSED_UPLOAD_TYPES:
            raise ApiError(415, "unsupported_media_type", f"content-type {content_type}: send the file itself as "
                                                          "the request body (e.g. curl --data-binary @FILE)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_upload_bytes:
            raise ApiError(413, "too_large", f"upload exceeds {self.settings.max_upload_bytes} bytes")
        dataset_id = f"ds-{secrets.token_hex(6)}"
        final_path = self.data_dir / "datasets" / f"{dataset_id}{Path(name).suffix.lower()}"
        began = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(dir=final_path.parent, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.settings.max_upload_bytes:
                        raise ApiError(413, "too_large", f"upload exceeds {self.settings.max_upload_bytes} bytes")
                    handle.write(chunk)
            if size == 0:
                raise ApiError(400, "bad_request", "empty upload")
            rows, features = await asyncio.to_thread(inspect_dataset, Path(tmp_name), DATASET_FORMATS[final_path.suffix],
                                                     NPZ_INFLATION_LIMIT * self.settings.max_upload_bytes)
            os.replace(tmp_name, final_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        record = DatasetRecord(id=dataset_id, owner=owner, name=name, path=str(final_path),
                               format=DATASET_FORMATS[final_path.suffix], rows=rows, features=features,
                               size_bytes=size, upload_seconds=time.monotonic() - began, created=time.time())
        self.store.add_dataset(record)
        return JSONResponse(record.public(), status_code=201)

    async def list_datasets(self, request: Request) -> JSONResponse:
        """GET /api/training/datasets."""
        return JSONResponse({"datasets": [d.public() for d in self.store.list_datasets(self.owner(request))]})

    # ----- jobs --------------------------------------------------------------------------------------
    async def submit_job(self, request: Request) -> JSONResponse:
        """POST /api/training/jobs with a JSON spec → 201 {job_id, state}."""
        owner = self.owner(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "body: expected a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body: expected a JSON object")
        spec, job_id, name = self.validate_spec(body, owner)
        job = JobRecord(id=job_id, owner=owner, name=name, spec=spec, state="queued")
        if not self.store.add_job(job):
            raise ApiError(409, "conflict", f"job_id: {job_id!r} exists")
        self.supervisor.tick()
        return JSONResponse(self.store.get_job(job_id).public(), status_code=201)

    def validate_spec(self, body: dict, owner: str) -> tuple[dict, str, str]:
        """Check a submitted spec; returns (spec, job_id, name) or raises a 400 naming the field."""
        allowed = set(SPEC_DEFAULTS) | {"dataset", "name", "job_id"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, "bad_request", f"{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
        spec = {**SPEC_DEFAULTS, **{k: v for k, v in body.items() if k in SPEC_DEFAULTS}}
        types = {"model": str, "device": str, "target": str, "epochs": int, "batch_size": int, "seed": int,
                 "log_every": int, "checkpoint_every": int, "lr": (int, float), "nproc": int}
        for field_name, expected in types.items():
            if not isinstance(spec[field_name], expected) or isinstance(spec[field_name], bool):
                raise ApiError(400, "bad_request", f"{field_name}: wrong type")
        if not 1 <= spec["nproc"] <= MAX_NPROC:
            raise ApiError(400, "bad_request", f"nproc: processes (torchrun ranks) for the job, 1..{MAX_NPROC}")
        if spec["model"] not in MODELS:
            raise ApiError(400, "bad_request", f"model: one of {', '.join(MODELS)}")
        dataset = body.get("dataset", "blobs")
        if not isinstance(dataset, str):
            raise ApiError(400, "bad_request", "dataset: a built-in name or a dataset id")
        if dataset in BUILTIN_DATASETS:
            spec["dataset"], spec["dataset_path"], spec["upload_seconds"] = dataset, dataset, None
        else:
            record = self.store.get_dataset(dataset, owner)
            if record is None:
                raise ApiError(400, "bad_request", f"dataset: no dataset {dataset!r} (built-ins: "
                                                   f"{', '.join(BUILTIN_DATASETS)})")
            spec["dataset"], spec["dataset_path"], spec["upload_seconds"] = dataset, record.path, record.upload_seconds
        job_id = body["job_id"] if "job_id" in body else \
            f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        if not isinstance(job_id, str):
            raise ApiError(400, "bad_request", "job_id: a string")
        try:
            validate_job_id(job_id)
            TrainConfig(job_id=job_id, model=spec["model"], epochs=spec["epochs"], batch_size=spec["batch_size"],
                        lr=float(spec["lr"]), device=spec["device"], log_every=spec["log_every"],
                        checkpoint_every=spec["checkpoint_every"]).check()
        except ValueError as error:
            raise ApiError(400, "bad_request", str(error).lstrip("-")) from None
        name = body.get("name") or job_id
        if not isinstance(name, str) or len(name) > 200:
            raise ApiError(400, "bad_request", "name: a string of at most 200 characters")
        return spec, job_id, name

    async def list_jobs(self, request: Request) -> JSONResponse:
        """GET /api/training/jobs?state=... (the server's own jobs)."""
        owner = self.owner(request)
        unknown = sorted(set(request.query_params) - {"state"})
        if unknown:
            raise ApiError(400, "bad_request", f"{unknown[0]}: unknown parameter (allowed: state)")
        state = request.query_params.get("state")
        if state is not None and state not in JOB_STATES:
            raise ApiError(400, "bad_request", f"state: one of {', '.join(JOB_STATES)}")
        jobs = self.store.list_jobs(owner, (state,) if state else None)
        return JSONResponse({"jobs": [job.public() for job in jobs]})

    async def get_job(self, request: Request) -> JSONResponse:
        """GET /api/training/jobs/{job_id}."""
        job = self.job_for(request)
        body = job.public()
        body["checkpoints"] = len(list_checkpoints(self.supervisor.checkpoint_dir(job.id)))
        return JSONResponse(body)

    async def pause_job(self, request: Request) -> JSONResponse:
        """POST .../pause: running → paused, after a checkpoint at the next step boundary."""
        return await self._stop(self.job_for(request), "paused")

    async def cancel_job(self, request: Request) -> JSONResponse:
        """POST .../cancel: queued or paused → cancelled at once; running → cancelled at the next step."""
        job = self.job_for(request)
        if job.state in ("queued", "paused"):
            self.store.update_job(job.id, state="cancelled", ended=time.time(), resume=False)
            return JSONResponse(self.store.get_job(job.id).public())
        return await self._stop(job, "cancelled")

    async def _stop(self, job: JobRecord, outcome: str) -> JSONResponse:
        if job.state != "running" or not self.supervisor.request_stop(job.id, outcome):
            raise ApiError(409, "conflict", f"job {job.id} is {job.state}: cannot {STOP_VERBS[outcome]} it")
        deadline = time.monotonic() + 120
        while self.supervisor.is_active(job.id) and time.monotonic() < deadline:
            await asyncio.sleep(TICK_SECONDS)
        return JSONResponse(self.store.get_job(job.id).public())

    async def resume_job(self, request: Request) -> JSONResponse:
        """POST .../resume: paused (or failed with a checkpoint) → queued, continuing from its checkpoint."""
        job = self.job_for(request)
        has_checkpoint = bool(list_checkpoints(self.supervisor.checkpoint_dir(job.id)))
        if not (job.state == "paused" or (job.state == "failed" and has_checkpoint)):
            raise ApiError(409, "conflict", f"job {job.id} is {job.state}: only paused jobs, or failed ones with "
                                            "a checkpoint, resume")
        self.store.update_job(job.id, state="queued", resume=True, ended=None, error=None)
        self.supervisor.tick()
        return JSONResponse(self.store.get_job(job.id).public())

    # ----- checkpoints and downloads -----------------------------------------------------------------
    async def list_job_checkpoints(self, request: Request) -> JSONResponse:
        """GET .../checkpoints."""
        job = self.job_for(request)
        found = [{"name": c.path.name, "step": c.step, "size_bytes": c.path.stat().st_size,
                  "modified": c.path.stat().st_mtime}
                 for c in list_checkpoints(self.supervisor.checkpoint_dir(job.id))]
        return JSONResponse({"job_id": job.id, "checkpoints": found})

    async def download_model(self, request: Request) -> Response:
        """GET .../download/model: the final weights (a state dict, torch.load(weights_only=True))."""
        job = self.job_for(request)
        path = self.supervisor.final_model(job.id)
        if not path.is_file():
            raise ApiError(404, "not_found", f"job {job.id} has no final model (state {job.state})")
        return FileResponse(path, filename=f"{job.id}-model.pt", media_type="application/octet-stream")

    async def download_checkpoint(self, request: Request) -> Response:
        """GET .../download/checkpoints/{name}: only names like step-000000123.pt inside the job's dir."""
        job = self.job_for(request)
        name = request.path_params["name"]
        if not CHECKPOINT_PATTERN.fullmatch(name):
            raise ApiError(400, "bad_request", "name: a checkpoint name like step-000000123.pt")
        directory = self.supervisor.checkpoint_dir(job.id).resolve()
        path = directory / name
        if path.is_symlink() or not path.is_file() or path.resolve().parent != directory:
            raise ApiError(404, "not_found", f"job {job.id} has no checkpoint {name}")
        return FileResponse(path, filename=f"{job.id}-{name}", media_type="application/octet-stream")

    # ----- service -----------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> JSONResponse:
        """GET /healthz."""
        return JSONResponse({"status": "ok", "running_jobs": self.supervisor.running_count()})

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: queued and paused jobs' state (their own process publishes while they run), and the
        analytics' request metrics when it shares this server."""
        body = b"".join(generate_latest(registry) for registry in (self.registry, *self.extra_registries))
        return Response(body, media_type="text/plain; version=0.0.4")

    def routes(self) -> list[Route]:
        """The job API's routes (the analytics routes join them in `trainmetrics server`)."""
        wrap = self.handle_errors
        return [
            Route("/api/training/datasets", wrap(self.upload_dataset), methods=["POST"]),
            Route("/api/training/datasets", wrap(self.list_datasets), methods=["GET"]),
            Route("/api/training/jobs", wrap(self.submit_job), methods=["POST"]),
            Route("/api/training/jobs/{job_id}", wrap(self.get_job), methods=["GET"]),
            Route("/api/training/jobs/{job_id}/pause", wrap(self.pause_job), methods=["POST"]),
            Route("/api/training/jobs/{job_id}/resume", wrap(self.resume_job), methods=["POST"]),
            Route("/api/training/jobs/{job_id}/cancel", wrap(self.cancel_job), methods=["POST"]),
            Route("/api/training/jobs/{job_id}/checkpoints", wrap(self.list_job_checkpoints), methods=["GET"]),
            Route("/api/training/jobs/{job_id}/download/model", wrap(self.download_model), methods=["GET"]),
            Route("/api/training/jobs/{job_id}/download/checkpoints/{name:path}", wrap(self.download_checkpoint),
                  methods=["GET"]),
        ]

    @staticmethod
    def handle_errors(endpoint):
        """Map ApiError (and anything unexpected) to the JSON error shape."""
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ApiError as error:
                return error_json(error.status, error.code, error.message)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return error_json(500, "internal", "internal error")
        handle.__name__ = endpoint.__name__
        handle.__doc__ = endpoint.__doc__
        return handle

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Recover jobs from the store, supervise them while serving, pause them on shutdown."""
        self.supervisor.recover()
        task = asyncio.create_task(self._supervise())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(self.supervisor.shutdown)
            self.store.close()

    async def _supervise(self) -> None:
        while True:
            try:
                self.supervisor.tick()
            except Exception:
                log.exception("supervisor tick failed")
            await asyncio.sleep(TICK_SECONDS)


class QueuedJobsCollector:
    """trainer_job_state for jobs without a process (queued, paused), so Prometheus sees every state."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("trainer_job_state", "1 for the job's current lifecycle state, 0 for the others.",
                                   labels=["job_id", "state"])
        for job in self.store.list_jobs(states=("queued", "paused")):
            for state in ("queued", "running", "paused", *FINAL_STATES):
                family.add_metric([job.id, state], 1 if state == job.state else 0)
        yield family


def inspect_dataset(path: Path, fmt: str, max_uncompressed_bytes: int) -> tuple[int, int]:
    """(rows, features) of an uploaded file, or ApiError 400 naming what is wrong."""
    from trainer.data import DatasetError, read_csv, read_npz

    try:
        x, _ = read_csv(path) if fmt == "csv" else read_npz(path, max_uncompressed_bytes)
    except DatasetError as error:
        raise ApiError(400, "bad_dataset", str(error).replace(str(path), "upload")) from None
    features = 1
    for size in x.shape[1:]:
        features *= size
    return int(x.shape[0]), int(features)


class OwnerScopedAnalytics:
    """The analytics routes behind the server's tokens (the prom-label-proxy idea, done at our edge).

    Without tokens it passes everything through. With tokens: the caller must authenticate; a job's
    analytics and a comparison answer 404 for a job the caller does not own (as the job API does); the
    summary is restricted to the caller's jobs by forcing the `owner` parameter."""

    def __init__(self, app, server: "JobServer"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.server.settings.tokens is None:
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            owner = self.server.owner(request)
            scope = self._scoped(scope, request, owner)
        except ApiError as error:
            return await error_json(error.status, error.code, error.message)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _scoped(self, scope: dict, request: Request, owner: str) -> dict:
        path = request.url.path
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "owner"]
        if path == "/api/training/analytics/summary":
            return {**scope, "query_string": urlencode([*params, ("owner", owner)]).encode()}
        if path == "/api/training/analytics/compare":
            job_ids = [j.strip() for j in request.query_params.get("job_ids", "").split(",") if j.strip()]
        elif path.endswith("/analytics") and path.startswith("/api/training/"):
            job_ids = [path[len("/api/training/"):-len("/analytics")]]
        else:
            return scope
        for job_id in job_ids:
            if JOB_ID_PATTERN.fullmatch(job_id) and self.server.store.get_job(job_id, owner) is None:
                raise ApiError(404, "not_found", f"no job {job_id!r}")
        return scope


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class RejectControlCharacters:
    """400 JSON for a path holding a control character (a line feed in a job id, say): no route could use
    it, and the router would otherwise answer its own plain-text 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and CONTROL_CHARACTERS.search(scope.get("path", "")):
            response = error_json(400, "bad_request", "path: control characters are not allowed")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """The router's own 404 and 405 in the one error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_json(error.status_code, code, str(error.detail))


def build_app(settings: ServerSettings, analytics_app: Starlette | None = None) -> Starlette:
    """The job server app; the analytics app, when given, shares its base URL (and its tokens)."""
    server = JobServer(settings)
    # The server's own /healthz (alive and supervising, whether Prometheus answers or not) and its own job
    # list (the jobs it was given, queued ones included) shadow the analytics' versions of those paths;
    # `trainmetrics analytics` alone serves the Prometheus-wide list.
    routes = server.routes() + [Route("/api/training/jobs", server.handle_errors(server.list_jobs), methods=["GET"]),
                                Route("/metrics", server.metrics, methods=["GET"]),
                                Route("/healthz", server.healthz, methods=["GET"])]
    if analytics_app is not None:   # every other path falls through to the analytics
        server.extra_registries.append(analytics_app.state.registry)
        routes.append(Mount("", app=OwnerScopedAnalytics(analytics_app, server)))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with server.lifespan(app):
            if analytics_app is None:
                yield
            else:   # the mounted app's lifespan does not run by itself: its state (Prometheus client) is ours
                async with analytics_app.router.lifespan_context(analytics_app) as state:
                    yield state

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(RejectControlCharacters)],
                    exception_handlers={HTTPException: http_error})
    app.state.job_server = server
    return app
