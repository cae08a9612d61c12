"""Energy per job: CPU package energy (RAPL) shared out by CPU time, and every job's energy account published.

Slow loop: the energy counter of each CPU package (powercap zones `intel-rapl:N` named `package-N`, AMD's
included), the host's busy CPU time (/proc/stat) and each job's CPU time (the job tracker). An interval's
package energy goes to the jobs in proportion to their share of the host's busy CPU time in it: an
estimate (a busy core does not draw what the average one does, and the packages' idle power is shared out
with the rest). A job's first interval only takes its baseline, as does one in which it was resumed (its CPU
time counted again from 0). A zone's counter wraps at max_energy_range_uj: a reading below the previous one has
wrapped when the previous one was within that range and the step up to it is one a package can use in the interval
(MAX_PACKAGE_WATTS); any other step back is a reset (a resume from suspend, a driver that starts the counter
again), which counts its new value, as a GPU counter's reset does. A step up by more than a package can use is
no energy used: the reading is a new baseline.
The interval is the longer of the time between the two reads and between their passes' starts.

Since Linux 5.10 (CVE-2020-8694) energy_uj is readable by root only. Where no package zone is readable
the collector publishes no CPU energy (absent, not zero) and does not fail, like the gpu collector without
a GPU. It looks for zones again every RESCAN_SECONDS (a module loaded later, a package readable later).

Each zone counts on its own: a zone that cannot be read in one round loses its energy from its last reading to
its next (that reading is its new baseline) and leaves the other packages counting.

The gpu collector adds GPU energy to the same accounts (exporters/job_energy.py), which this collector
publishes after its sample, so its slow sample runs after the gpu collector's.
"""

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.core import CounterMetricFamily

from trainmetrics.contract import Node
from trainmetrics.exporters.collectors.base import Collector, CollectorContext, read_bytes
from trainmetrics.exporters.collectors.cpu import IDLE_COLUMNS
from trainmetrics.exporters.job_energy import JobEnergy

log = logging.getLogger(__name__)

PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # intel-rapl:N:M are parts of package N (cores, uncore, DRAM)
RESCAN_SECONDS = 60.0
# Far above what any CPU package draws (the largest server parts: ~500 W). A wrap steps up by at most this much
# energy in its interval; a counter that went back further was reset (taken for a wrap, a reset to near 0 added
# the whole max_energy_range_uj, 262 kJ, in one second).
MAX_PACKAGE_WATTS = 2_000


class EnergyCollector(Collector):
    """process_energy_joules_total{job_id,source}: the jobs' energy accounts, CPU shares added here."""

    name = "energy"
    slow = True

    def __init__(self, energy: JobEnergy, tracker=None, proc_root: Path | str = "/proc",
                 powercap_root: Path | str = "/sys/class/powercap", clock_ticks: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.energy = energy
        self.clock = clock          # when the zones are read (the pass's `now` is when the pass began)
        self.tracker = tracker
        self.proc_root = str(proc_root)
        self.powercap_root = Path(powercap_root)
        self.clock_ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self._zones: dict[Path, int] = {}           # energy_uj file -> its max_energy_range_uj
        self._unreadable: set[Path] = set()         # zones whose last read failed (said once per outage)
        self._next_scan = 0.0
        self._scanned = False
        # The previous round: its time, readings, busy seconds and jobs' CPU seconds, and when its zones were read.
        self._last: tuple[float, dict[Path, int], float, dict[str, float], float] | None = None

    @classmethod
    def build(cls, context: CollectorContext) -> "EnergyCollector":
        return cls(context.job_energy or JobEnergy(), context.job_tracker, context.proc_root, context.powercap_root)

    def _scan(self, now: float) -> None:
        """Add the package zones readable now to those watched (a watched zone stays: a failed read of it is
        retried every round)."""
        self._next_scan = now + RESCAN_SECONDS
        found, problems = {}, []
        try:
            names = sorted(name for name in os.listdir(self.powercap_root) if PACKAGE_ZONE.match(name))
        except OSError as error:
            names, problems = [], [f"{self.powercap_root}: {error.strerror or error}"]
        for name in names:
            zone = self.powercap_root / name
            if zone / "energy_uj" in self._zones:
                continue
            try:
                if not read_bytes(zone / "name").startswith(b"package"):
                    continue    # psys: the whole platform, packages included
                maximum = int(read_bytes(zone / "max_energy_range_uj"))
                int(read_bytes(zone / "energy_uj"))
            except (OSError, ValueError) as error:
                problems.append(f"{name}: {error}")
                continue
            found[zone / "energy_uj"] = maximum
        if found:
            self._zones.update(found)
            log.info("CPU package energy from %d RAPL zone(s) under %s", len(self._zones), self.powercap_root)
        elif not self._scanned and not self._zones:
            log.debug("no readable RAPL package zone (%s): no CPU energy per job", "; ".join(problems) or "none")
        self._scanned = True

    def _read_zones(self) -> dict[Path, int]:
        """The counters in microjoules of the zones that could be read now."""
        readings = {}
        for path in self._zones:
            try:
                readings[path] = int(read_bytes(path))
            except (OSError, ValueError) as error:
                if path not in self._unreadable:
                    self._unreadable.add(path)
                    log.warning("RAPL zone %s not readable (%s): its energy is not counted until it is", path.parent.name,
                                error)
                continue
            if path in self._unreadable:
                self._unreadable.discard(path)
                log.info("RAPL zone %s readable again", path.parent.name)
        return readings

    def _host_busy_seconds(self) -> float:
        """CPU seconds all CPUs spent busy (not idle, not iowait) since boot."""
        ticks = [int(value) for value in read_bytes(f"{self.proc_root}/stat").split(b"\n", 1)[0].split()[1:9]]
        return (sum(ticks) - sum(ticks[column] for column in IDLE_COLUMNS)) / self.clock_ticks

    def sample_slow(self, now: float) -> None:
        if now >= self._next_scan:
            self._scan(now)
        readings, read_at = self._read_zones(), self.clock()
        jobs = self._jobs_cpu_seconds(now)
        self.energy.touch(jobs)     # attributed: their accounts stay published whatever their sources read
        if not readings:
            self._last = None
        else:
            busy = self._host_busy_seconds()
            if self._last is not None:
                self._share(now, read_at, readings, busy, jobs)
            for job_id in jobs:
                self.energy.add(job_id, "cpu")
            self._last = (now, readings, busy, jobs, read_at)
        self.energy.publish()

    def _jobs_cpu_seconds(self, now: float) -> dict[str, float]:
        """Each job's CPU seconds now, from the shared job tracker brought up to date here.

        This collector keeps the tracker current itself so that energy per job does not depend on the jobs
        collector being on (with it off, nothing else re-walks the trees, so a worker started after its job's
        mapping was never counted). The tracker does each step at most once per `now`: with the jobs
        collector on, it has walked the trees at this slow sample already and the walk here costs nothing.
        """
        if self.tracker is None:
            return {}
        try:
            self.tracker.refresh_trees(now)
            self.tracker.update(now)
        except OSError as error:  # the job dir: its last snapshot stands, and the GPU energy goes on
            log.debug("job tracker: %s", error)
        return {job_id: job.cpu_seconds for job_id, job in self.tracker.snapshot.usage.items()}

    def _share(self, now: float, read_at: float, readings: dict[Path, int], busy: float,
               jobs: dict[str, float]) -> None:
        """Add the interval's package energy to the jobs by their share of the busy CPU time."""
        last_now, last_readings, last_busy, last_jobs, last_read_at = self._last
        # The interval between the two reads: from the passes' starts alone, a read later in its pass than the one
        # before (the gpu collector's sample before it took seconds longer) held more than the bound allowed, and
        # a package's real energy was taken for an impossible step.
        elapsed = max(now - last_now, read_at - last_read_at, 0.0)
        most = MAX_PACKAGE_WATTS * elapsed * 1e6     # microjoules a package can use in it
        microjoules = 0
        for path, value in readings.items():
            previous = last_readings.get(path, value)      # a zone not read last round: this is its baseline
            microjoules += self._step(path, previous, value, most)
        # A job whose CPU time went back ended and was resumed within the interval (its count starts again): that
        # is its new baseline. Its negative step lowered the jobs' sum below theirs, and with it the whole they
        # were shared out by: the others got more than the interval's energy.
        used = {job_id: max(seconds - last_jobs[job_id], 0.0) for job_id, seconds in jobs.items()
                if job_id in last_jobs}
        # Reads of the trees and of /proc/stat are not atomic: never share out more than the interval's energy.
        whole = max(busy - last_busy, sum(used.values()))
        if whole <= 0:
            return
        for job_id, seconds in used.items():
            self.energy.add(job_id, "cpu", microjoules / 1e6 * (seconds / whole))

    def _step(self, path: Path, previous: int, value: int, most: float) -> int:
        """Microjoules the zone counted from previous to value; `most`: what a package can use in the interval."""
        if value >= previous:
            # Up by more than a package can use in the interval: a counter set to another value (a zone read as
            # another, a driver's glitch), not energy used. The reading is a new baseline.
            return value - previous if value - previous <= most else 0
        # A wrap needs a counter that was within its range: under a max_energy_range_uj of 0 (or any below the
        # previous reading) the step came out negative and took energy off the other packages' in the sum.
        maximum = self._zones[path]
        if previous <= maximum and maximum - previous + value <= most:
            return maximum - previous + value
        # Back further than a wrap allows: a reset. Its value is what it counted since, when the interval could
        # hold that much; else the reading is only a new baseline.
        return value if value <= most else 0

    def collect(self):
        family = CounterMetricFamily(Node.JOB_ENERGY,
                                     "Energy used for the job: its GPUs' (source gpu) and its share of the CPU "
                                     "packages' by CPU time (source cpu, an estimate).",
                                     labels=["job_id", "source"])
        for (job_id, source), joules in sorted(self.energy.published.items()):
            family.add_metric([job_id, source], joules)
        yield family
