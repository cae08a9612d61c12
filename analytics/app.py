"""The analytics service: settings, routes and the lifespan that owns the shared Prometheus client, as a
component of an app behind the edge (trainmetrics.edge: the error shape, /healthz, /metrics, auth)."""

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from trainmetrics.analytics import endpoints, shapes
from trainmetrics.analytics import queries as q
from trainmetrics.analytics.cache import AnalyticsCache, settled_job_analytics
from trainmetrics.analytics.prometheus import ClientMetrics, PrometheusClient, partial_answers
from trainmetrics.command import DEFAULT_LOOKBACK_DAYS, DEFAULT_MAX_ANSWER_BYTES
from trainmetrics.edge import ApiError, Component, build_app, error_response
from trainmetrics.hangs import HangFeed, HungJobs
from trainmetrics.reports import ReportArchive
from trainmetrics.webconfig import WebConfig

log = logging.getLogger("trainmetrics.analytics")


def everyone(request: Request) -> str | None:
    """The default owner scope: no owners, every job visible."""
    return None


@dataclass
class Settings:
    """How the service reaches Prometheus, how long it waits, and whose jobs a request may see."""

    prometheus_url: str = "http://127.0.0.1:9090"
    lookback_seconds: float = DEFAULT_LOOKBACK_DAYS * 86400     # how far back a job is looked up by id
    prometheus_deadline: float = 8.0              # per request to Prometheus
    service_deadline: float = 10.0                # per request to this service; above the client's
    # Requests in flight to Prometheus. Each runs on one Prometheus core; more than its cores only queue
    # there, while the HTTP client's own bookkeeping grows with every connection (8 cost a 5-job comparison
    # ~20 ms more CPU than 4, on a 2-core host).
    max_concurrency: int = 4
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES   # the largest answer from Prometheus read
    cache_entries: int = 1024                     # finished jobs' analytics kept (0: no cache)
    recorded_series: bool = True                  # fleet reads analytics.rules.yml's series where they cover it
    # How the backend is asked when it wants proof (analytics/backend_auth.py; basic auth: the URL's user part).
    prometheus_auth: httpx.Auth | None = None               # --prometheus-bearer-token-file
    prometheus_ca: ssl.SSLContext | None = None             # --prometheus-ca-file (None: the usual CAs)
    prometheus_headers: dict[str, str] = field(default_factory=dict)    # --prometheus-header
    transport: httpx.AsyncBaseTransport | None = None   # tests inject httpx.MockTransport here
    # The owner whose jobs a request may see (None: all). The analytics check it against each job's own
    # `owner` label in Prometheus on every route; trainmetrics.service passes the job server's token owner.
    owner_scope: Callable[[Request], str | None] = everyone
    # Stored reports of jobs Prometheus no longer holds (inside `trainmetrics server`; trainmetrics.reports).
    archive: ReportArchive | None = None
    # The jobs TrainerHang fires for, told to the job server (inside `trainmetrics server`; trainmetrics.hangs).
    hangs: HangFeed | None = None

    @property
    def lookback(self) -> float:
        """Alias used by the endpoints."""
        return self.lookback_seconds


class RequestMetrics:
    """The service's own request metrics, in an explicit registry."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("analytics_http_requests_total", "HTTP requests by route and status code.",
                                ["route", "code"], registry=registry)
        self.duration = Histogram("analytics_http_request_duration_seconds", "HTTP request time by route.",
                                  ["route"], registry=registry,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


def instrumented(route: str, endpoint, metrics: RequestMetrics, deadline: float):
    """The endpoint under the service deadline, counted and timed; its errors leave through the edge's shape."""
    async def handle(request: Request):
        began = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                response = await endpoint(request)
        except ApiError as error:
            response = error_response(error.status, error.code, error.message, error.headers)
        except TimeoutError:
            response = error_response(504, "timeout", "the analytics service ran out of time answering this request")
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.duration.labels(route).observe(time.perf_counter() - began)
        return response

    handle.__name__ = endpoint.__name__
    handle.__doc__ = endpoint.__doc__
    return handle


ROUTES = (
    ("/api/training/analytics/summary", endpoints.summary),
    ("/api/training/analytics/compare", endpoints.compare),
    ("/api/training/analytics/jobs", endpoints.jobs),
    ("/api/training/{job_id}/analytics", endpoints.job_analytics),
    ("/openapi.json", endpoints.openapi),
)


def build_component(settings: Settings) -> Component:
    """The analytics as a component of an app (trainmetrics.edge.build_app)."""
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    client_metrics = ClientMetrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan():
        client = PrometheusClient(settings.prometheus_url, deadline=settings.prometheus_deadline,
                                  max_concurrency=settings.max_concurrency, transport=settings.transport,
                                  metrics=client_metrics, max_answer_bytes=settings.max_answer_bytes,
                                  auth=settings.prometheus_auth, ca=settings.prometheus_ca,
                                  headers=settings.prometheus_headers)
        cache = AnalyticsCache(settings.cache_entries)
        if settings.archive is not None:
            async def compute(job_id: str, settled: bool = True, owner: str | None = None) -> dict:
                return shapes.plain(await settled_job_analytics(client, cache, job_id, settings.lookback, settled,
                                                                owner))
            settings.archive.compute = compute
        if settings.hangs is not None:
            async def hung_jobs() -> HungJobs:
                with partial_answers() as partial:
                    samples = await client.query(q.HUNG_JOBS)
                return HungJobs(frozenset(sample["metric"].get("job_id", "") for sample in samples) - {""},
                                whole=not partial)
            settings.hangs.hung_jobs = hung_jobs
        try:
            yield {"prometheus": client, "cache": cache, "analytics_settings": settings}
        finally:
            if settings.archive is not None:
                settings.archive.compute = None
            if settings.hangs is not None:
                settings.hangs.hung_jobs = None
            await client.aclose()

    async def health(request: Request) -> dict:
        """Prometheus answers /-/ready."""
        await request.state.prometheus.ready()
        return {"prometheus": request.state.prometheus.shown_url}

    routes = [Route(path, instrumented(path, endpoint, metrics, settings.service_deadline), methods=["GET"])
              for path, endpoint in ROUTES]
    return Component(name="prometheus", routes=routes, lifespan=lifespan, registry=registry, health=health)


def create_app(settings: Settings | None = None, web_config: WebConfig | None = None) -> Starlette:
    """The analytics service on its own (`trainmetrics analytics`)."""
    return build_app([build_component(settings or Settings())], web_config=web_config)
