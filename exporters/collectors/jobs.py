"""Training jobs: CPU time, RSS and process count of each job's whole process tree, by job_id.

The trainer writes one mapping file per job process into the job directory (trainmetrics.jobmap); the
tracker here turns those files into process trees: the mapped pid plus all its descendants (DataLoader
workers, compile workers, anything it spawns).

CPU time of a tree is the sum over its live processes of utime + stime + cutime + cstime. When a process
in the tree exits and its parent (also in the tree) reaps it, the kernel moves its whole time into the
parent's cutime/cstime, so the sum carries on without a dip and without counting anything twice. Lost is
the time of a process that leaves the tree before it exits (re-parented to init: a daemonised grandchild,
a worker whose parent died first); it drops out at the next tree walk. The exported counter never
decreases: reads of a tree are not atomic, and a reap between two reads (or such a departure) would
otherwise show as a dip that Prometheus takes for a counter reset.
"""

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from exporters.collectors.base import Collector, CollectorContext, read_bytes
from trainmetrics.jobmap import JobMapping
from trainmetrics.names import validate_job_id

log = logging.getLogger(__name__)

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Mapping files record when the job started; a process older than that (by more than clock skew
# between the trainer's time.time() and the kernel's boot-relative start time) is a reused pid.
START_TOLERANCE_SECONDS = 2.0


def parse_mapping(text: str) -> JobMapping:
    """One mapping file's JSON as a JobMapping; raises ValueError/KeyError/TypeError when malformed."""
    raw = json.loads(text)
    return JobMapping(job_id=validate_job_id(raw["job_id"]), pid=int(raw["pid"]),
                      gpus=[int(gpu) for gpu in raw.get("gpus", [])], rank=int(raw.get("rank", 0)),
                      started=float(raw.get("started", 0.0)))


@dataclass
class JobUsage:
    """One job's process tree, summed over all its mapped processes (ranks)."""

    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    processes: int = 0


@dataclass(frozen=True)
class JobsSnapshot:
    """What the tracker knows after one update: usage per job, which pid is whose, declared GPUs."""

    usage: dict[str, JobUsage] = field(default_factory=dict)
    job_of_pid: dict[int, str] = field(default_factory=dict)
    gpus: dict[str, frozenset[int]] = field(default_factory=dict)


@dataclass
class _Tree:
    mapping: JobMapping
    start_ticks: int  # the root's start time in clock ticks since boot: identifies it across pid reuse
    members: dict[int, int]  # pid -> start ticks
    dead: bool = False


class JobTracker:
    """Reads the job-mapping directory and the process trees of the jobs in it."""

    def __init__(self, job_dir: Path | str | None, proc_root: Path | str = "/proc",
                 descendants: Callable[[int], list[int]] | None = None,
                 clock_ticks: int = CLOCK_TICKS, page_bytes: int = PAGE_BYTES):
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.proc_root = str(proc_root)
        self.descendants = descendants or psutil_descendants
        self.clock_ticks = clock_ticks
        self.page_bytes = page_bytes
        self._files: dict[str, tuple[tuple[int, int, int], JobMapping | None]] = {}
        self._trees: dict[str, _Tree] = {}  # by mapping file name
        self._cpu_floor: dict[str, float] = {}
        self._lock = threading.Lock()
        self._updated_at: float | None = None
        self._trees_refreshed_at: float | None = None
        self.snapshot = JobsSnapshot()

    def _scan_directory(self) -> dict[str, JobMapping]:
        """Current mappings by file name; only files whose inode, mtime or size changed are re-read."""
        if self.job_dir is None:
            return {}
        try:
            entries = list(os.scandir(self.job_dir))
        except FileNotFoundError:
            entries = []  # the trainer creates it with its first job
        files = {}
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            known = self._files.get(entry.name)
            if known is not None and known[0] == key:
                files[entry.name] = known
                continue
            try:
                mapping = parse_mapping(Path(entry.path).read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.debug("ignoring job mapping %s: %s", entry.path, error)
                mapping = None
            files[entry.name] = (key, mapping)
        self._files = files
        return {name: mapping for name, (_key, mapping) in files.items() if mapping is not None}

    def _read_stat(self, pid: int) -> list[bytes] | None:
        """The fields of /proc/PID/stat after the command name, or None when the process is gone."""
        try:
            stat = read_bytes(f"{self.proc_root}/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            return None
        return stat[stat.rfind(b")") + 2:].split()

    def _discover(self, root_pid: int, root_ticks: int) -> dict[int, int]:
        """The root and all its descendants, pid -> start ticks."""
        members = {root_pid: root_ticks}
        for pid in self.descendants(root_pid):
            fields = self._read_stat(pid)
            if fields is not None:
                members[pid] = int(fields[19])
        return members

    def _new_tree(self, mapping: JobMapping) -> _Tree:
        fields = self._read_stat(mapping.pid)
        if fields is None:
            return _Tree(mapping, 0, {}, dead=True)  # stale file of a dead pid
        start_ticks = int(fields[19])
        if mapping.started > 0 and start_ticks / self.clock_ticks > boot_relative(mapping.started) + START_TOLERANCE_SECONDS:
            log.debug("job %s: pid %d was reused, ignoring its mapping", mapping.job_id, mapping.pid)
            return _Tree(mapping, start_ticks, {}, dead=True)
        return _Tree(mapping, start_ticks, self._discover(mapping.pid, start_ticks))

    def update(self, now: float) -> JobsSnapshot:
        """Pick up new and removed mapping files and read every tree's usage (cheap: one file per process)."""
        if self._updated_at == now:
            return self.snapshot
        mappings = self._scan_directory()
        with self._lock:
            trees = {}
            for name, mapping in mappings.items():
                tree = self._trees.get(name)
                if tree is None or tree.mapping != mapping:
                    tree = self._new_tree(mapping)
                trees[name] = tree
            self._trees = trees
            live = [tree for tree in trees.values() if not tree.dead]
        usage: dict[str, JobUsage] = {}
        job_of_pid: dict[int, str] = {}
        gpus: dict[str, set[int]] = {}
        ticks = self.clock_ticks
        for tree in live:
            job_id = tree.mapping.job_id
            job = usage.setdefault(job_id, JobUsage())
            gpus.setdefault(job_id, set()).update(tree.mapping.gpus)
            for pid, start_ticks in tree.members.items():
                if pid in job_of_pid:
                    continue  # a process in two ranks' trees counts once
                fields = self._read_stat(pid)
                if fields is None or int(fields[19]) != start_ticks:
                    if pid == tree.mapping.pid:
                        tree.dead = True  # the job process is gone; its leftover file is stale
                        break
                    continue
                job_of_pid[pid] = job_id
                job.cpu_seconds += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
                job.rss_bytes += int(fields[21]) * self.page_bytes
                job.processes += 1
        floors = {}
        for job_id, job in list(usage.items()):
            if job.processes == 0:
                del usage[job_id]
                continue
            job.cpu_seconds = max(job.cpu_seconds, self._cpu_floor.get(job_id, 0.0))
            floors[job_id] = job.cpu_seconds
        self._cpu_floor = floors
        self.snapshot = JobsSnapshot(usage, job_of_pid,
                                     {job_id: frozenset(indices) for job_id, indices in gpus.items()
                                      if job_id in usage})
        self._updated_at = now
        return self.snapshot

    def refresh_trees(self, now: float) -> None:
        """Re-walk every live tree to find processes started since the last walk (slow loop)."""
        if self._trees_refreshed_at == now:
            return
        with self._lock:
            trees = [tree for tree in self._trees.values() if not tree.dead]
        for tree in trees:
            members = self._discover(tree.mapping.pid, tree.start_ticks)
            with self._lock:
                tree.members = members
        self._trees_refreshed_at = now


def psutil_descendants(pid: int) -> list[int]:
    """Pids of all descendants of pid (psutil walks the ppid map of every process once)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def boot_relative(unix_time: float) -> float:
    """A time.time() value as seconds since boot, the clock /proc/PID/stat start times use."""
    return unix_time - psutil.boot_time()


class JobsCollector(Collector):
    """process_cpu_time_seconds_total{job_id}, process_memory_rss_bytes{job_id}, process_tree_processes{job_id}."""

    name = "jobs"
    fast = True
    slow = True

    def __init__(self, tracker: JobTracker):
        self.tracker = tracker

    @classmethod
    def build(cls, context: CollectorContext) -> "JobsCollector":
        return cls(context.job_tracker or JobTracker(None, context.proc_root))

    def sample(self, now: float) -> None:
        self.tracker.update(now)

    def sample_slow(self, now: float) -> None:
        self.tracker.refresh_trees(now)

    def collect(self):
        usage = self.tracker.snapshot.usage
        cpu = CounterMetricFamily("process_cpu_time_seconds_total",
                                  "CPU seconds of the job's whole process tree (user + system, reaped "
                                  "children included).", labels=["job_id"])
        rss = GaugeMetricFamily("process_memory_rss_bytes",
                                "Resident memory summed over the job's process tree (shared pages count "
                                "once per process).", labels=["job_id"])
        count = GaugeMetricFamily("process_tree_processes", "Processes in the job's tree (DataLoader workers included).",
                                  labels=["job_id"])
        for job_id in sorted(usage):
            job = usage[job_id]
            cpu.add_metric([job_id], job.cpu_seconds)
            rss.add_metric([job_id], job.rss_bytes)
            count.add_metric([job_id], job.processes)
        yield cpu
        yield rss
        yield count
