"""Faults of the exporter: under the real `trainmetrics exporter` process, the job-mapping dir deleted while it
runs, /proc entries vanishing between listing and reading, hundreds of idle connections and SIGTERM at any
moment; in process, a collector whose sample hangs."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.core import GaugeMetricFamily

from tests.hardening.exporter_process import collector_ok, job_series, parse, start_exporter
from trainmetrics.exporters.collectors.base import Collector
from trainmetrics.exporters.exporter import MAX_CONNECTIONS, Exporter
from trainmetrics.jobmap import JobMapping, write_job_mapping


@pytest.fixture
def exporter(tmp_path):
    running = start_exporter(tmp_path)
    yield running
    running.stop()


def test_job_mapping_dir_deleted_while_running(exporter):
    job_dir = exporter.job_dir
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_job_mapping(job_dir, JobMapping(job_id="map-1", pid=sleeper.pid, started=time.time()))
        exporter.wait_until(lambda s: job_series(s, "map-1"))
        shutil.rmtree(job_dir)
        for _ in range(20):                       # 2 s of scrapes: every one 200, the jobs collector healthy
            series = exporter.scrape()
            assert collector_ok(series, "jobs") == 1
            time.sleep(0.1)
        assert not job_series(series, "map-1")    # the mapping is gone, so is the attribution
        job_dir.mkdir()                           # and it comes back when the dir and the file do
        write_job_mapping(job_dir, JobMapping(job_id="map-1", pid=sleeper.pid, started=time.time()))
        exporter.wait_until(lambda s: job_series(s, "map-1"))
    finally:
        sleeper.kill()
        sleeper.wait()


CHURN = """
import subprocess, sys, time
end = time.monotonic() + 4
while time.monotonic() < end:
    children = [subprocess.Popen(["sleep", "0.2"]) for _ in range(4)]
    for child in children:
        child.wait()
"""


def test_proc_entries_vanishing_between_listing_and_reading(exporter):
    """A job whose tree spawns and reaps short-lived processes all the time: /proc/PID entries listed by the
    sampler disappear before they are read. Every scrape stays 200 with every collector succeeding."""
    churn = subprocess.Popen([sys.executable, "-c", CHURN])
    try:
        write_job_mapping(exporter.job_dir, JobMapping(job_id="churn-1", pid=churn.pid, started=time.time()))
        scrapes, most_processes = 0, 0.0
        while churn.poll() is None:
            series = exporter.scrape()
            scrapes += 1
            failing = {key[1] for key, value in series.items() if key[0] == "exporter_collector_success" and value != 1}
            assert not failing, failing
            for key, value in job_series(series, "churn-1").items():
                if key[0] == "process_tree_processes":
                    most_processes = max(most_processes, value)
            time.sleep(0.05)
        assert churn.returncode == 0
        assert scrapes >= 20
        assert most_processes >= 2, "the churning children were never seen in the job's tree"
    finally:
        if churn.poll() is None:
            churn.kill()
        churn.wait()


def test_idle_connections_do_not_cost_a_thread_each(exporter):
    """500 half-open connections cost 500 threads. Now at most MAX_CONNECTIONS connections are served (one thread
    each): a newcomer takes the slot of the one idle longest, which is closed; a scrape is answered all along."""
    threads_before = exporter.threads()
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", exporter.port), timeout=10))
            time.sleep(0.005)   # paced: a burst overflows the listen backlog (5) and waits on SYN retries
        time.sleep(1)
        assert exporter.threads() <= threads_before + MAX_CONNECTIONS, exporter.threads()
        kept = []
        for number, connection in enumerate(idle):
            connection.setblocking(False)
            try:
                connection.recv(1)                              # b"": closed by the exporter
            except BlockingIOError:
                kept.append(number)
        assert kept == list(range(len(idle) - MAX_CONNECTIONS, len(idle)))   # the oldest gave way, one a newcomer
        assert collector_ok(exporter.scrape(), "cpu") == 1  # every slot held: a scrape takes one all the same
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert collector_ok(exporter.scrape(), "cpu") == 1
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "no slot came back after the idle connections closed"
            time.sleep(0.1)


def test_sigterm_at_any_moment_ends_the_exporter_with_0(tmp_path):
    """Once, SIGTERM was ignored for 15 minutes: the signal handler (Event.set(), which takes a lock) ran again on
    the next SIGTERM while the main thread held that lock, and blocked on it. A storm of SIGTERM (as many as can be
    sent for a few milliseconds) at a random moment, right after start included: every run ends promptly with 0."""
    rng = random.Random()
    for run in range(8):
        workdir = tmp_path / f"run-{run}"
        workdir.mkdir()
        exporter = start_exporter(workdir)
        try:
            time.sleep(0 if run == 0 else rng.uniform(0, 0.5))
            storm_ends = time.monotonic() + rng.uniform(0.001, 0.03)
            while time.monotonic() < storm_ends and exporter.process.poll() is None:
                os.kill(exporter.process.pid, signal.SIGTERM)
            try:
                code = exporter.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"run {run}: still running 10 s after SIGTERM") from None
            assert code == 0, (run, exporter.log.read_text()[-2000:])
        finally:
            exporter.stop()


class Hanging(Collector):
    """Samples in the fast or the slow loop (or a fast loop of its own: "own"), and hangs in its sample while `hang`
    is set, until `release`."""

    name = "hanging"

    def __init__(self, part: str):
        self.fast, self.slow, self.own_loop = part in ("fast", "own"), part == "slow", part == "own"
        self.hang = threading.Event()
        self.release = threading.Event()

    def sample(self, now: float) -> None:
        if self.hang.is_set():
            self.release.wait(60)

    sample_slow = sample

    def collect(self):
        yield GaugeMetricFamily("hanging_value", "Present while the collector samples.", value=1)


class Counting(Collector):
    """Counts its fast samples."""

    name = "counting"
    fast = True

    def __init__(self):
        self.samples = 0

    def sample(self, now: float) -> None:
        self.samples += 1

    def collect(self):
        yield GaugeMetricFamily("counting_samples", "Fast samples taken.", value=self.samples)


@pytest.mark.parametrize("part", ["fast", "slow", "own"])
def test_a_hanging_sample_is_reported_as_failing_and_the_others_go_on(part, monkeypatch):
    """A sample that does not return (a FIFO, a dead NFS mount, a wedged driver) froze the loop with every
    collector still saying success 1. Now the collector reports 0 and loses its series after its stall bound,
    the other collectors keep sampling, and it comes back once its sample returned (and its backoff passed)."""
    from trainmetrics.exporters import exporter as exporter_module

    monkeypatch.setattr(exporter_module, "BACKOFF_MIN_SECONDS", 0.2)
    hanging, counting = Hanging(part), Counting()
    exporter = Exporter([hanging, counting], sample_interval=0.05, slow_interval=0.1).start()

    def wait(predicate, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while not predicate(series := parse(exporter.snapshot().decode())):
            assert time.monotonic() < deadline, series
            time.sleep(0.05)
        return series

    def sampler_threads() -> int:
        loop = "fast:hanging" if part == "own" else part
        return sum(thread.name == f"exporter-{loop}-sampler" for thread in threading.enumerate())

    try:
        assert collector_ok(wait(lambda s: ("hanging_value", "") in s), "hanging") == 1
        hanging.hang.set()
        series = wait(lambda s: collector_ok(s, "hanging") == 0)
        assert ("hanging_value", "") not in series and collector_ok(series, "counting") == 1
        counted = series[("counting_samples", "")]
        wait(lambda s: s[("counting_samples", "")] >= counted + 5)        # the others go on
        hanging.hang.clear()
        hanging.release.set()
        wait(lambda s: collector_ok(s, "hanging") == 1 and ("hanging_value", "") in s)
        wait(lambda s: sampler_threads() == 1)                            # the stuck thread has ended
    finally:
        hanging.release.set()
        exporter.stop()


class EverySampleHangs(Collector):
    """A source whose every call takes longer than the fast loop's stall bound (a GPU fallen off the bus)."""

    name = "wedged"
    fast = True

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def sample(self, now: float) -> None:
        self.calls += 1
        time.sleep(self.seconds)

    def collect(self):
        yield GaugeMetricFamily("wedged_value", "Never sampled in time.", value=1)


def test_a_source_whose_every_call_hangs_stalls_the_loop_once_per_backoff():
    """Called again as soon as its stalled sample returned, it froze the fast loop for the stall bound at every
    call: host sampling stopped for a second every two, its peaks lost. Now, after two stalls in a row, it is left
    out for a backoff."""
    wedged, counting = EverySampleHangs(1.3), Counting()
    began = time.monotonic()        # calls at 0 and ~1.35 (each 1.3 s), then none before ~7.6: read at 5.5
    exporter = Exporter([wedged, counting], sample_interval=0.05, slow_interval=0.1).start()
    try:
        time.sleep(max(0.0, began + 5.5 - time.monotonic()))
        series = parse(exporter.snapshot().decode())
        calls = wedged.calls
    finally:
        exporter.stop()
    assert calls == 2, calls
    assert collector_ok(series, "wedged") == 0 and ("wedged_value", "") not in series


class SlowFirstSample(Collector):
    """A source whose first sample takes past the fast loop's stall bound and succeeds (NVML's first
    initialisation on a host of 8 GPUs), every later one quick."""

    name = "slow-start"
    fast = True

    def __init__(self):
        self.calls = 0

    def sample(self, now: float) -> None:
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.6)

    def collect(self):
        yield GaugeMetricFamily("slow_start_value", "Sampled.", value=1)


def test_one_slow_sample_that_succeeded_is_no_reason_to_back_off():
    """One stall is no pattern: the source is sampled again at once and published."""
    source = SlowFirstSample()
    exporter = Exporter([source], sample_interval=0.1, slow_interval=1.0).start()
    try:
        deadline = time.monotonic() + 4         # within the 5 s a backoff would leave it out
        while ("slow_start_value", "") not in (series := parse(exporter.snapshot().decode())):
            assert time.monotonic() < deadline, series
            time.sleep(0.1)
        assert collector_ok(series, "slow-start") == 1 and source.calls >= 2
    finally:
        exporter.stop()


def test_a_gpu_driver_slower_than_the_interval_does_not_slow_the_hosts_sampling():
    """NVML answering in 300 ms (a busy driver: slower than the interval, under the stall bound) slowed the whole
    fast loop to 3 Hz: the host's peaks were sampled at a third of their rate. The GPU's fast sample runs in a
    loop of its own: the host's loop keeps its rate, and the GPU is published, sampled as fast as it answers."""
    from tests.exporters.exporter_fixtures import GIB, FakeGpu, FakeNvml
    from trainmetrics.exporters.collectors.gpu import GpuCollector

    class BusyDriver(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, handle):
            time.sleep(0.3)
            return super().nvmlDeviceGetUtilizationRates(handle)

    gpu = GpuCollector(nvml=BusyDriver([FakeGpu("GPU-busy", [40], [GIB])]))
    counting = Counting()
    exporter = Exporter([gpu, counting], sample_interval=0.05, slow_interval=0.5).start()
    try:
        began, counted = time.monotonic(), counting.samples
        time.sleep(2)
        host_rate = (counting.samples - counted) / (time.monotonic() - began)
        series = parse(exporter.snapshot().decode())
    finally:
        exporter.stop()
    assert host_rate > 10, host_rate          # 20 Hz asked; 3 Hz while the GPU's calls held the loop
    assert collector_ok(series, "gpu") == 1
    assert series[("hw_gpu_utilization_ratio", 'gpu="0",uuid="GPU-busy"')] == 0.4
    assert ("hw_gpu_temperature_celsius", 'gpu="0",uuid="GPU-busy"') in series


def test_the_gpus_own_loop_does_not_read_every_job_process_a_second_time():
    """The job tracker reads each job process's /proc/PID/stat once per `now` however many collectors ask (the
    jobs collector's fast sample and the GPU's shared one tick). With the GPU's fast sample in a loop of its own,
    its `now` was another: the tracker read every job process twice per tick, doubling the exporter's cost
    that grows with the jobs (docs/metrics.md: ~15 us per job process per fast sample)."""
    from tests.exporters.exporter_fixtures import GIB, FakeGpu, FakeNvml
    from trainmetrics.exporters.collectors.gpu import GpuCollector
    from trainmetrics.exporters.collectors.jobs import JobsCollector, JobTracker

    class CountingTracker(JobTracker):
        measures = 0

        def _measure(self):
            CountingTracker.measures += 1
            return super()._measure()

    tracker = CountingTracker(None)
    gpu = GpuCollector(nvml=FakeNvml([FakeGpu("GPU-a", [40] * 10_000, [GIB] * 10_000)]), job_tracker=tracker)
    counting = Counting()
    exporter = Exporter([gpu, JobsCollector(tracker), counting], sample_interval=0.05, slow_interval=0.5).start()
    try:
        ticks, measures = counting.samples, CountingTracker.measures
        time.sleep(2)
        ticks, measures = counting.samples - ticks, CountingTracker.measures - measures
    finally:
        exporter.stop()
    # One per fast tick, and at most one more per slow pass (4 in 2 s).
    assert measures <= ticks + 6, (measures, ticks)


def test_a_slow_driver_on_a_host_of_several_gpus_is_not_taken_for_a_hung_one():
    """NVML answering in 300 ms (as above) on 4 GPUs: a pass over them took 1.2 s, past the fast loop's 1 s stall
    bound, so the gpu collector was reported failing and its series dropped after every pass, then left out for
    5 s, 10 s, ... 60 s: an 8-GPU node's GPU series never showed. A sample stalls when one GPU's reads hang, not
    when a pass over many slow ones is long: a GPU that hangs is still found out within the bound."""
    from tests.exporters.exporter_fixtures import GIB, FakeGpu, FakeNvml
    from trainmetrics.exporters.collectors.gpu import GpuCollector

    hang = threading.Event()
    release = threading.Event()

    class BusyDriver(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, handle):
            time.sleep(0.3)
            if handle == 2 and hang.is_set():
                release.wait(30)
            return super().nvmlDeviceGetUtilizationRates(handle)

    uuids = [f"GPU-busy{index}" for index in range(4)]
    gpu = GpuCollector(nvml=BusyDriver([FakeGpu(uuid, [40] * 1000, [GIB] * 1000) for uuid in uuids]))
    exporter = Exporter([gpu, Counting()], sample_interval=0.1, slow_interval=1.0).start()
    utilization = [("hw_gpu_utilization_ratio", f'gpu="{index}",uuid="{uuid}"') for index, uuid in enumerate(uuids)]
    try:
        deadline = time.monotonic() + 3
        while utilization[0] not in (series := parse(exporter.snapshot().decode())):
            assert time.monotonic() < deadline, series
            time.sleep(0.1)
        watched_until = time.monotonic() + 4      # passes of 1.2 s: every one published, none taken for a stall
        while time.monotonic() < watched_until:
            series = parse(exporter.snapshot().decode())
            assert collector_ok(series, "gpu") == 1 and all(series.get(key) == 0.4 for key in utilization), series
            time.sleep(0.1)
        hang.set()                                # one GPU's call hangs: reported once its bound has passed
        deadline = time.monotonic() + 3.5
        while collector_ok(series := parse(exporter.snapshot().decode()), "gpu") == 1:
            assert time.monotonic() < deadline, series
            time.sleep(0.1)
        assert utilization[0] not in series
    finally:
        release.set()
        exporter.stop()


def test_a_slow_drivers_long_pass_over_several_gpus_does_not_hold_the_slow_loops_other_collectors():
    """The gpu collector's slow reads share the slow loop with the host's (disks, network, filesystems, energy). A
    pass over 4 GPUs whose driver takes 0.6 s for each one's slow reads gets on after each, so it is no stall, but
    past the loop's 1 s bound it must still hand the loop on: it held the other collectors for its whole 2.4 s,
    where a pass past the bound had them sampled on by a new thread."""
    from tests.exporters.exporter_fixtures import GIB, FakeGpu, FakeNvml
    from trainmetrics.exporters.collectors.gpu import GpuCollector

    class SlowDriver(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle):
            time.sleep(0.6)
            return super().nvmlDeviceGetPowerUsage(handle)

    class SlowCounting(Collector):
        name, fast, slow = "slow_counting", False, True

        def __init__(self):
            self.samples = 0

        def sample_slow(self, now: float) -> None:
            self.samples += 1

    counting = SlowCounting()
    gpus = [FakeGpu(f"GPU-slow{index}", [40] * 1000, [GIB] * 1000) for index in range(4)]
    exporter = Exporter([GpuCollector(nvml=SlowDriver(gpus)), counting], sample_interval=0.1, slow_interval=0.1)
    exporter.start()
    try:
        began, watched_until = counting.samples, time.monotonic() + 3
        while time.monotonic() < watched_until:
            assert collector_ok(parse(exporter.snapshot().decode()), "gpu") == 1    # slow, not hung
            time.sleep(0.1)
        assert counting.samples - began >= 10, counting.samples - began      # 10 Hz, bar the 1 s bound per pass
    finally:
        exporter.stop()
