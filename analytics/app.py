"""The analytics application: settings, the routes list and the lifespan that owns the shared Prometheus
client. Errors map to JSON once, here."""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from analytics import endpoints
from analytics.prometheus import ClientMetrics, PrometheusClient, PrometheusError
from analytics.reports import AnalyticsCache, JobNotFound

log = logging.getLogger("trainmetrics.analytics")


@dataclass
class Settings:
    """How the service reaches Prometheus and how long it waits."""

    prometheus_url: str = "http://127.0.0.1:9090"
    lookback_seconds: float = 30 * 86400          # how far back a job is looked up by id
    prometheus_deadline: float = 8.0              # per request to Prometheus
    service_deadline: float = 10.0                # per request to this service; above the client's
    # Requests in flight to Prometheus. Each runs on one Prometheus core; more than its cores only queue
    # there, while the HTTP client's own bookkeeping grows with every connection (8 cost a 5-job comparison
    # ~20 ms more CPU than 4, on a 2-core host).
    max_concurrency: int = 4
    cache_entries: int = 1024                     # finished jobs' analytics kept (0: no cache)
    recorded_series: bool = True                  # fleet reads analytics.rules.yml's series where they cover it
    transport: httpx.AsyncBaseTransport | None = None   # tests inject httpx.MockTransport here

    @property
    def lookback(self) -> float:
        """Alias used by the endpoints."""
        return self.lookback_seconds


def error_body(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape: {"error": {"code", "message"}}."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


PROMETHEUS_CODES = {"unavailable": "prometheus_unavailable", "timeout": "prometheus_timeout",
                    "bad_answer": "prometheus_bad_answer"}


def error_response(error: Exception) -> JSONResponse:
    """Map an exception from an endpoint to its JSON answer."""
    if isinstance(error, endpoints.BadParameter):
        return error_body(400, "bad_request", str(error))
    if isinstance(error, JobNotFound):
        return error_body(404, "not_found", str(error))
    if isinstance(error, PrometheusError):
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return error_body(error.status_code, PROMETHEUS_CODES[error.kind], error.message, headers)
    if isinstance(error, TimeoutError):
        return error_body(504, "timeout", "the analytics service ran out of time answering this request")
    log.exception("unexpected error", exc_info=error)
    return error_body(500, "internal", f"internal error: {type(error).__name__}")


class RequestMetrics:
    """The service's own request metrics, in an explicit registry."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("analytics_http_requests_total", "HTTP requests by route and status code.",
                                ["route", "code"], registry=registry)
        self.duration = Histogram("analytics_http_request_duration_seconds", "HTTP request time by route.",
                                  ["route"], registry=registry,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


def instrumented(route: str, endpoint, metrics: RequestMetrics, deadline: float):
    """The endpoint under the service deadline, its errors mapped to JSON, counted and timed."""
    async def handle(request: Request):
        began = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                response = await endpoint(request)
        except Exception as error:   # every failure leaves as JSON
            response = error_response(error)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.duration.labels(route).observe(time.perf_counter() - began)
        return response

    handle.__name__ = endpoint.__name__
    handle.__doc__ = endpoint.__doc__
    return handle


ROUTES = (
    ("/api/training/analytics/summary", endpoints.summary),
    ("/api/training/analytics/compare", endpoints.compare),
    ("/api/training/jobs", endpoints.jobs),
    ("/api/training/{job_id}/analytics", endpoints.job_analytics),
    ("/healthz", endpoints.healthz),
    ("/metrics", endpoints.metrics),
    ("/openapi.json", endpoints.openapi),
)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own 404/405 in the one error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_body(error.status_code, code, str(error.detail), getattr(error, "headers", None))


def create_app(settings: Settings | None = None) -> Starlette:
    """The Starlette application for `settings`."""
    settings = settings or Settings()
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    client_metrics = ClientMetrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        client = PrometheusClient(settings.prometheus_url, deadline=settings.prometheus_deadline,
                                  max_concurrency=settings.max_concurrency, transport=settings.transport,
                                  metrics=client_metrics)
        try:
            yield {"prometheus": client, "cache": AnalyticsCache(settings.cache_entries)}
        finally:
            await client.aclose()

    routes = [Route(path, instrumented(path, endpoint, metrics, settings.service_deadline), methods=["GET"])
              for path, endpoint in ROUTES]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.settings = settings
    app.state.registry = registry
    return app
