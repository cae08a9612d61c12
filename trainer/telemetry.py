"""OpenTelemetry wiring in one place: MeterProvider, Prometheus reader, histogram views, /metrics server.

Each JobMetrics gets its own MeterProvider and its own prometheus_client CollectorRegistry (no global
state), so several jobs can live in one process (tests, notebooks) without sharing series.
"""

import logging
import os
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, make_wsgi_app

from trainer import instruments
from trainmetrics.webconfig import WebConfig

log = logging.getLogger("trainmetrics.trainer")

# Resource attributes copied onto every series as labels.
SERIES_LABELS = ("job_id", "rank")


def histogram_views() -> list[View]:
    """Bucket boundaries that suit training steps instead of the SDK's millisecond-shaped default."""
    duration = ExplicitBucketHistogramAggregation(boundaries=instruments.DURATION_BUCKETS)
    checkpoint = ExplicitBucketHistogramAggregation(boundaries=instruments.CHECKPOINT_BUCKETS)
    return [
        View(instrument_name=instruments.STEP_DURATION.name, aggregation=duration),
        View(instrument_name=instruments.DATA_WAIT.name, aggregation=duration),
        View(instrument_name=instruments.CHECKPOINT_DURATION.name, aggregation=checkpoint),
    ]


OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_readers() -> list[MetricReader]:
    """An OTLP/HTTP push reader when the standard OTEL_EXPORTER_OTLP_* variables ask for one, else none.

    The exporter reads its endpoint, headers and timeout from those variables, and the periodic reader
    its interval from OTEL_METRIC_EXPORT_INTERVAL; trainmetrics adds nothing of its own."""
    if not any(os.environ.get(name) for name in OTLP_ENDPOINT_VARIABLES):
        return []
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_* is set but opentelemetry-exporter-otlp-proto-http is not installed "
                    "(pip install 'trainmetrics[otlp]'); pushing nothing")
        return []
    return [PeriodicExportingMetricReader(OTLPMetricExporter())]


def build_meter_provider(resource_attributes: dict[str, str]) -> tuple[MeterProvider, CollectorRegistry]:
    """A MeterProvider exporting through a Prometheus reader into a registry of its own (and over OTLP
    when configured)."""
    registry = CollectorRegistry(auto_describe=False)
    reader = PrometheusMetricReader(
        disable_target_info=True,          # trainer_job_info carries the job's metadata
        scope_info_enabled=False,          # no otel_scope_* labels on every series
        resource_attribute_filter=lambda key: key in SERIES_LABELS,
        registry=registry,
    )
    resource = Resource.create({"service.name": "trainmetrics-trainer", **resource_attributes})
    provider = MeterProvider(metric_readers=[reader, *otlp_readers()], resource=resource, views=histogram_views())
    return provider, registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        """Scrapes every 250 ms would flood the job's log."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """Serves /metrics from a registry and remembers when the last complete scrape began.

    The job's linger after its end waits for a scrape that began after the final state was set, so
    a short job's end reaches Prometheus (see JobMetrics.close).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, web_config: WebConfig | None = None):
        self._app = make_wsgi_app(registry)
        self._scraped = threading.Condition()
        self.last_scrape_started = float("-inf")
        self.web_config = web_config or WebConfig()
        self._server = make_server(host, port, self._track_scrapes, server_class=_ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self.web_config.secure(self._server)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="trainmetrics-metrics",
                                        daemon=True)
        self._thread.start()

    def _track_scrapes(self, environ, start_response):
        if not self.web_config.authorized(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="trainmetrics"'),
                                                ("Content-Type", "text/plain; charset=utf-8")])
            return [b"basic authentication required\n"]
        began = time.monotonic()
        body = self._app(environ, start_response)
        if environ.get("PATH_INFO", "/") in ("/", "/metrics"):
            with self._scraped:
                self.last_scrape_started = max(self.last_scrape_started, began)
                self._scraped.notify_all()
        return body

    def wait_for_scrape_after(self, moment: float, timeout: float) -> bool:
        """Block until a scrape that began after `moment` (monotonic) completed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._scraped:
            while self.last_scrape_started <= moment:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._scraped.wait(remaining)
        return True

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
