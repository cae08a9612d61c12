"""Where a job's series go: the job's /metrics endpoint (its text written straight from the job's state by
series.py), OTLP push through the OpenTelemetry SDK when configured, the job's file_sd target and job-mapping
files, and the scrapers that read it. JobMetrics (metrics.py) records; this module publishes.

Each Publication has its own series and MeterProvider (no global state), so several jobs can live in one process
(tests, notebooks) without sharing series.
"""

import contextvars
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

from trainmetrics.contract import RUN_LABEL
from trainmetrics.jobfiles import claim, unclaim
from trainmetrics.jobmap import JobMapping, write_job_mapping
from trainmetrics.metrics_http import MetricsHTTPServer, Scrape
from trainmetrics.trainer import instruments
from trainmetrics.trainer.discovery import remove_quietly, write_target_file
from trainmetrics.trainer.registration import Registration
from trainmetrics.trainer.series import JobSeries
from trainmetrics.webconfig import WebConfig

log = logging.getLogger("trainmetrics.trainer")

OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
OTLP_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
EXPORT_INTERVAL_VARIABLE = "OTEL_METRIC_EXPORT_INTERVAL"
DEFAULT_PUSH_INTERVAL_MILLIS = 60_000.0      # the SDK's default
# An OTLP push, the last one at the end of a job included, gets this long (the SDK: 10 s a request, retried,
# and 30 s for the last one); the last one follows a push under way when the job ended.
FINAL_PUSH_SECONDS = 5.0
# A scraper counts as active while it keeps to its own rhythm: seen within this many of its intervals, and at
# least MIN_ACTIVE_SECONDS; once its connection closed, MIN_ACTIVE_SECONDS alone (a scraper reconnecting
# shows up under a new connection and the old one fades).
ACTIVE_INTERVALS = 3
MIN_ACTIVE_SECONDS = 2.0
# Scrapers gone this long (and past their active window) are forgotten: a scraper that opens a connection per
# scrape (no keep-alive) shows up under a new name each time, 345,600 names a day at 250 ms.
FORGET_SECONDS = 60.0

# The scrape being rendered, for collection callbacks that show a scraper its own view (evaluations).
current_scrape: contextvars.ContextVar[Scrape | None] = contextvars.ContextVar("current_scrape", default=None)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


@dataclass
class Publish:
    """Where a job's series are published. The defaults serve /metrics on a free loopback port and announce
    the job where the environment says (TRAINMETRICS_TARGETS_DIR, TRAINMETRICS_JOB_DIR)."""

    listen: str | None = "127.0.0.1:0"          # None: no /metrics endpoint
    targets_dir: Path | None = field(default_factory=lambda: _env_path("TRAINMETRICS_TARGETS_DIR"))
    job_dir: Path | None = field(default_factory=lambda: _env_path("TRAINMETRICS_JOB_DIR"))
    gpus: Iterable[int | str] = ()               # the job's GPUs as the host's NVML knows them (indices, UUIDs)
    linger_timeout: float = 15.0                 # bound on the waits for the first and the final scrapes
    web_config: WebConfig | None = None
    register_url: str | None = None              # the job server's service discovery (registration.py)


def histogram_views() -> list[View]:
    """Bucket boundaries that suit training steps instead of the SDK's millisecond-shaped default."""
    duration = ExplicitBucketHistogramAggregation(boundaries=instruments.DURATION_BUCKETS)
    checkpoint = ExplicitBucketHistogramAggregation(boundaries=instruments.CHECKPOINT_BUCKETS)
    return [
        View(instrument_name=instruments.STEP_DURATION.name, aggregation=duration),
        View(instrument_name=instruments.DATA_WAIT.name, aggregation=duration),
        View(instrument_name=instruments.CHECKPOINT_DURATION.name, aggregation=checkpoint),
    ]


def otlp_readers() -> list[MetricReader]:
    """An OTLP/HTTP push reader when the standard OTEL_EXPORTER_OTLP_* variables ask for one, else none.

    The exporter reads its endpoint, headers and timeout from those variables, and the periodic reader
    its interval from OTEL_METRIC_EXPORT_INTERVAL (push_interval_millis checks it first)."""
    endpoint = first_set(OTLP_ENDPOINT_VARIABLES)
    if endpoint is None:
        return []
    if not endpoint[1].strip().lower().startswith(("http://", "https://")):
        # Taken, every push failed with the SDK's "No connection adapters were found", once a minute.
        log.warning("%s=%r has no http:// or https:// in front: every push would fail; write it as "
                    "http://HOST:4318 (the collector's OTLP/HTTP receiver); pushing nothing", *endpoint)
        return []
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_* is set but opentelemetry-exporter-otlp-proto-http is not installed "
                    "(pip install 'trainmetrics[otlp]'); pushing nothing")
        return []
    # (the general one may be for the process's other signals, grpc, while its metrics are http/protobuf: warned
    # of, it was a false alarm)
    protocol = first_set(OTLP_PROTOCOL_VARIABLES)
    if protocol is not None and protocol[1].strip() != "http/protobuf":
        # Ignored without a word, the job pushed HTTP to a gRPC port (4317) and every push failed.
        log.warning("%s=%r: trainmetrics pushes OTLP over http/protobuf only; point the endpoint at the "
                    "collector's OTLP/HTTP receiver (port 4318 by default)", *protocol)
    exporter = OTLPMetricExporter(timeout=push_seconds(warn=True))
    return [PushReader(exporter, export_interval_millis=push_interval_millis())]


def push_interval_millis() -> float | None:
    """The push interval OTEL_METRIC_EXPORT_INTERVAL sets (ms), None for the SDK's 60 s when unset; one that is no
    finite number above 0 is warned of and 60 s used. The SDK refused 0 or less (raised out of JobMetrics(), it
    refused the job, blaming --metrics-listen), and took NaN or infinity as "never push by itself": the job pushed
    nothing at all, not even its final state, without a word."""
    text = os.environ.get(EXPORT_INTERVAL_VARIABLE)
    if not text:
        return None
    millis = _waitable(text, 1e-3)
    if millis is not None:
        return millis
    log.warning("%s=%r is not a number of milliseconds above 0 a thread can wait; pushing every 60 s",
                EXPORT_INTERVAL_VARIABLE, text)
    return DEFAULT_PUSH_INTERVAL_MILLIS


def push_seconds(warn: bool = False) -> float:
    """How long a push may take, retries included, the last one at the job's end too: the timeout the variables
    set (in seconds, as this SDK reads them), else FINAL_PUSH_SECONDS (the SDK's 10 s, retried, held a job's exit
    for 15-31 s when the collector was down or never answered)."""
    timeout = first_set(OTLP_TIMEOUT_VARIABLES)
    if timeout is None:
        return FINAL_PUSH_SECONDS
    seconds = _waitable(timeout[1], 1.0)
    if seconds is not None:
        return seconds
    if warn:
        log.warning("%s=%r is not a number of seconds above 0 a thread can wait; a push gives up after %g s",
                    *timeout, FINAL_PUSH_SECONDS)
    return FINAL_PUSH_SECONDS


def _waitable(text: str, unit_seconds: float) -> float | None:
    """`text` as a number above 0 of units of `unit_seconds` that a thread can wait, else None: no number, NaN,
    infinity, 0 or less, or past threading.TIMEOUT_MAX (1e300 raised an OverflowError in the SDK: its push thread
    died, or its shutdown failed)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value * unit_seconds <= threading.TIMEOUT_MAX else None


def first_set(names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of these variables that is set (not empty), and its value: a METRICS_ one overrides the general
    one, as the SDK reads them."""
    return next(((name, os.environ[name]) for name in names if os.environ.get(name)), None)


class PushReader(PeriodicExportingMetricReader):
    """The SDK's periodic reader, collecting in the process that made it only. The SDK restarts its thread in a
    forked child (a DataLoader worker), which then pushed the child's copy of the job's state under the job's
    resource every interval, between the job's own pushes: trainer_steps_total went back to the steps at the fork
    (0 in the first epoch), and a delta conversion counted the steps since the last push twice."""

    def __init__(self, exporter: MetricExporter, **kwargs):
        self._owner_pid = os.getpid()
        self._pushing = threading.Lock()        # held through a collection and its push
        super().__init__(exporter, **kwargs)

    def collect(self, timeout_millis: float = 10_000) -> None:
        if os.getpid() == self._owner_pid:
            with self._pushing:
                super().collect(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        """The last push, given `timeout_millis` of its own, after the push under way (if any) ends: the SDK counted
        the push the job ended in against the last one's time, so a collector slower than half the timeout got
        the last push after close() had returned, and the job's exit killed it (its final state lost, unsaid)."""
        if os.getpid() != self._owner_pid:      # a forked child's copy: it pushes nothing (its lock may be held)
            super().shutdown(timeout_millis=timeout_millis, **kwargs)
            return
        if self._pushing.acquire(timeout=timeout_millis / 1000):     # (bounded by that push's own timeout)
            self._pushing.release()
        super().shutdown(timeout_millis=timeout_millis, **kwargs)


def build_push_provider(resource_attributes: dict[str, str]) -> MeterProvider | None:
    """A MeterProvider pushing over OTLP when the environment configures it (otlp_readers), else None. /metrics
    does not go through it: series.py reads the same callbacks straight into the text."""
    readers = otlp_readers()
    if not readers:
        return None
    resource = Resource.create(resource_attributes)
    if resource.attributes.get(SERVICE_NAME, "").startswith("unknown_service"):
        # The SDK's default: ours where OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name none (a collector's
        # Prometheus exporter makes it the `job` label of every series).
        resource = resource.merge(Resource({SERVICE_NAME: "trainmetrics-trainer"}))
    # Shut down by the job's close() alone, which runs at the interpreter's exit too (metrics._close_left_open):
    # the SDK's own exit hook, registered after ours, ran first, and that close() shut it down a second time.
    return MeterProvider(metric_readers=readers, resource=resource, views=histogram_views(),
                         shutdown_on_exit=False)


@dataclass
class _Scraper:
    last_began: float
    last_delivered_began: float = float("-inf")
    interval: float | None = None
    last_asked_began: float = float("-inf")     # its last request read, its answer delivered or not
    closed: bool = False            # its connection closed: it scrapes no more under this name
    # When its connection was seen closed on a scrape it gave up (its last request read, no answer delivered): it
    # comes back on a new connection, as Prometheus does after a timeout, and a process frozen past
    # MIN_ACTIVE_SECONDS sees that close only when it wakes. None after an idle connection's close (the idle timeout,
    # an eviction, its client closing it): its last scrape was its last sign.
    gave_up_seen: float | None = None
    # Its scrape timeout, which its interval is at least (Prometheus refuses a timeout longer than the interval):
    # the interval's stand-in until a second scrape measures it. Without it a scraper slower than
    # MIN_ACTIVE_SECONDS (a second Prometheus at 15 s) counted as gone between its first two scrapes: the linger
    # ended without it, and the evaluations it had not read were dropped.
    timeout: float | None = None

    def idle_past(self, now: float, at_least: float) -> bool:
        """True when its last scrape began longer ago than `at_least` and ACTIVE_INTERVALS of its own intervals
        (its scrape timeout before one is measured). A closed one: `at_least` alone (its last interval may be a
        freeze's), from the close of a scrape it gave up if that was seen later: a process frozen past `at_least`
        sees its scrapers' closes only when it wakes, and took them for gone at once, before they could come back
        on new connections (the final linger then ended on whichever came back first). Not from an idle
        connection's close: owed a read again from it, a scraper long gone held the linger."""
        if self.closed:
            since = self.last_began if self.gave_up_seen is None else max(self.last_began, self.gave_up_seen)
            return now - since > at_least
        interval = self.interval if self.interval is not None else self.timeout
        return now - self.last_began > max(at_least, ACTIVE_INTERVALS * (interval or 0))


class ScraperLog:
    """The Prometheus-compatible scrapers reading this job (one per connection, a closed one still for a
    while), and when each last had an answer delivered."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._changed = threading.Condition()
        self._scrapers: dict[str, _Scraper] = {}
        # Kept apart from the scrapers: what a scraper read still counts once its connection has closed (one
        # without keep-alive closes it after every scrape, its first and its last included).
        self._last_delivered_began = float("-inf")

    def delivered(self, scrape: Scrape) -> None:
        """A counting scrape's answer was written to its scraper."""
        with self._changed:
            self._last_delivered_began = max(self._last_delivered_began, scrape.began)
            known = self._scrapers.get(scrape.scraper)
            if known is None:
                self._forget_gone()
                self._scrapers[scrape.scraper] = _Scraper(scrape.began, scrape.began, timeout=scrape.timeout)
            else:
                if scrape.began > known.last_began:
                    known.interval = scrape.began - known.last_began
                    known.last_began = scrape.began
                known.last_delivered_began = max(known.last_delivered_began, scrape.began)
            self._changed.notify_all()

    def asked(self, scrape: Scrape) -> None:
        """A counting scrape's request was read: its answer may never reach its scraper (one that gave it up)."""
        with self._changed:
            known = self._scrapers.get(scrape.scraper)
            if known is not None:
                known.last_asked_began = max(known.last_asked_began, scrape.began)

    def closed(self, scraper: str) -> None:
        """`scraper`'s connection closed: it scrapes no more under this name. It stays active for
        MIN_ACTIVE_SECONDS after its last scrape, or after this close when it ended a scrape the scraper gave up
        (whichever came later), so the final linger waits that long for it to come back on a new connection (one
        Prometheus of an HA pair whose connection closed near the end), but no longer: its last interval may be
        stale (a request queued while this process was frozen, its scraper gone to a new connection meanwhile, is
        answered after the freeze, which makes the freeze its interval)."""
        with self._changed:
            known = self._scrapers.get(scraper)
            if known is not None:
                known.closed = True
                if known.last_asked_began > known.last_delivered_began:
                    known.gave_up_seen = self._clock()
                self._changed.notify_all()

    def _forget_gone(self) -> None:
        now = self._clock()
        gone = [name for name, scraper in self._scrapers.items() if scraper.idle_past(now, FORGET_SECONDS)]
        for name in gone:
            del self._scrapers[name]

    def active(self) -> set[str]:
        """Scrapers still keeping to their rhythm."""
        now = self._clock()
        with self._changed:
            return {name for name, scraper in self._scrapers.items() if not scraper.idle_past(now, MIN_ACTIVE_SECONDS)}

    def delivered_since(self, scraper: str, moment: float) -> bool:
        """True when `scraper` had an answer delivered for a scrape that began after `moment`."""
        with self._changed:
            known = self._scrapers.get(scraper)
            return known is not None and known.last_delivered_began > moment

    def any_since(self, moment: float) -> bool:
        """True when any scraper had an answer delivered for a scrape that began after `moment`."""
        with self._changed:
            return self._last_delivered_began > moment

    def wait(self, done: Callable[[], bool], timeout: float, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Block until done() holds (re-checked at each delivery and every 100 ms), the timeout passes or
        cancelled() holds; returns done()."""
        deadline = self._clock() + timeout
        while not done():
            remaining = deadline - self._clock()
            if remaining <= 0 or cancelled():
                return done()
            with self._changed:
                self._changed.wait(min(remaining, 0.1))
        return True


class Publication:
    """A job process's publication: provider and registry, /metrics, file_sd target, job-mapping file."""

    def __init__(self, job_id: str, rank: int, world_size: int, publish: Publish | None,
                 delivered: Callable[[Scrape], None] | None = None):
        self.publish = publish or Publish(listen=None, targets_dir=None, job_dir=None)
        self.scrapers = ScraperLog()
        self._render_lock = threading.Lock()
        self._delivered_hook = delivered
        labels = {"job_id": job_id}
        if world_size > 1:
            labels["rank"] = str(rank)
        labels[RUN_LABEL] = secrets.token_hex(4)        # this process's own (contract.RUN_LABEL)
        self.labels = labels
        self.series = JobSeries(labels)             # what /metrics shows (JobMetrics adds the instruments)
        self.push_provider = build_push_provider(labels)
        self.server: MetricsHTTPServer | None = None
        self.url: str | None = None          # where /metrics is served, as announced (None when not serving)
        self.registration: Registration | None = None
        self.target_file: Path | None = None
        self.mapping_file: Path | None = None
        self._claims: list[tuple[Path, int]] = []      # (directory, descriptor holding its claim)
        self._job_id, self._rank, self._world_size = job_id, rank, world_size

    def open(self) -> None:
        """Serve /metrics and announce the job (OSError/ValueError when it cannot; nothing is left behind)."""
        from trainmetrics.command import parse_listen, reachable_address

        publish = self.publish
        try:
            if publish.listen is not None:
                host, port = parse_listen(publish.listen)
                self.server = MetricsHTTPServer((host, port), self._render, web_config=publish.web_config,
                                                delivered=self._delivered, closed=self.scrapers.closed,
                                                asked=self.scrapers.asked,
                                                title=f"trainmetrics job {self._job_id}")
                self.server.serve_in_background(name="trainmetrics-metrics")
                address = reachable_address(host, self.server.port)
                scheme = "https" if publish.web_config is not None and publish.web_config.ssl_context else "http"
                self.url = f"{scheme}://{address}/metrics"
                if publish.register_url:
                    self.registration = Registration(publish.register_url, self._rank)
                    self.registration.register(address, scheme)
                # Announced once: a job server whose service discovery Prometheus reads announces it (a
                # TRAINMETRICS_TARGETS_DIR inherited from the server's environment would have it scraped twice,
                # as two scrape jobs, and every sum over the job doubled); else its file_sd target.
                if publish.targets_dir is not None and not (self.registration and self.registration.watched):
                    self._claim(Path(publish.targets_dir))
                    self.target_file = write_target_file(Path(publish.targets_dir), self.file_stem, address, scheme)
            if publish.job_dir is not None:
                self._claim(Path(publish.job_dir))
                mapping = JobMapping(job_id=self._job_id, pid=os.getpid(), gpus=list(publish.gpus), rank=self._rank,
                                     started=time.time())
                self.mapping_file = write_job_mapping(Path(publish.job_dir), mapping)
        except BaseException:
            self.release()
            raise

    def _claim(self, directory: Path) -> None:
        """This process's claim on its file names in a shared directory (jobfiles.claim): ClaimedElsewhere when
        the same job id and rank already run."""
        what = f"job {self._job_id}" + (f" rank {self._rank}" if self._world_size > 1 else "")
        fd = claim(directory, self.file_stem, what)
        if fd is not None:
            self._claims.append((directory, fd))

    @property
    def file_stem(self) -> str:
        """This process's name in the targets and job-mapping directories."""
        return f"{self._job_id}.rank{self._rank}"

    @property
    def announced(self) -> bool:
        """True when Prometheus was told about this job (a file_sd target, or the job server's service
        discovery) and can scrape it."""
        registered = self.registration is not None and self.registration.watched
        return self.server is not None and (self.target_file is not None or registered)

    @property
    def port(self) -> int | None:
        """The port /metrics is served on (None when not serving)."""
        return self.server.port if self.server else None

    def _render(self, scrape: Scrape) -> bytes:
        # One collection at a time: the callbacks read the scrape being served from current_scrape.
        with self._render_lock:
            token = current_scrape.set(scrape)
            try:
                return self.series.render()
            finally:
                current_scrape.reset(token)

    def _delivered(self, scrape: Scrape) -> None:
        if scrape.counting:
            if self._delivered_hook is not None:
                self._delivered_hook(scrape)
            self.scrapers.delivered(scrape)

    def collect(self) -> bytes:
        """The exposition text as a reader that does not count would see it (tests, debugging)."""
        return self._render(Scrape(None, time.monotonic()))

    def release(self) -> None:
        """Remove the files this process wrote and stop serving (idempotent)."""
        remove_quietly(self.target_file)
        remove_quietly(self.mapping_file)
        if self.registration is not None:
            self.registration.withdraw()
            self.registration = None
        self.target_file = self.mapping_file = None
        while self._claims:         # after the files: no second process may write them before they are gone
            directory, fd = self._claims.pop()
            unclaim(directory, self.file_stem, fd)
        if self.server is not None:
            self.server.close()
            self.server = None
            self.url = None

    def shutdown(self) -> None:
        """release(), and the OTLP push's last push, given what any push is (push_seconds(): a collector that is
        down or never answers held every job's exit for 15-31 s, its slot and memory with it), after the push under
        way, if any (PushReader.shutdown)."""
        self.release()
        if self.push_provider is not None:
            self.push_provider.shutdown(timeout_millis=push_seconds() * 1000)
