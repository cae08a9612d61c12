"""What every collector is: a class that samples its source and yields metric families from the sample."""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric


class CollectorUnavailable(Exception):
    """The collector's source does not exist on this machine (no GPU, no NVML library): not an error."""


@dataclass(frozen=True)
class CollectorContext:
    """What the exporter hands every collector's build(): data sources and timing."""

    proc_root: Path = Path("/proc")
    rootfs: Path = Path("/")            # the host's root filesystem, where it is mounted (a container: /host)
    powercap_root: Path = Path("/sys/class/powercap")
    peak_window: float = 1.0
    job_tracker: object | None = None
    job_energy: object | None = None    # the gpu and energy collectors' shared JobEnergy


class Collector:
    """Base class: sample() in the fast loop, sample_slow() in the slow loop, collect() to render.

    sample() and sample_slow() raise on failure; the exporter's wrapper turns that into
    exporter_collector_success{collector}=0 and drops the collector's series. collect() only reads
    what the last samples stored and must not touch the source.
    """

    name = ""
    fast = False  # True: sample() does work every --sample-interval (gauges with peaks, counters)
    slow = False  # True: sample_slow() does work every --slow-interval (costly or slow-moving sources)
    # True: its fast sample runs in a loop of its own, at the same interval: a source that can answer slower than
    # the interval without hanging (a busy GPU driver) must not slow the host's sampling.
    own_loop = False

    @classmethod
    def build(cls, context: CollectorContext) -> "Collector":
        """Create the collector from the exporter's context."""
        return cls()

    def sample(self, now: float) -> None:
        """Read the cheap, fast-moving part of the source at monotonic time now."""

    def sample_slow(self, now: float) -> None:
        """Read the costly or slow-moving part of the source."""

    def progressed(self) -> None:
        """Say, between the parts of a sample (each GPU's reads), that it is getting on: the exporter then takes the
        sample for hung only when one part runs past the loop's stall bound, not a pass over many slow answers.
        The exporter's runner sets it; a collector used on its own needs nothing here."""

    def collect(self) -> Iterable[Metric]:
        """Yield GaugeMetricFamily/CounterMetricFamily objects built from the latest samples."""
        return ()

    def close(self) -> None:
        """Release the source (NVML handles, files)."""


def label_text(name: str) -> str:
    """A host name (an interface's, a mountpoint's, a disk's) as a label value: its bytes that are not UTF-8, which
    os.fsdecode keeps as lone surrogates, each written `\\xNN`. The exposition wrote every such byte as U+FFFD, so
    two names differing in one (`eth\\xff`, `eth\\xfe`) were one series twice, a duplicate Prometheus drops."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def stat_fields(stat_text: bytes) -> list[bytes]:
    """The fields of a /proc/PID/stat after the command name (which may hold spaces and ')'): state, ppid, ..."""
    return stat_text[stat_text.rfind(b")") + 2:].split()


def read_bytes(path) -> bytes:
    """The whole file, read to its end at once: /proc files are generated as they are read. Plain os calls: a
    job's every process's /proc/PID/stat is read at each fast sample, and a file object's set-up cost a third of
    each read (~15 -> ~10 us)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
