"""The exporter: background sampling, a pre-rendered exposition snapshot, and the HTTP server for it.

Two sampler threads run the collectors: the fast loop every --sample-interval (cheap /proc reads, NVML
utilisation and memory, the gauges with peaks) and the slow loop every --slow-interval (process scans,
statvfs, slow NVML calls). After each fast pass the fast thread renders the exposition text, re-rendering
only the collectors whose data changed, and swaps in the new bytes. A scrape returns those bytes: it never
waits on /proc, psutil or NVML, so its latency is that of a small HTTP response.
"""

import logging
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporters.collectors.base import Collector, CollectorUnavailable
from trainmetrics.webconfig import WebConfig

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CollectorRunner:
    """The one wrapper around every collector: catches its failures and times its samples.

    A failing collector's series are dropped (no frozen values) and exporter_collector_success is 0
    until a sample succeeds again. Each failure is logged once when it starts (debug level when the
    source simply is not there, error level otherwise) and the recovery once when it ends.
    """

    def __init__(self, collector: Collector):
        self.collector = collector
        self.name = collector.name
        # Fixed keys: the fast thread reads them while the slow thread writes, so sizes never change.
        self.errors: dict[str, Exception | None] = {"fast": None, "slow": None, "render": None}
        self.durations: dict[str, float] = {"fast": 0.0, "slow": 0.0}
        self.generation = 0  # changes whenever a sample may have changed what collect() yields

    def sample(self, now: float) -> None:
        """Run the collector's fast-loop sample."""
        if self.collector.fast:
            self._run("fast", self.collector.sample, now)

    def sample_slow(self, now: float) -> None:
        """Run the collector's slow-loop sample."""
        if self.collector.slow:
            self._run("slow", self.collector.sample_slow, now)

    def _run(self, part: str, method, now: float) -> None:
        started = time.perf_counter()
        try:
            method(now)
            error = None
        except Exception as caught:  # isolation is the point: no collector may stop the others
            error = caught
        self.durations[part] = time.perf_counter() - started
        previous = self.errors.get(part)
        self.errors[part] = error
        self.generation += 1
        newly_broken = previous is None or (isinstance(previous, CollectorUnavailable)
                                            and not isinstance(error, CollectorUnavailable))
        if error is not None and newly_broken:
            if isinstance(error, CollectorUnavailable):
                log.debug("collector %s: unavailable: %s", self.name, error)
            else:
                log.error("collector %s failed: %s: %s", self.name, type(error).__name__, error)
        elif error is None and previous is not None:
            log.info("collector %s recovered", self.name)

    @property
    def sampled(self) -> bool:
        """True when the latest fast and slow samples succeeded."""
        return self.errors["fast"] is None and self.errors["slow"] is None

    @property
    def success(self) -> bool:
        """True when the latest samples succeeded and their series rendered."""
        return self.sampled and self.errors["render"] is None

    @property
    def duration(self) -> float:
        """Seconds the latest fast and slow samples took together."""
        return sum(self.durations.values())

    def collect(self) -> Iterable:
        """The collector's families, or nothing while its source fails."""
        if not self.sampled:
            return
        for family in self.collector.collect():
            if family.samples:
                yield family


class SelfMetrics:
    """exporter_collector_success{collector} and exporter_collector_duration_seconds{collector}."""

    def __init__(self, runners: list[CollectorRunner]):
        self.runners = runners

    def collect(self):
        success = GaugeMetricFamily("exporter_collector_success",
                                    "1 when the collector's latest sample succeeded, else 0.", labels=["collector"])
        duration = GaugeMetricFamily("exporter_collector_duration_seconds",
                                     "Seconds the collector's latest fast and slow samples took.",
                                     labels=["collector"])
        for runner in self.runners:
            success.add_metric([runner.name], 1 if runner.success else 0)
            duration.add_metric([runner.name], runner.duration)
        yield success
        yield duration


class Exporter:
    """Samples the collectors in the background and keeps the latest exposition text ready to serve."""

    def __init__(self, collectors: list[Collector], sample_interval: float = 0.1, slow_interval: float = 1.0,
                 clock=time.monotonic):
        if sample_interval <= 0 or slow_interval <= 0:
            raise ValueError("sample and slow intervals must be > 0")
        self.runners = [CollectorRunner(collector) for collector in collectors]
        self.sample_interval = sample_interval
        self.slow_interval = slow_interval
        self.clock = clock
        self.self_metrics = SelfMetrics(self.runners)
        # The same collectors as a standard registry, for callers that want prometheus_client's API.
        self.registry = CollectorRegistry(auto_describe=False)
        for runner in self.runners:
            self.registry.register(runner)
        self.registry.register(self.self_metrics)
        self._chunks: dict[str, tuple[int, bytes]] = {}
        self._snapshot = b""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def sample(self, now: float | None = None) -> None:
        """One fast pass over every collector."""
        now = self.clock() if now is None else now
        for runner in self.runners:
            runner.sample(now)

    def sample_slow(self, now: float | None = None) -> None:
        """One slow pass over every collector."""
        now = self.clock() if now is None else now
        for runner in self.runners:
            runner.sample_slow(now)

    def render(self) -> bytes:
        """Render the exposition text, reusing each collector's text while its data is unchanged."""
        chunks = []
        for runner in self.runners:
            cached = self._chunks.get(runner.name)
            if cached is not None and cached[0] == runner.generation:
                chunks.append(cached[1])
                continue
            generation = runner.generation
            try:
                text = generate_latest(runner)
            except Exception as error:  # a bug in collect(): drop its series, keep the scrape
                log.error("collector %s failed to render: %s: %s", runner.name, type(error).__name__, error)
                runner.errors["render"] = error
                text = b""
            else:
                runner.errors["render"] = None
            self._chunks[runner.name] = (generation, text)
            chunks.append(text)
        chunks.append(generate_latest(self.self_metrics))
        self._snapshot = b"".join(chunks)
        return self._snapshot

    def snapshot(self) -> bytes:
        """The latest rendered exposition text (what /metrics serves)."""
        return self._snapshot

    def start(self) -> "Exporter":
        """Take a first full sample, render it, and start the fast and slow sampler threads."""
        self.sample()  # first: it initialises sources (NVML) that the slow pass reads
        self.sample_slow()
        self.render()
        for name, loop in (("fast", self._fast_loop), ("slow", self._slow_loop)):
            thread = threading.Thread(target=loop, name=f"exporter-{name}-sampler", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _every(self, interval: float):
        """Yield at each multiple of interval (skipping missed ones) until stopped."""
        next_at = self.clock() + interval
        while not self._stop.wait(max(0.0, next_at - self.clock())):
            now = self.clock()
            yield now
            next_at += interval
            if next_at <= now:  # overran: skip the missed ticks instead of bursting to catch up
                next_at = now + interval

    def _fast_loop(self) -> None:
        for now in self._every(self.sample_interval):
            self.sample(now)
            self.render()

    def _slow_loop(self) -> None:
        for now in self._every(self.slow_interval):
            self.sample_slow(now)

    def stop(self) -> None:
        """Stop the sampler threads and release the collectors' sources."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        for runner in self.runners:
            try:
                runner.collector.close()
            except Exception as error:
                log.debug("closing collector %s: %s", runner.name, error)


class SnapshotHandler(BaseHTTPRequestHandler):
    """Serves /metrics from the exporter's snapshot; keep-alive so a scraper reuses its connection."""

    protocol_version = "HTTP/1.1"
    server: "MetricsServer"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = self.path.partition("?")[0]
        if not self.server.web_config.authorized(self.headers.get("Authorization")):
            body = b"basic authentication required\n"
            self.wfile.write(b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="trainmetrics"\r\n'
                             b"Content-Type: text/plain; charset=utf-8\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + (body if send_body else b""))
            return
        if path == "/metrics":
            status, content_type, body = "200 OK", CONTENT_TYPE, self.server.exporter.snapshot()
        elif path == "/":
            status, content_type = "200 OK", "text/html; charset=utf-8"
            body = b'<html><body><h1>trainmetrics exporter</h1><a href="/metrics">/metrics</a></body></html>\n'
        else:
            status, content_type, body = "404 Not Found", "text/plain; charset=utf-8", b"not found\n"
        # One write for head and body: every extra socket call is one more wait for the GIL while the
        # sampler thread holds it, and the tail of the scrape latency is made of those waits.
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.wfile.write(head + body if send_body else head)

    def log_message(self, format: str, *args) -> None:
        """No access log: a scrape every 250 ms would flood it."""


class MetricsServer(ThreadingHTTPServer):
    """An HTTP server for one exporter; binding happens in the constructor (OSError when the port is taken)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], exporter: Exporter, web_config: WebConfig | None = None):
        self.exporter = exporter
        self.web_config = web_config or WebConfig()
        super().__init__(address, SnapshotHandler)
        self.web_config.secure(self)

    def serve_in_background(self, poll_interval: float = 0.5) -> threading.Thread:
        """Serve until shutdown() from a daemon thread (shutdown() takes up to poll_interval)."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": poll_interval},
                                  name="exporter-http", daemon=True)
        thread.start()
        return thread
