"""Collector isolation: NVML missing, a GPU lost mid-run and back, an unreadable /proc file, a broken collector."""

import logging
import shutil
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.core import GaugeMetricFamily

from trainmetrics.exporters.collectors.base import Collector
from trainmetrics.exporters.collectors.gpu import GpuCollector
from trainmetrics.exporters.exporter import Exporter
from tests.exporters.exporter_fixtures import (GIB, PROC_T1, FakeGpu, FakeNvml, build_fixture_host, parse_exposition,
                                              scrape, two_gpus)


def gpu_series(metrics: dict) -> set[str]:
    return {name for name in metrics if name.startswith("hw_gpu_")}


def success(metrics: dict) -> dict[str, float]:
    return {dict(labels)["collector"]: value for labels, value in metrics["exporter_collector_success"].items()}


def test_nvml_missing_is_debug_level_and_the_scrape_stays_whole(serve, caplog):
    host = build_fixture_host(nvml=FakeNvml(two_gpus(), missing=True))
    caplog.set_level(logging.DEBUG, logger="trainmetrics.exporters")
    host.sample_twice()
    status, content_type, body = scrape(serve(host.exporter))
    metrics = parse_exposition(body)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert success(metrics) == {"cpu": 1, "memory": 1, "disk": 1, "filesystem": 1, "network": 1,
                                "processes": 1, "jobs": 1, "gpu": 0, "energy": 1}
    assert gpu_series(metrics) == set()
    assert "process_cpu_time_seconds_total" in metrics
    gpu_records = [record for record in caplog.records if "gpu" in record.getMessage()]
    assert gpu_records and all(record.levelno == logging.DEBUG for record in gpu_records)


def test_gpu_lost_mid_run_reports_failure_then_recovers_after_backoff(serve, caplog):
    host = build_fixture_host(backoff_initial=0.5)
    url = serve(host.exporter)
    host.sample_twice()
    assert success(parse_exposition(scrape(url)[2]))["gpu"] == 1
    assert "hw_gpu_utilization_peak_ratio" in parse_exposition(scrape(url)[2])

    host.nvml.lost = True
    host.exporter.sample(101.0)
    host.exporter.sample(101.1)  # still lost, and inside the backoff: no retry yet
    host.exporter.render()
    status, _, body = scrape(url)
    metrics = parse_exposition(body)
    assert status == 200
    assert success(metrics)["gpu"] == 0 and success(metrics)["cpu"] == 1
    assert gpu_series(metrics) == set()  # no frozen values
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "GpuIsLost" in errors[0].getMessage()  # logged once, not per sample
    init_calls = host.nvml.init_calls

    host.nvml.lost = False
    host.exporter.sample(101.2)  # 0.2 s after the loss: backoff (0.5 s) not over
    assert host.nvml.init_calls == init_calls
    host.exporter.sample(101.6)
    host.exporter.sample_slow(101.6)
    host.exporter.render()
    metrics = parse_exposition(scrape(url)[2])
    assert host.nvml.init_calls == init_calls + 1
    assert success(metrics)["gpu"] == 1
    assert {"hw_gpu_utilization_ratio", "hw_gpu_power_watts", "hw_gpu_job_info"} <= gpu_series(metrics)


def test_gpu_lost_in_the_slow_loop_is_handled_by_the_fast_loop():
    host = build_fixture_host(backoff_initial=0.5)
    host.sample_twice()
    host.nvml.lost = True
    host.exporter.sample_slow(101.0)
    metrics = parse_exposition(host.exporter.render())
    assert success(metrics)["gpu"] == 0 and gpu_series(metrics) == set()
    host.nvml.lost = False
    host.exporter.sample(101.1)  # tears NVML down, schedules the re-init
    host.exporter.sample(101.7)
    host.exporter.sample_slow(101.7)
    metrics = parse_exposition(host.exporter.render())
    assert success(metrics)["gpu"] == 1 and "hw_gpu_temperature_celsius" in metrics


def test_unreadable_proc_file_fails_only_its_collector(tmp_path, serve):
    proc = tmp_path / "proc"
    shutil.copytree(PROC_T1, proc)
    host = build_fixture_host()
    url = serve(host.exporter)
    host.sample_twice()
    (proc / "meminfo").unlink()
    (proc / "meminfo").mkdir()  # reading it now fails with IsADirectoryError, even as root
    host.use_proc(proc)
    host.exporter.sample(100.2)
    host.exporter.render()
    status, _, body = scrape(url)
    metrics = parse_exposition(body)
    assert status == 200
    assert success(metrics)["memory"] == 0
    assert all(value == 1 for name, value in success(metrics).items() if name != "memory")
    assert not any(name.startswith("system_memory_") for name in metrics)
    assert "system_cpu_utilization_peak_ratio" in metrics

    (proc / "meminfo").rmdir()
    shutil.copy(PROC_T1 / "meminfo", proc / "meminfo")
    host.exporter.sample(100.3)
    metrics = parse_exposition(host.exporter.render())
    assert success(metrics)["memory"] == 1 and "system_memory_used_peak_bytes" in metrics


class BrokenCollector(Collector):
    name = "broken"
    fast = True

    def collect(self):
        raise RuntimeError("bug in collect")


def test_collector_failing_while_rendering_is_dropped_and_reported(fixture_host):
    exporter = Exporter([BrokenCollector(), *fixture_host.collectors])
    for now in (100.0, 100.1):  # failing stays failing on the next render too
        exporter.sample(now)
        metrics = parse_exposition(exporter.render())
        assert success(metrics)["broken"] == 0 and success(metrics)["memory"] == 1
        assert "system_memory_limit_bytes" in metrics


def test_http_server_serves_only_the_snapshot(fixture_host, serve):
    fixture_host.sample_twice()
    url = serve(fixture_host.exporter)
    assert scrape(url)[2] == fixture_host.exporter.snapshot()
    request = urllib.request.Request(f"{url}/metrics", method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200 and int(response.headers["Content-Length"]) == len(fixture_host.exporter.snapshot())
    try:
        urllib.request.urlopen(f"{url}/nothing", timeout=5)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as error:
        assert error.code == 404


def test_a_page_cache_past_the_limit_still_sums_to_the_limit(tmp_path):
    """Some containers report the host's page cache: used fell back to MemTotal - MemFree while buffers, cached
    and slab were published in full, and the states summed to twice the limit (docs: they sum to it)."""
    from trainmetrics.exporters.collectors.memory import MemoryCollector

    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 900 kB\n"
                                      "SReclaimable: 20 kB\n")
    exporter = Exporter([MemoryCollector(tmp_path, peak_window=1.0)])
    exporter.sample(0.0)
    metrics = parse_exposition(exporter.render())
    states = {dict(labels)["state"]: value for labels, value in metrics["system_memory_usage_bytes"].items()}
    assert sum(states.values()) == metrics["system_memory_limit_bytes"][()] == 1000 * 1024
    assert states["used"] == 900 * 1024 and states["free"] == 100 * 1024


class SlowerThanTheInterval(Collector):
    """A fast sample that takes longer than the loop's 100 ms interval (a slow /proc walk, a starved host)."""

    name = "slower"
    fast = True

    def __init__(self, seconds: float):
        self.seconds = seconds

    def sample(self, now: float) -> None:
        time.sleep(self.seconds)


def missed_samples(seconds: float, watched: float) -> dict:
    """exporter_samples_missed_total of an exporter whose one fast sample takes `seconds` at a 100 ms interval,
    after `watched` seconds."""
    exporter = Exporter([SlowerThanTheInterval(seconds)], sample_interval=0.1, slow_interval=0.5).start()
    try:
        time.sleep(watched)
        return parse_exposition(exporter.snapshot())["exporter_samples_missed_total"]
    finally:
        exporter.stop()


def test_samples_the_loop_falls_behind_on_are_counted_as_missed():
    """A fast loop whose passes took 250 ms sampled at 4 Hz, not 10, with nothing in the scrape to say so: its
    peaks claimed a resolution of one interval they did not have. Each whole interval in which no pass started is
    counted."""
    missed = missed_samples(0.25, 1.5)
    # ~6 passes, each starting ~2.5 intervals after the one before: at least one whole interval missed between.
    assert missed[(("loop", "fast"),)] >= 4, missed
    assert set(missed) == {(("loop", "fast"),), (("loop", "slow"),)}


def test_a_loop_slower_than_its_interval_by_less_than_one_interval_a_pass_counts_what_it_missed():
    """Each pass was counted in whole intervals since the one before: passes of 1.6 intervals each counted none, so a
    loop sampling at 6 Hz of its 10 said it missed nothing. The fractions add up: ~4 a second here."""
    missed = missed_samples(0.16, 2.0)
    # ~12 passes in 2 s where 20 were due: ~7 missed (0 before, a busy host aside).
    assert missed[(("loop", "fast"),)] >= 4, missed


class HostSampleHanging(Collector):
    """A host collector (the shared fast loop) whose sample hangs once `hang` is set, until `release`."""

    name = "hanging"
    fast = True

    def __init__(self):
        self.hang, self.hanging, self.release = threading.Event(), threading.Event(), threading.Event()

    def sample(self, now: float) -> None:
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(10)


def test_a_gpu_spike_is_published_while_the_hosts_fast_loop_hangs(serve):
    """The GPU's own loop rendered its text but only the host's fast loop swapped a new snapshot in: while a host
    sample hung (a dead NFS mount in /proc reads, up to its 1 s stall bound and the watchdog's look), no GPU reading
    reached a scrape, and a one-sample spike left its 0.5 s peak window before any scrape could see it, with the
    gpu collector saying success 1 and its loop nothing missed."""
    nvml = FakeNvml([FakeGpu("GPU-spike", utilization=[0], memory_used=[GIB])])
    hanging = HostSampleHanging()
    exporter = Exporter([hanging, GpuCollector(nvml=nvml, peak_window=0.5)], sample_interval=0.1,
                        slow_interval=0.5).start()
    url = serve(exporter)
    peak = ("hw_gpu_utilization_peak_ratio", (("gpu", "0"), ("uuid", "GPU-spike")))
    try:
        hanging.hang.set()
        assert hanging.hanging.wait(5)
        nvml.gpus[0].utilization = [100, 0]     # one sample at 100 %, then idle again
        seen = []
        for _ in range(30):                     # scrapes every 50 ms through the hang and past the window
            metrics = parse_exposition(scrape(url)[2])
            seen.append(metrics.get(peak[0], {}).get(peak[1]))
            time.sleep(0.05)
    finally:
        hanging.release.set()
        exporter.stop()
    assert 1.0 in seen, seen


class HostSourceBack(Collector):
    """A host collector (the shared fast loop) failing until `back` is set, then showing one series."""

    name = "flaky"
    fast = True

    def __init__(self):
        self.back = threading.Event()

    def sample(self, now: float) -> None:
        if not self.back.is_set():
            raise OSError("not there yet")

    def collect(self):
        gauge = GaugeMetricFamily("flaky_value", "A series of a source that came back.")
        gauge.add_metric([], 1.0)
        yield gauge


class HostSampleAfter(Collector):
    """A host collector sampled after `flaky` in the same pass: once `armed`, its sample waits (within the stall
    bound) for two snapshots published meanwhile by the GPU's own loop and keeps the latest."""

    name = "after"
    fast = True

    def __init__(self):
        self.armed, self.exporter, self.seen = threading.Event(), None, []

    def sample(self, now: float) -> None:
        if not self.armed.is_set() or self.seen:
            return
        snapshot, published, deadline = self.exporter.snapshot(), 0, time.monotonic() + 0.6
        while published < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
            if self.exporter.snapshot() is not snapshot:
                snapshot, published = self.exporter.snapshot(), published + 1
        self.seen.append(snapshot)


def test_a_snapshot_published_by_the_gpus_loop_mid_pass_says_success_only_of_series_it_holds():
    """The GPU's own loop swapped in snapshots while the host's fast pass was under way, with each host collector's
    success read then but its text from its latest render: a source back since this pass's sample showed
    exporter_collector_success 1 with none of its series (and one that just failed, 0 with its old ones)."""
    flaky, after = HostSourceBack(), HostSampleAfter()
    nvml = FakeNvml([FakeGpu("GPU-a", utilization=[50], memory_used=[GIB])])
    exporter = Exporter([flaky, after, GpuCollector(nvml=nvml)], sample_interval=0.1, slow_interval=0.5).start()
    after.exporter = exporter
    try:
        assert success(parse_exposition(exporter.snapshot()))["flaky"] == 0
        flaky.back.set()
        after.armed.set()
        deadline = time.monotonic() + 5
        while not after.seen and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        exporter.stop()
    metrics = parse_exposition(after.seen[0])
    assert ("flaky_value" in metrics) == (success(metrics)["flaky"] == 1), metrics.get("exporter_collector_success")
