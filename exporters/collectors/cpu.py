"""CPU: time counters per cpu and mode from /proc/stat; host utilisation as window mean and window peak."""

import os
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainmetrics.contract import Node
from trainmetrics.exporters.collectors.base import Collector, CollectorContext, read_bytes
from trainmetrics.exporters.window import SampleWindow

# /proc/stat columns in order; guest time is already inside user/nice, so it is not exported twice.
MODES = ("user", "nice", "system", "idle", "iowait", "interrupt", "softirq", "steal")
IDLE_COLUMNS = (3, 4)  # idle, iowait
IDLE = MODES.index("idle")
# A CPU whose idle time went back by more than this was taken offline and brought back (hotplug): its counts
# start again. A smaller step back (iowait "will decrease in certain conditions", proc(5)) keeps the highest.
HOTPLUG_SECONDS = 5.0


class CpuCollector(Collector):
    """system_cpu_time_seconds_total{cpu,mode}, system_cpu_utilization_ratio and its peak."""

    name = "cpu"
    fast = True

    def __init__(self, proc_root: Path | str = "/proc", peak_window: float = 1.0,
                 clock_ticks: int | None = None):
        self.proc_root = str(proc_root)
        self.clock_ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self.utilization = SampleWindow(peak_window)
        self._per_cpu: list[tuple[str, list[int]]] = []
        self._highest: dict[str, list[int]] = {}      # per cpu, each mode's highest count published
        self._previous_total: tuple[int, int, float] | None = None     # (total ticks, idle ticks, monotonic time)
        self._previous_cpus: list[str] = []

    @classmethod
    def build(cls, context: CollectorContext) -> "CpuCollector":
        return cls(proc_root=context.proc_root, peak_window=context.peak_window)

    def sample(self, now: float) -> None:
        per_cpu = []
        host = None
        for line in read_bytes(f"{self.proc_root}/stat").split(b"\n"):
            if not line.startswith(b"cpu"):
                break  # the cpu lines come first
            fields = line.split()
            ticks = [int(value) for value in fields[1:9]]
            ticks.extend([0] * (8 - len(ticks)))
            if fields[0] == b"cpu":
                host = ticks
            else:
                per_cpu.append((fields[0][3:].decode(), self._never_back(fields[0][3:].decode(), ticks)))
        if host is None:
            raise ValueError(f"{self.proc_root}/stat has no aggregate cpu line")
        self._per_cpu = per_cpu
        total = sum(host)
        idle = host[IDLE_COLUMNS[0]] + host[IDLE_COLUMNS[1]]
        cpus = [cpu for cpu, _ in per_cpu]
        # A CPU taken offline or brought back between two samples: the aggregate line sums every possible CPU, an
        # offline one's idle from another count than an online one's, so its idle jumps by that CPU's idle time
        # and the step between the two samples is no busy share (a half-busy host read 1.0). Start again from here.
        if self._previous_total is not None and cpus == self._previous_cpus:
            previous_total, previous_idle, previous_now = self._previous_total
            elapsed = total - previous_total
            if elapsed > 0:
                busy = 1.0 - (idle - previous_idle) / elapsed
                # Weighed by the ticks it covers: a sample taken late (the sampler starved on a busy host)
                # covers the whole busy stretch, not one sample interval of it (the mean takes its part in the window).
                self.utilization.add(now, min(1.0, max(0.0, busy)), weight=elapsed, since=previous_now)
        self._previous_total = (total, idle, now)
        self._previous_cpus = cpus

    def _never_back(self, cpu: str, ticks: list[int]) -> list[int]:
        """The CPU's counts as published: each mode's highest so far, since a counter that goes down is a reset
        to Prometheus (increase() then counted the whole count again: 400 s of iowait in a 0.1 s step); all of
        them anew after a hotplug (idle far back)."""
        highest = self._highest.get(cpu)
        if highest is not None and highest[IDLE] - ticks[IDLE] <= HOTPLUG_SECONDS * self.clock_ticks:
            ticks = [max(old, new) for old, new in zip(highest, ticks)]
        self._highest[cpu] = ticks
        return ticks

    def collect(self):
        times = CounterMetricFamily("system_cpu_time_seconds_total",
                                    "Seconds each logical CPU spent in each mode (from /proc/stat).",
                                    labels=["cpu", "mode"])
        ticks_per_second = self.clock_ticks
        for cpu, ticks in self._per_cpu:
            for mode, value in zip(MODES, ticks):
                times.add_metric([cpu, mode], value / ticks_per_second)
        yield times
        mean = self.utilization.mean()
        if mean is not None:
            yield GaugeMetricFamily(Node.CPU_UTILIZATION,
                                    "Host CPU busy share (0-1), mean of the samples over the peak window.",
                                    value=mean)
            yield GaugeMetricFamily(Node.CPU_UTILIZATION_PEAK,
                                    "Host CPU busy share (0-1), max of the samples over the peak window.",
                                    value=self.utilization.peak())
