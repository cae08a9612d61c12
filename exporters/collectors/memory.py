"""Memory: usage by state and the limit from /proc/meminfo; the peak of used memory over the window."""

from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from trainmetrics.contract import Node
from trainmetrics.exporters.collectors.base import Collector, CollectorContext, read_bytes
from trainmetrics.exporters.window import SampleWindow

FIELDS = {b"MemTotal:": "total", b"MemFree:": "free", b"Buffers:": "buffers", b"Cached:": "cached",
          b"SReclaimable:": "slab_reclaimable"}
# used + free + buffers + cached + slab_reclaimable == system_memory_limit_bytes
STATES = ("used", "free", "buffers", "cached", "slab_reclaimable")


class MemoryCollector(Collector):
    """system_memory_usage_bytes{state}, system_memory_limit_bytes, system_memory_used_peak_bytes."""

    name = "memory"
    fast = True

    def __init__(self, proc_root: Path | str = "/proc", peak_window: float = 1.0):
        self.proc_root = str(proc_root)
        self.used = SampleWindow(peak_window)
        self._usage: dict[str, int] = {}

    @classmethod
    def build(cls, context: CollectorContext) -> "MemoryCollector":
        return cls(proc_root=context.proc_root, peak_window=context.peak_window)

    def sample(self, now: float) -> None:
        found = {}
        for line in read_bytes(f"{self.proc_root}/meminfo").split(b"\n"):
            key, _, rest = line.partition(b" ")
            name = FIELDS.get(key)
            if name:
                found[name] = int(rest.split()[0]) * 1024  # the kernel's "kB" is KiB
        # gVisor's meminfo (GKE Sandbox) has no slab lines: no reclaimable slab it reports, not a failed sample.
        found.setdefault("slab_reclaimable", 0)
        missing = set(FIELDS.values()) - found.keys()
        if missing:
            raise ValueError(f"{self.proc_root}/meminfo lacks {', '.join(sorted(missing))}")
        total = found["total"]
        used = total - found["free"] - found["buffers"] - found["cached"] - found["slab_reclaimable"]
        if used < 0:  # some containers report page cache larger than the limit: all that is not free is used,
            used = total - found["free"]     # and the cache states none of it, so the states still sum to the total
            found.update(buffers=0, cached=0, slab_reclaimable=0)
        found["used"] = used
        self._usage = found
        self.used.add(now, used)

    def collect(self):
        if not self._usage:
            return
        usage = GaugeMetricFamily(Node.MEMORY_USAGE,
                                  "Memory in each state; the states sum to system_memory_limit_bytes.",
                                  labels=["state"])
        for state in STATES:
            usage.add_metric([state], self._usage[state])
        yield usage
        yield GaugeMetricFamily(Node.MEMORY_LIMIT, "Total usable memory (MemTotal).",
                                value=self._usage["total"])
        yield GaugeMetricFamily(Node.MEMORY_USED_PEAK,
                                "Max of used memory over the peak window.", value=self.used.peak())
