"""The exporter: background sampling, a pre-rendered exposition snapshot, and the HTTP server for it.

Sampler threads run the collectors: the fast loop every --sample-interval (cheap /proc reads, the gauges with
peaks), the slow loop every --slow-interval (process scans, statvfs, slow NVML calls), and a fast loop of its
own for each collector whose source may answer slower than the interval (NVML utilisation and memory: a busy
driver must not slow the host's sampling). After each fast pass the fast thread renders the exposition text,
re-rendering only the collectors whose data changed (a collector with a loop of its own is rendered there,
after its sample, never while it samples, and swaps its new text in from there too: a host sample that hangs
holds no GPU reading back), and swaps in the new bytes. A scrape returns those bytes: it never
waits on /proc, psutil or NVML, so its latency is that of a small HTTP response.

A sample that hangs (a dead network mount, a wedged driver) must neither pass for success nor freeze the
other collectors. Once a sample has run longer than its loop's stall bound without getting on (a collector that
reads many slow sources, one GPU after another, says so after each: Collector.progressed), its collector reports
exporter_collector_success 0 and its series are dropped, and a watchdog hands the loop to a new thread that
skips that collector until the sample returns; the stuck thread ends then (in the fast or slow loop, shared with
other collectors, a sample that gets on hands it over too past the bound, reported as no failure). After a second
stall in a row the collector is left out of its loop for a while (BACKOFF_MIN_SECONDS, doubling while it stalls
again), reported as failing: a source whose every call hangs (a GPU fallen off the bus) stalls the loop once per
backoff, not at every call.
"""

import logging
import threading
import time
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainmetrics.exporters.collectors.base import Collector, CollectorUnavailable
from trainmetrics.exposition import TextExposition
from trainmetrics.metrics_http import MetricsHTTPServer
from trainmetrics.webconfig import WebConfig

log = logging.getLogger(__name__)

# A sample is stalled once it has run this many of its loop's intervals, and at least STALL_MIN_SECONDS
# (the first NVML initialisation may take a second).
STALL_INTERVALS = 5
STALL_MIN_SECONDS = 1.0
WATCH_SECONDS = 0.25        # how often the watchdog looks for stalled samples
# A collector whose samples stalled twice in a row is left out of its loop this long after the second returns,
# doubling while it stalls again (a wedged driver whose every call takes seconds froze the fast loop for the stall
# bound at each call: host sampling stopped for a second every two). One stall is no pattern: a first NVML
# initialisation may take a second or two, and its result counts.
BACKOFF_MIN_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 60.0
STOP_SECONDS = 2.0          # how long stop() waits for the sampler threads
# A node is scraped by one or two Prometheus servers, each over one keep-alive connection: 32 leaves room
# for more scrapers and for curl while it bounds the threads. A connection idle for 30 s (half-open, or a
# client that connected and said nothing) is closed; until then it holds its slot, unless a newcomer finds
# all 32 taken: it takes the slot of the one waiting on its client longest (trainmetrics.metrics_http).
MAX_CONNECTIONS = 32
IDLE_TIMEOUT_SECONDS = 30.0


class CollectorStalled(Exception):
    """A collector left out of its loop after a stalled sample."""


class CollectorRunner:
    """The one wrapper around every collector: catches its failures and times its samples.

    A failing collector's series are dropped (no frozen values) and exporter_collector_success is 0
    until a sample succeeds again; the same holds while a sample hangs (see `stalled`). Each failure is
    logged once when it starts (debug level when the source simply is not there, error level otherwise)
    and the recovery once when it ends.
    """

    def __init__(self, collector: Collector, stall_after: dict[str, float]):
        self.collector = collector
        self.name = collector.name
        # The loop that runs each part: the fast and slow loops, or a fast loop of its own (Collector.own_loop).
        self.loop_of = {"fast": f"fast:{self.name}" if collector.own_loop else "fast", "slow": "slow"}
        self.stall_after = stall_after  # per part: seconds after which a running sample is stalled
        # Fixed keys: the fast thread reads them while the slow thread writes, so sizes never change.
        self.errors: dict[str, Exception | None] = {"fast": None, "slow": None, "render": None}
        self.durations: dict[str, float] = {"fast": 0.0, "slow": 0.0}
        # A sample in progress in the background loops: (monotonic start, its thread).
        self.running: dict[str, tuple[float, threading.Thread] | None] = {"fast": None, "slow": None}
        # When the running sample last got on (its start, or its latest call to progressed()).
        self.progress = {"fast": 0.0, "slow": 0.0}
        self.stall_reported = {"fast": False, "slow": False}
        self.stalls = {"fast": 0, "slow": 0}            # its samples in a row that stalled
        self.backoff = {"fast": 0.0, "slow": 0.0}       # seconds left out after its last stalled sample returned
        self.resume_at = {"fast": 0.0, "slow": 0.0}     # monotonic time it is sampled again
        self.generation = 0  # changes whenever a sample may have changed what collect() yields
        self.shown = False   # whether its latest collect() yielded its series (its samples had succeeded)
        collector.progressed = self.progressed

    def progressed(self) -> None:
        """The calling thread's running sample got on: its stall clock starts again. A pass over 4 GPUs whose
        driver answers in 300 ms took 1.2 s, past the fast loop's 1 s bound: taken for a hung sample at every pass,
        the GPUs' series were dropped and the collector left out of its loop for up to a minute."""
        me = threading.current_thread()
        for part, running in self.running.items():
            if running is not None and running[1] is me:
                self.progress[part] = time.monotonic()

    def waited(self, part: str, now: float) -> float:
        """Seconds the running sample of the part has gone without getting on (0 when none runs)."""
        running = self.running[part]
        return 0.0 if running is None else now - max(running[0], self.progress[part])

    def runs(self, part: str) -> bool:
        """True when the collector does work in the fast or slow loop."""
        return self.collector.fast if part == "fast" else self.collector.slow

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
    def stalled(self) -> bool:
        """True while one of its samples has gone longer than its loop's stall bound without getting on."""
        now = time.monotonic()
        return any(self.waited(part, now) > self.stall_after[part] for part in self.running)

    @property
    def sampled(self) -> bool:
        """True when the latest fast and slow samples succeeded."""
        return self.errors["fast"] is None and self.errors["slow"] is None

    @property
    def duration(self) -> float:
        """Seconds the latest fast and slow samples took together."""
        return sum(self.durations.values())

    def collect(self) -> Iterable:
        """The collector's families, or nothing while its source fails (said in `shown`: its success as rendered)."""
        self.shown = self.sampled
        if not self.shown:
            return
        for family in self.collector.collect():
            if family.samples:
                yield family


class SelfMetrics:
    """exporter_collector_success{collector}, exporter_collector_duration_seconds{collector} and
    exporter_samples_missed_total{loop}."""

    def __init__(self, runners: list[CollectorRunner], loops: list[str]):
        self.runners = runners
        self.missed = dict.fromkeys(loops, 0)   # fixed keys: each loop's thread adds to its own
        # Per collector, its success as its published text shows it (set by each publish): read when the snapshot is
        # made, a collector whose sample had just come back said 1 beside the text of its failure, with no series.
        self.success: dict[str, bool] = {}

    def collect(self):
        success = GaugeMetricFamily("exporter_collector_success",
                                    "1 when the collector's latest sample succeeded, else 0.", labels=["collector"])
        duration = GaugeMetricFamily("exporter_collector_duration_seconds",
                                     "Seconds the collector's latest fast and slow samples took.",
                                     labels=["collector"])
        for runner in self.runners:
            success.add_metric([runner.name], 1 if self.success.get(runner.name) else 0)
            duration.add_metric([runner.name], runner.duration)
        yield success
        yield duration
        missed = CounterMetricFamily("exporter_samples_missed", "Whole intervals of the sampling loop in which no "
                                     "sample started: it fell behind its schedule.", labels=["loop"])
        for loop, count in self.missed.items():
            missed.add_metric([loop], count)
        yield missed


class Exporter:
    """Samples the collectors in the background and keeps the latest exposition text ready to serve."""

    def __init__(self, collectors: list[Collector], sample_interval: float = 0.1, slow_interval: float = 1.0,
                 clock=time.monotonic):
        if not (0 < sample_interval < float("inf") and 0 < slow_interval < float("inf")):     # NaN passed `<= 0`
            raise ValueError(f"sample and slow intervals must be finite and > 0, got {sample_interval}, "
                             f"{slow_interval}")
        self.intervals = {"fast": sample_interval, "slow": slow_interval}
        self.stall_after = {part: max(STALL_MIN_SECONDS, STALL_INTERVALS * interval)
                            for part, interval in self.intervals.items()}
        self.runners = [CollectorRunner(collector, self.stall_after) for collector in collectors]
        self.clock = clock
        self._chunks: dict[str, tuple[int, bytes, bool]] = {}    # per collector: (generation, text, success)
        # generate_latest's text with each series' escaped name and labels kept: one writer per collector.
        self._writers = {runner.name: TextExposition() for runner in self.runners}
        self._self_writer = TextExposition()
        self._snapshot = b""
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards _loops and every runner's `running`
        self._publishing = threading.Lock()     # the host's and the own loops publish snapshots (_publish)
        self._loops: dict[str, threading.Thread] = {}  # the thread that owns each loop now
        self._watchdog: threading.Thread | None = None
        # The fast loops: the host's, then one per collector with a loop of its own.
        self._fast_loops = ["fast", *sorted({runner.loop_of["fast"] for runner in self.runners
                                             if runner.runs("fast") and runner.loop_of["fast"] != "fast"})]
        self._passed = {loop: threading.Event() for loop in [*self._fast_loops, "slow"]}     # a first pass done
        # When each loop's latest pass started: the samples it missed are counted (exporter_samples_missed_total), as
        # peaks have the resolution of the samples taken, not of the interval asked for.
        self._last_pass: dict[str, float | None] = dict.fromkeys(self._passed)
        # Each loop's intervals missed but not yet whole, carried to the next pass: counted per pass in whole
        # intervals, a loop whose passes took 1.9 intervals sampled at half its rate and counted none.
        self._behind: dict[str, float] = dict.fromkeys(self._passed, 0.0)
        self.self_metrics = SelfMetrics(self.runners, list(self._passed))
        self._own_saw_slow: set[str] = set()     # own loops that rendered after the first slow pass
        self._ready = threading.Event()  # a snapshot holding a whole fast and slow pass was rendered

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
        """Render the exposition text, reusing each collector's text while its data is unchanged, and publish it
        (see _publish). A collector sampled in a loop of its own is rendered there (while that loop runs): here its
        latest text is taken."""
        for runner in self.runners:
            if not runner.stalled and not self._in_own_loop(runner):
                self._render_chunk(runner)
        return self._publish()

    def _in_own_loop(self, runner: CollectorRunner) -> bool:
        """True when the collector's text is made in a fast loop of its own, one that runs."""
        return runner.loop_of["fast"] != "fast" and runner.loop_of["fast"] in self._loops

    def _publish(self) -> bytes:
        """Swap in a snapshot of every collector's latest text, leaving out the collectors whose sample is stalled.
        The host's fast loop publishes after each pass, and so does each collector's own loop after its sample:
        published by the host's loop alone, a GPU's readings waited for it, and while a host sample hung (up to its
        stall bound and the watchdog's look) a GPU spike left its peak window before any scrape saw it."""
        with self._publishing:
            chunks, success = [], {}
            for runner in self.runners:
                # Its text and success from the same render: another loop publishes while this one's pass runs.
                _, text, success[runner.name] = self._chunks.get(runner.name, (None, b"", False))
                if runner.stalled:
                    success[runner.name] = False
                else:
                    chunks.append(text)
            self.self_metrics.success = success
            chunks.append(self._self_writer.render(self.self_metrics))
            self._snapshot = b"".join(chunks)
            return self._snapshot

    def _render_chunk(self, runner: CollectorRunner) -> bytes:
        """The collector's text: rendered again only when its data may have changed."""
        cached = self._chunks.get(runner.name)
        if cached is not None and cached[0] == runner.generation:
            return cached[1]
        generation = runner.generation
        try:
            text = self._writers[runner.name].render(runner)
        except Exception as error:  # a bug in collect(): drop its series, keep the scrape
            log.error("collector %s failed to render: %s: %s", runner.name, type(error).__name__, error)
            runner.errors["render"] = error
            text = b""
        else:
            runner.errors["render"] = None
        self._chunks[runner.name] = (generation, text, runner.shown and runner.errors["render"] is None)
        return text

    def snapshot(self) -> bytes:
        """The latest rendered exposition text (what /metrics serves)."""
        return self._snapshot

    def start(self) -> "Exporter":
        """Start the sampler threads and the watchdog; return once a snapshot holds a whole fast and slow
        pass (or, when a sample hangs from the start, once its stall bound has passed)."""
        self._watchdog = threading.Thread(target=self._watch, name="exporter-watchdog", daemon=True)
        self._watchdog.start()
        with self._lock:
            for loop in self._fast_loops:
                self._start_loop(loop)
        # The fast passes first: they initialise sources (NVML) that the slow pass reads.
        deadline = time.monotonic() + self.stall_after["fast"] + 1.0
        for loop in self._fast_loops:
            self._passed[loop].wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._start_loop("slow")
        self._ready.wait(self.stall_after["slow"] + 1.0)
        return self

    def _start_loop(self, loop: str) -> None:
        """Start a thread that owns the loop from now on (call with _lock held)."""
        thread = threading.Thread(target=self._loop, args=(loop,), name=f"exporter-{loop}-sampler", daemon=True)
        self._loops[loop] = thread
        thread.start()

    def _every(self, interval: float):
        """Yield at once, then at each multiple of interval (skipping missed ones), until stopped."""
        next_at = self.clock()
        while not self._stop.wait(max(0.0, next_at - self.clock())):
            now = self.clock()
            yield now
            next_at += interval
            if next_at <= now:  # overran: skip the missed ticks instead of bursting to catch up
                next_at = now + interval

    def _loop(self, loop: str) -> None:
        """Sample every collector of the loop ("fast", "slow", or "fast:NAME", a collector's own), then render
        (the fast loops); ends when the watchdog replaced it."""
        me = threading.current_thread()
        part = loop.partition(":")[0]
        runners = [(runner, runner.sample if part == "fast" else runner.sample_slow)
                   for runner in self.runners if runner.runs(part) and runner.loop_of[part] == loop]
        interval = self.intervals[part]
        for now in self._every(interval):
            last, self._last_pass[loop] = self._last_pass[loop], now
            if last is not None:    # a pass longer than the interval, a starved thread, a hung sample handed over
                # (a sample starts no sooner than its schedule: the carry is never below 0, jitter adds nothing)
                behind = self._behind[loop] + (now - last) / interval - 1
                whole = max(0, int(behind))
                self.self_metrics.missed[loop] += whole
                self._behind[loop] = behind - whole
            for runner, sample in runners:
                with self._lock:
                    if runner.running[part] is not None or runner.resume_at[part] > time.monotonic():
                        continue  # still hanging in the thread this one replaced, or backing off after it
                    runner.running[part] = (time.monotonic(), me)
                sample(now)
                with self._lock:
                    returned = time.monotonic()
                    stalled = runner.waited(part, returned) > self.stall_after[part]
                    took = returned - runner.running[part][0]
                    runner.running[part] = None
                    # Stalled: past its bound (the watchdog, which looks 4 times a second, may not have seen it).
                    if runner.stall_reported[part] or stalled:
                        runner.stall_reported[part] = False
                        runner.stalls[part] += 1
                        if runner.stalls[part] >= 2:
                            self._back_off(runner, part, took)
                        else:
                            log.warning("collector %s: %s sample returned after %.1fs", runner.name, part, took)
                    else:
                        runner.stalls[part], runner.backoff[part] = 0, 0.0
                    if self._loops[loop] is not me:
                        return  # the watchdog gave the loop to another thread while this one hung
            slow_passed = self._passed["slow"].is_set()
            if loop == "fast":
                self.render()
                if slow_passed and self._own_saw_slow.issuperset(self._fast_loops[1:]):
                    self._ready.set()
            elif part == "fast":    # a collector's own: its text is made here, never while it samples
                for runner, _ in runners:
                    if runner.running["fast"] is None:      # not while its stalled sample runs on elsewhere
                        self._render_chunk(runner)
                if self._passed["fast"].is_set():   # not before the host's first pass: its collectors had no text
                    self._publish()
                if slow_passed:
                    self._own_saw_slow.add(loop)
            self._passed[loop].set()

    def _back_off(self, runner: CollectorRunner, part: str, took: float) -> None:
        """A second stalled sample in a row returned: leave the collector out of its loop for a while, reported as
        failing (its series dropped, not frozen: nothing samples it). Call with _lock held."""
        runner.backoff[part] = min(BACKOFF_MAX_SECONDS, max(BACKOFF_MIN_SECONDS, 2 * runner.backoff[part]))
        runner.resume_at[part] = time.monotonic() + runner.backoff[part]
        runner.errors[part] = CollectorStalled(f"its {part} sample took {took:.1f}s: left out for "
                                               f"{runner.backoff[part]:.0f}s")
        runner.generation += 1
        log.warning("collector %s: %s sample returned after %.1fs, its second stall in a row: left out of its loop "
                    "for %.0fs", runner.name, part, took, runner.backoff[part])

    def _watch(self) -> None:
        """Report stalled samples, and give a loop stuck in one to a new thread."""
        for _ in self._every(WATCH_SECONDS):
            now = time.monotonic()
            with self._lock:
                for runner in self.runners:
                    for part, running in runner.running.items():
                        if running is None:
                            continue
                        loop, stalled = runner.loop_of[part], runner.waited(part, now) > self.stall_after[part]
                        if stalled and not runner.stall_reported[part]:
                            runner.stall_reported[part] = True
                            log.error("collector %s: %s sample has not got on for %.1fs: reported as failing "
                                      "until it returns; the other collectors go on", runner.name, part,
                                      runner.waited(part, now))
                        # A loop shared with other collectors goes to a new thread past the bound whether or not
                        # the sample gets on (a slow driver's pass over many GPUs held the host's slow collectors
                        # for all of it); a collector's own loop waits on nobody else.
                        shared = loop in ("fast", "slow") and now - running[0] > self.stall_after[part]
                        if (stalled or shared) and running[1] is self._loops[loop]:
                            self._start_loop(loop)

    def stop(self) -> None:
        """Stop the sampler threads and release the collectors' sources."""
        self._stop.set()
        deadline = time.monotonic() + STOP_SECONDS
        with self._lock:
            threads = [*self._loops.values(), *([self._watchdog] if self._watchdog else [])]
        for thread in threads:  # a thread stuck in a sample is a daemon: it cannot hold the process
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for runner in self.runners:
            try:
                runner.collector.close()
            except Exception as error:
                log.debug("closing collector %s: %s", runner.name, error)


def metrics_server(exporter: Exporter, address: tuple[str, int], web_config: WebConfig | None = None
                   ) -> MetricsHTTPServer:
    """An HTTP server for the exporter's snapshot, bound to address (OSError when it cannot); start it with
    serve_in_background()."""
    return MetricsHTTPServer(address, lambda _scrape: exporter.snapshot(), web_config=web_config,
                             max_connections=MAX_CONNECTIONS, idle_timeout=IDLE_TIMEOUT_SECONDS,
                             title="trainmetrics exporter")
