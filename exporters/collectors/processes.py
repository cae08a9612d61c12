"""Processes: how many processes are in each scheduler state, from /proc/PID/stat."""

import os
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from trainmetrics.exporters.collectors.base import Collector, CollectorContext, read_bytes

STATUS_BY_CODE = {b"R": "running", b"S": "sleeping", b"D": "blocked", b"I": "idle", b"T": "stopped",
                  b"t": "stopped", b"Z": "defunct", b"X": "defunct", b"W": "paging", b"P": "parked"}
STATUSES = ("running", "sleeping", "blocked", "idle", "stopped", "defunct", "paging", "parked")


class ProcessesCollector(Collector):
    """system_processes{status}: every status is exported, zero included, so the series set is stable."""

    name = "processes"
    slow = True  # one file per process: too costly for every 100 ms, and counts move slowly

    def __init__(self, proc_root: Path | str = "/proc"):
        self.proc_root = str(proc_root)
        self._counts: dict[str, int] | None = None

    @classmethod
    def build(cls, context: CollectorContext) -> "ProcessesCollector":
        return cls(proc_root=context.proc_root)

    def sample_slow(self, now: float) -> None:
        counts = dict.fromkeys(STATUSES, 0)
        for entry in os.listdir(self.proc_root):
            if not entry.isdigit():
                continue
            try:
                stat = read_bytes(f"{self.proc_root}/{entry}/stat")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                # Exited while we listed; or another user's under hidepid=1 (an exporter not run as root), which
                # is left out as hidepid=2 leaves it out of the listing: it failed every sample, no series at all.
                continue
            # The command name may hold spaces and parentheses: the state follows the last ')'.
            code = stat[stat.rfind(b")") + 2:][:1]
            status = STATUS_BY_CODE.get(code)
            if status:
                counts[status] += 1
        self._counts = counts

    def collect(self):
        if self._counts is None:
            return
        family = GaugeMetricFamily("system_processes", "Processes in each scheduler state.",
                                   labels=["status"])
        for status in STATUSES:
            family.add_metric([status], self._counts[status])
        yield family
