"""Training jobs: CPU time, RSS and process count of each job's whole process tree, by job_id.

The trainer writes one mapping file per job process into the job directory (trainmetrics.jobmap); the
tracker here turns those files into process trees: the mapped pid plus all its descendants (DataLoader
workers, compile workers, anything it spawns).

CPU time of a tree is the sum over its live processes of utime + stime + cutime + cstime. When a process
in the tree exits and its parent (also in the tree) reaps it, the kernel moves its whole time into the
parent's cutime/cstime, so the sum carries on without a dip and without counting anything twice. A rank
that joins a job already counted is counted from its first sample, as the job's first ranks are (its processes
the job counted already, in the tree of the rank that started it, keep their time, counted once: see _base). Lost is
the time of a process that leaves the tree before it exits (re-parented to init: a daemonised grandchild,
a worker whose parent died first); it drops out at the next sample (a member counts while its parent, read then,
is one too); and the time of a child of a process
that ignores SIGCHLD (the kernel reaps it, into no cutime). A rank (a mapped process of a job
with several) that ends before the others keeps the time of its last sample in its job's counter. The
exported counter never decreases: reads of a tree are not atomic, and a reap between two reads (or such a
departure) would otherwise show as a dip that Prometheus takes for a counter reset.

The directory is untrusted input (any user who can write to it may drop anything there):
- only regular files of at most MAX_MAPPING_BYTES are read, opened without following symlinks and without
  blocking (a FIFO, /dev/zero behind a symlink, a huge file are refused);
- a mapping must prove which process it means: its `start_ticks` must equal the live process's start time,
  and the file's owner must be root or the process's user. Anything else is refused, so a file cannot claim
  pid 1 (every process of the host) or another user's processes;
- what a file said is cached by (inode, mtime, ctime, size) with its verdict (refused, dead, live), and the
  directory is listed again only when it changed, so thousands of stale files of jobs killed with -9 cost
  nothing per sample; listing is also held to SCAN_SHARE of a core when the directory keeps changing (a new
  mapping then waits up to MAX_SCAN_PAUSE).
"""

import errno
import json
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainmetrics.contract import Node, validate_job_id
from trainmetrics.exporters.collectors.base import Collector, CollectorContext, read_bytes, stat_fields
from trainmetrics.jobmap import JobMapping, check_gpus

log = logging.getLogger(__name__)

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_MAPPING_BYTES = 64 * 1024       # a mapping is ~150 bytes: anything far larger is not one
MAX_MAPPING_FILES = 100_000         # bounds the cache (~40 MiB) whatever lands in the directory
PID_LIMIT = 1 << 22                 # Linux's largest pid_max: a larger pid names no process (and no /proc path)
# O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: no symlink to /dev/zero or elsewhere.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
SCAN_SHARE = 0.05                   # listing the directory may use at most this share of a core...
MAX_SCAN_PAUSE = 5.0                # ...but a new job waits at most this long after a costly listing
# A directory's mtime has the kernel's coarse clock granularity: two changes within one tick leave the same
# mtime. A listing taken while the mtime was this recent is repeated once it has settled.
SETTLE_SECONDS = 1.0
RELIST_SECONDS = 10.0               # and a listing anyway now and then (a file rewritten in place)
# How long one reading of every process's parent serves the tree walks (ProcessFamilies): one pass's walks.
PARENTS_MAX_AGE = 0.5
# Passes over the trees one measurement takes at most: one is read again when a nested job's root was reaped
# during it (_measure_pass); the last is taken as it is (a sweep whose trials keep ending within microseconds).
MEASURE_TRIES = 3
MAX_ANCESTORS = 64                  # how far up from a job's root another job's process is looked for
# What a read of /proc/PID/stat fails with when there is no process to count: ENOENT (it exited before the open),
# ESRCH (exited between the open and the read), EACCES or EPERM (another user's, under hidepid=1: for as long as it
# runs). Any other error (EMFILE, ENFILE, ENOMEM...) says nothing of the process: it fails the pass, which is done
# again at the next sample. Taken for "gone", it ended a live rank for good or cached a new job's file as stale.
NO_PROCESS = (FileNotFoundError, ProcessLookupError, PermissionError)
# Errors reading a mapping file that are the host's, not the file's (out of file descriptors or memory): they fail
# the listing, to be read again, instead of caching the file as refused while it is unchanged.
HOST_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def parse_mapping(data: bytes) -> JobMapping:
    """One mapping file's JSON as a JobMapping; raises ValueError when malformed or without start_ticks."""
    try:
        raw = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")

    def integer(key: str, default: int | None = None, minimum: int = 0, limit: int | None = None) -> int:
        value = raw.get(key, default)
        # type(), not isinstance(): True is not a pid. A bound: JSON's integers have no end, and 10**4200 as a pid
        # made a /proc path too long for the kernel (an OSError that failed the collector, not this file).
        if type(value) is not int or value < minimum or (limit is not None and value >= limit):
            bounds = f">= {minimum}" if limit is None else f"from {minimum} to {limit - 1}"
            raise ValueError(f"{key} must be an integer {bounds}, got {str(value)[:40]!r}")
        return value

    gpus = check_gpus(raw.get("gpus", []))     # host indices, or UUIDs where the trainer knew no index
    started = raw.get("started", 0.0)
    # A finite number: float(10**400) raised OverflowError, which failed the collector instead of this file.
    if type(started) not in (int, float) or not -1e18 < started < 1e18:
        raise ValueError("started must be a unix time")
    if "start_ticks" not in raw:
        raise ValueError("no start_ticks (written by an older trainmetrics?): cannot prove its process")
    return JobMapping(job_id=validate_job_id(raw.get("job_id")), pid=integer("pid", minimum=1, limit=PID_LIMIT),
                      gpus=gpus, rank=integer("rank", 0, limit=PID_LIMIT), started=float(started),
                      start_ticks=integer("start_ticks"))


def read_mapping_file(path: str) -> tuple[JobMapping, int]:
    """The mapping in a file and the file's owner uid, reading only a regular file of bounded size without
    ever blocking or following a symlink; raises OSError or ValueError."""
    fd = os.open(path, OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_MAPPING_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_MAPPING_BYTES:
        raise ValueError(f"larger than {MAX_MAPPING_BYTES} bytes")
    return parse_mapping(data), info.st_uid


@dataclass
class JobUsage:
    """One job's process tree, summed over all its mapped processes (ranks)."""

    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    processes: int = 0


@dataclass(frozen=True)
class JobsSnapshot:
    """What the tracker knows after one update: usage per job, which pid is whose, declared GPUs (NVML
    indices and UUIDs)."""

    usage: dict[str, JobUsage] = field(default_factory=dict)
    job_of_pid: dict[int, str] = field(default_factory=dict)
    gpus: dict[str, frozenset[int | str]] = field(default_factory=dict)


@dataclass
class _Tree:
    mapping: JobMapping
    members: dict[int, int]  # pid -> start ticks (the root's is mapping.start_ticks)
    dead: bool = False
    cpu_seconds: float = 0.0     # what it counted at its last sample: kept for its job when it ends
    # The CPU time it had when first counted, left out when it joined a job already counted (see _measure);
    # None until its first sample.
    cpu_base: float | None = None
    # The root's ancestors when its file was read, parent first (see JobTracker._ancestors).
    ancestors: tuple[int, ...] = ()


class JobTracker:
    """Reads the job-mapping directory and the process trees of the jobs in it."""

    def __init__(self, job_dir: Path | str | None, proc_root: Path | str = "/proc",
                 descendants: Callable[[int], list[int]] | None = None,
                 clock_ticks: int = CLOCK_TICKS, page_bytes: int = PAGE_BYTES):
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.proc_root = str(proc_root)
        self.descendants = descendants or ProcessFamilies(self.proc_root)
        self.clock_ticks = clock_ticks
        self.page_bytes = page_bytes
        # Per file name: (inode, mtime, ctime, size) when read (ctime: a chown changes the verdict), and its
        # tree (None: refused or unparsable).
        self._files: dict[str, tuple[tuple[int, int, int, int], _Tree | None]] = {}
        self._live: list[_Tree] = []
        self._listed: tuple[int, int] | None = None  # the directory's (inode, mtime) at the last listing
        self._next_listing = 0.0    # earliest time of the next listing (SCAN_SHARE)
        self._relist_at = 0.0       # time of the next listing even if the directory looks unchanged
        self._warned_full = False
        self._cpu_floor: dict[str, float] = {}
        self._retired_cpu: dict[str, float] = {}    # per job: the CPU time of its ranks that ended before it
        self._departed: dict[str, float] = {}       # per job: ranks whose mapping file went since the last update
        # Jobs inside jobs (a sweep driver that runs its trials as jobs): per (pid, start ticks) of a job's root
        # process whose parent is another job's, that job and the whole CPU time of each process of the root's tree
        # (by pid and start ticks) at its last sample; and per outer job, the time of such trees that it now counts
        # too (_reaped_jobs).
        self._nested: dict[tuple[int, int], tuple[str, dict[tuple[int, int], float]]] = {}
        self._reaped_jobs_cpu: dict[str, float] = {}
        # Each process counted at the last pass, by (pid, start ticks): its job, the root (pid, start ticks) of the
        # tree that counted it, and its whole CPU time then (see _base).
        self._counted: dict[tuple[int, int], tuple[str, tuple[int, int], float]] = {}
        self._lock = threading.Lock()           # guards _live between the fast and the slow thread
        self._updating = threading.Lock()       # one update at a time (jobs, gpu and energy collectors share it)
        self._updated_at: float | None = None
        self._trees_refreshed_at: float | None = None
        self.snapshot = JobsSnapshot()

    def _list_directory(self, now: float) -> bool:
        """Re-read the directory if it may have changed; True when the set of trees was rebuilt."""
        if self.job_dir is None or now < self._next_listing:
            return False
        try:
            info = os.stat(self.job_dir)
        except FileNotFoundError:
            info = None             # the trainer creates it with its first job
        identity = None if info is None else (info.st_ino, info.st_mtime_ns)
        if identity == self._listed and now < self._relist_at:
            return False
        self._listed = None         # until this listing succeeds
        started = time.thread_time()
        try:
            files = {} if info is None else self._read_files()
        except OSError:
            # Nothing changed: tried again at the next update, once the listing's share of a core is paid.
            self._next_listing = now + min((time.thread_time() - started) / SCAN_SHARE, MAX_SCAN_PAUSE)
            raise
        self._note_departed(files)
        self._carry_bases(files)
        self._files = files
        live = self._one_tree_per_process(files)
        with self._lock:
            self._live = live
        settled = info is None or time.time_ns() - info.st_mtime_ns > SETTLE_SECONDS * 1e9
        self._listed = identity
        self._relist_at = now + (RELIST_SECONDS if settled else SETTLE_SECONDS)
        self._next_listing = now + min((time.thread_time() - started) / SCAN_SHARE, MAX_SCAN_PAUSE)
        return True

    def _read_files(self) -> dict[str, tuple[tuple[int, int, int, int], _Tree | None]]:
        """Each mapping file of the directory with its tree, read again only when new or changed; raises OSError
        (the directory unreadable, or an error of the host's: see _admit)."""
        files = {}
        with os.scandir(self.job_dir) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                if len(files) == MAX_MAPPING_FILES:
                    if not self._warned_full:
                        log.error("job dir %s holds over %d mapping files: ignoring the rest", self.job_dir,
                                  MAX_MAPPING_FILES)
                        self._warned_full = True
                    break
                try:
                    info_of_entry = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (info_of_entry.st_ino, info_of_entry.st_mtime_ns, info_of_entry.st_ctime_ns,
                       info_of_entry.st_size)
                known = self._files.get(entry.name)
                if known is None or known[0] != key:
                    known = (key, self._admit(entry.path, info_of_entry))
                files[entry.name] = known
        return files

    def _one_tree_per_process(self, files: dict) -> list[_Tree]:
        """The live trees, one per mapped process: the one counting it already, else the first listed. A process
        counts in one job only, so further files naming it (any user may write as many as they like for a
        process of their own) are left out of the samples: each was a tree read on every fast sample (10,000 took
        a quarter of a core at 10 Hz), and whichever the listing gave first took the process, and its time, from
        the job that counted it."""
        counting = {id(tree) for tree in self._live}
        trees = [tree for _key, tree in files.values() if tree is not None and not tree.dead]
        chosen: dict[tuple[int, int], _Tree] = {}
        for tree in sorted(trees, key=lambda tree: id(tree) not in counting):     # stable: listing order kept
            chosen.setdefault((tree.mapping.pid, tree.mapping.start_ticks), tree)
        return list(chosen.values())

    def _note_departed(self, files: dict) -> None:
        """Trees whose mapping file is gone (a rank that ended normally removes its own) keep their time for
        their job as of their last sample, as a rank that died with its file left behind does: without this the
        job's counter dropped by that rank's time (held flat by the floor until the other ranks made it up). A
        file rewritten for the same process of the same job is no departure (its new tree counts the process from
        its start); one naming it for another job is (see _job_process)."""
        kept = {id(tree) for _key, tree in files.values() if tree is not None}
        roots = {_job_process(tree) for _key, tree in files.values() if tree is not None}
        for _key, tree in self._files.values():
            if tree is None or tree.dead or id(tree) in kept or _job_process(tree) in roots:
                continue
            job_id = tree.mapping.job_id
            self._departed[job_id] = self._departed.get(job_id, 0.0) + tree.cpu_seconds

    def _carry_bases(self, files: dict) -> None:
        """A file rewritten for the same process of the same job: its new tree leaves out what the old one left out
        (counted from the start instead, the process's time until its first sample would come back in one sample).
        Not one for another job (see _job_process): _base decides what that job leaves out."""
        bases = {_job_process(tree): tree.cpu_base
                 for _key, tree in self._files.values() if tree is not None and tree.cpu_base is not None}
        for _key, tree in files.values():
            if tree is not None and tree.cpu_base is None:
                tree.cpu_base = bases.get(_job_process(tree))

    def _admit(self, path: str, info: os.stat_result) -> _Tree | None:
        """The tree of a new or changed mapping file, dead when its process is gone; None when refused. Raises
        OSError on an error of the host's (see NO_PROCESS, HOST_ERRNOS): the verdict is kept while the file is
        unchanged, so it must not be taken from such an error."""
        try:
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            if info.st_size > MAX_MAPPING_BYTES:
                raise ValueError(f"larger than {MAX_MAPPING_BYTES} bytes")
            mapping, owner = read_mapping_file(path)
        except FileNotFoundError:
            return None             # removed since the listing: the next listing drops it
        except (OSError, ValueError) as error:
            if isinstance(error, OSError) and error.errno in HOST_ERRNOS:
                raise
            log.warning("ignoring job mapping %s: %s", path, error)
            return None
        fields = self._read_stat(mapping.pid)
        if fields is None or int(fields[19]) != mapping.start_ticks:
            log.debug("job mapping %s: pid %d is gone or another process now: stale", path, mapping.pid)
            return _Tree(mapping, {}, dead=True)
        if not self._leads_its_process(mapping.pid):
            log.warning("ignoring job mapping %s: %d is a thread's id, not a process's", path, mapping.pid)
            return None
        if owner != 0 and owner != self._process_uid(mapping.pid):
            log.warning("ignoring job mapping %s: owned by uid %d, which does not own pid %d", path, owner,
                        mapping.pid)
            return None
        return _Tree(mapping, self._discover(mapping.pid, mapping.start_ticks), ancestors=self._ancestors(fields))

    def _ancestors(self, fields: list[bytes]) -> tuple[int, ...]:
        """The pids above a process, parent first, up to init (at most MAX_ANCESTORS). Read once, with its file: a job
        run by another job through a process the outer tree's walk has not found yet (a shell, torchrun) is nested
        in it all the same (_reaped_jobs)."""
        ancestors = []
        parent = int(fields[1])
        while parent > 1 and len(ancestors) < MAX_ANCESTORS and parent not in ancestors:
            ancestors.append(parent)
            fields = self._read_stat(parent)
            if fields is None:
                break
            parent = int(fields[1])
        return tuple(ancestors)

    def _leads_its_process(self, pid: int) -> bool:
        """False when the pid is a thread's (not its process's first): /proc/TID/stat, not listed in /proc but there
        to read, holds the whole process's times, memory and cutime, and a start of its own, so a file naming a thread
        counted the process a second time (in another job too: the one-job-per-process check goes by pid and start).
        True where it cannot tell (gone: the next sample finds it stale)."""
        try:
            status = read_bytes(f"{self.proc_root}/{pid}/status")
        except NO_PROCESS:
            return True
        start = status.find(b"\nTgid:")
        tgid = status[start + 6:].partition(b"\n")[0].strip()
        # Unreadable as a number (a /proc that is not the kernel's): a ValueError here failed every listing.
        return start < 0 or not tgid.isdigit() or int(tgid) == pid

    def _process_uid(self, pid: int) -> int | None:
        """The effective uid of a process (the owner of /proc/PID), or None when it is gone."""
        try:
            return os.stat(f"{self.proc_root}/{pid}").st_uid
        except NO_PROCESS:
            return None

    def _gone(self, pid: int, start_ticks: int) -> bool:
        """True when the process is no longer there (reaped: a zombie is still there), or its pid is another's."""
        fields = self._read_stat(pid)
        return fields is None or int(fields[19]) != start_ticks

    def _read_stat(self, pid: int) -> list[bytes] | None:
        """The fields of /proc/PID/stat after the command name, or None when there is no process to count (gone,
        never one, not ours to read); raises OSError on another error, which says nothing of the process."""
        try:
            stat_text = read_bytes(f"{self.proc_root}/{pid}/stat")
        except NO_PROCESS:
            return None
        return stat_fields(stat_text)

    def _discover(self, root_pid: int, root_ticks: int) -> dict[int, int]:
        """The root and all its descendants, pid -> start ticks: each one whose parent, read now, is one of them
        (the walk lists parents first, from a reading of every process's parent up to PARENTS_MAX_AGE old: a
        pid that ended since and was taken by another user's process was counted in the job, its memory and
        its CPU time with it)."""
        members = {root_pid: root_ticks}
        for pid in self.descendants(root_pid):
            fields = self._read_stat(pid)
            if fields is not None and int(fields[1]) in members:
                members[pid] = int(fields[19])
        return members

    def update(self, now: float) -> JobsSnapshot:
        """Pick up new and removed mapping files and read every live tree's usage (one file per process)."""
        if self._updated_at == now or not self._updating.acquire(blocking=False):
            return self.snapshot
        try:
            self._list_directory(now)
            self.snapshot = self._measure()
            self._updated_at = now
        finally:
            self._updating.release()
        return self.snapshot

    def _measure(self) -> JobsSnapshot:
        for _ in range(MEASURE_TRIES - 1):
            snapshot = self._measure_pass(recheck=True)
            if snapshot is not None:
                return snapshot
        return self._measure_pass(recheck=False)

    def _measure_pass(self, recheck: bool) -> JobsSnapshot | None:
        """One reading of every live tree, committed; None (nothing committed) when `recheck` finds a nested root
        reaped during the pass."""
        # A read may fail for a reason of the host's (_read_stat raises): the pass then changes nothing, and the
        # next sample does it again. It reads everything first and commits after: a tree marked dead, _departed
        # emptied or a nested root's time taken off before the failure would lose a rank's time or count it twice.
        usage: dict[str, JobUsage] = {}
        job_of_pid: dict[int, str] = {}
        claimed: dict[int, int] = {}                      # each process counted in this pass: pid -> start ticks
        gpus: dict[str, set[int | str]] = {}
        ticks = self.clock_ticks
        dead: list[_Tree] = []
        alive: list[tuple[_Tree, float]] = []             # a live tree and its CPU time
        earlier: dict[int, list[tuple[str | None, tuple[int, int], float, float]]] = {}    # per tree: see _base
        ended = dict(self._departed)
        # A job's processes are its own, not those of a job around it (a trial run by a sweep's driver, each a
        # job): trees whose root is in another tree go first, and a process counts once, in the innermost job.
        roots = {tree.mapping.pid for tree in self._live}
        depth = Counter(pid for tree in self._live for pid in roots & tree.members.keys())
        root_parents: dict[int, int] = {}                 # a live root's parent pid
        tree_times: dict[int, dict[tuple[int, int], float]] = {}    # per live root: its processes' whole CPU time
        counted_in: dict[tuple[int, int], tuple[str, tuple[int, int], float]] = {}     # the next pass's _counted
        for tree in sorted(self._live, key=lambda tree: -depth[tree.mapping.pid]):
            job_id = tree.mapping.job_id
            job = usage.setdefault(job_id, JobUsage())
            gpus.setdefault(job_id, set()).update(tree.mapping.gpus)
            counted, gone = 0.0, False
            times = tree_times.setdefault(tree.mapping.pid, {})
            in_tree: set[int] = set()     # its members found in it now (parents come first in members)
            for pid, start_ticks in tree.members.items():
                if pid in claimed:
                    # A process in two trees counts once. But a root whose pid another tree's process holds now (a
                    # killed rank's pid, taken by a new job's root) is gone: skipped as counted, the ended rank lived
                    # on, its time lost to its job, as long as the other process ran.
                    if pid == tree.mapping.pid and claimed[pid] != start_ticks:
                        gone = True
                        break
                    if claimed[pid] == start_ticks:
                        in_tree.add(pid)
                    continue
                fields = self._read_stat(pid)
                if fields is None or int(fields[19]) != start_ticks:
                    if pid == tree.mapping.pid:
                        gone = True  # the job process is gone; its leftover file is stale
                        break
                    continue
                # A member whose parent is no longer in the tree left it (orphaned: its parent, a launcher or a shell,
                # died): counted until the next walk, a nested job's root orphaned so and ending then (its file gone)
                # came back whole in this job, as _reaped_jobs, which reads its parent now, took nothing off.
                if pid != tree.mapping.pid and int(fields[1]) not in in_tree:
                    continue
                in_tree.add(pid)
                job_of_pid[pid] = job_id
                claimed[pid] = start_ticks
                seconds = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
                counted += seconds
                times[pid, start_ticks] = seconds
                root = (tree.mapping.pid, tree.mapping.start_ticks)
                counted_in[pid, start_ticks] = (job_id, root, seconds)
                last = self._counted.get((pid, start_ticks), (None, root, 0.0))      # None: not counted then
                earlier.setdefault(id(tree), []).append((*last, seconds))
                if pid == tree.mapping.pid:
                    root_parents[pid] = int(fields[1])
                job.rss_bytes += int(fields[21]) * self.page_bytes
                job.processes += 1
            if gone:        # a rank that ended: its time stays the job's (as of its last sample)
                dead.append(tree)
                ended[job_id] = ended.get(job_id, 0.0) + tree.cpu_seconds
            else:
                alive.append((tree, counted))
        alive_roots = {(tree.mapping.pid, tree.mapping.start_ticks) for tree, _counted in alive}
        alive = [(tree, counted, self._base(tree, earlier.get(id(tree), []), alive_roots)) for tree, counted in alive]
        for tree, counted, base in alive:
            usage[tree.mapping.job_id].cpu_seconds += counted - base
        nested, reaped = self._reaped_jobs([tree for tree, _counted, _base in alive], root_parents, tree_times,
                                           job_of_pid)
        # Inner trees are read before outer ones (the innermost job claims a process), so a nested root reaped by
        # the outer job's process between its own reading and its reaper's had its time counted in this pass twice:
        # in its job, and in the reaper's cutime (held for good by the outer job's counter floor, until its own time
        # caught up: a sweep driver's job grew by a whole trial's CPU time). Found still there now, it was not
        # reaped when its reaper was read; else the pass is read again, in which it is gone from the start.
        if recheck and any(self._gone(pid, start_ticks) for pid, start_ticks in nested):
            return None
        # Everything is read: commit.
        for tree, counted, base in alive:
            tree.cpu_base, tree.cpu_seconds = base, counted - base
        if dead:
            for tree in dead:
                tree.dead = True
            with self._lock:
                self._live = [tree for tree in self._live if not tree.dead]
        self._departed = {}
        self._counted = counted_in
        self._nested = nested
        for outer, seconds in reaped.items():
            self._reaped_jobs_cpu[outer] = self._reaped_jobs_cpu.get(outer, 0.0) + seconds
        floors, retired = {}, {}
        for job_id, job in list(usage.items()):
            if job.processes == 0:      # the job's last process ended: its series ends (a resume starts anew)
                del usage[job_id]
                continue
            retired[job_id] = self._retired_cpu.get(job_id, 0.0) + ended.get(job_id, 0.0)
            job.cpu_seconds -= self._reaped_jobs_cpu.get(job_id, 0.0)
            job.cpu_seconds = max(job.cpu_seconds + retired[job_id], self._cpu_floor.get(job_id, 0.0))
            floors[job_id] = job.cpu_seconds
        self._cpu_floor, self._retired_cpu = floors, retired
        self._reaped_jobs_cpu = {job_id: seconds for job_id, seconds in self._reaped_jobs_cpu.items()
                                 if job_id in usage}
        return JobsSnapshot(usage, job_of_pid,
                            {job_id: frozenset(indices) for job_id, indices in gpus.items() if job_id in usage})

    def _base(self, tree: _Tree, earlier: list[tuple[str | None, tuple[int, int], float, float]],
              alive_roots: set[tuple[int, int]]) -> float:
        """The CPU time a live tree leaves out of its job's counter: the one it left out at its first sample (kept
        after). A rank that joins a job already counted is counted from its first sample, as the job's first ranks
        are (a counter's increase starts at its series' first sample): its time until then (imports, start-up,
        seconds of it) came in one sample, a rate of several times the host's cores in the job's CPU and its share of
        the CPU energy. `earlier` holds each of its processes' job, counting tree's root and time at the last pass,
        and its time now. One its job counted then in a tree that counts now (a rank started by another rank, in
        that rank's tree until its own file was read) keeps its time: that tree no longer counts it (left out, the
        job's counter lost it, held flat until made up). One its job counted in a tree that ended since (the rank
        that started it), whose time as of then the job keeps, is counted from then (its whole time counted it
        twice)."""
        if tree.cpu_base is not None:
            return tree.cpu_base
        if tree.mapping.job_id not in self._cpu_floor:
            return 0.0
        base = 0.0
        for job_id, root, then, now in earlier:
            if job_id != tree.mapping.job_id:
                base += now         # not its job's at the last pass: counted from its first sample
            elif root not in alive_roots:
                base += then        # in the time its job keeps for the tree that ended
        return base

    def _reaped_jobs(self, live: list[_Tree], root_parents: dict[int, int],
                     tree_times: dict[int, dict[tuple[int, int], float]], job_of_pid: dict[int, str]
                     ) -> tuple[dict[tuple[int, int], tuple[str, dict[tuple[int, int], float]]], dict[str, float]]:
        """A job's root process whose parent is another (outer) job's counts in its own job, with its tree. Once its
        own job no longer counts it (its mapping file went as it ended, or it was reaped), the outer job would count
        its tree's processes from their start: directly while they live on in its tree, then in their reapers'
        cutime. The whole CPU time of each as its own job last counted it is taken off the outer job then, unless
        it left the outer job's tree alive (its parent not the outer job's). Each, not the root's alone: a worker
        alive until its trial ended (a persistent DataLoader worker) was counted again in the outer job, directly
        or in the root's time once the root reaped it.
        The same holds for a rank whose parent is another rank of its own job (a rank that spawns the others):
        the job keeps the ended rank's time (_note_departed, _measure) and its parent's cutime had it again.
        Returns the nested roots now and the time to take off each outer job now, for _measure to commit."""
        nested, reaped = {}, {}
        for tree in live:
            pid = tree.mapping.pid
            if pid in root_parents:
                # Its nearest ancestor in a job: one in between may be in no tree yet (started since the last walk),
                # and a short job then ended unseen as nested, its time counted again in the outer job's cutime.
                # The ancestors read with its file, while its parent is still the one they start with.
                parent = root_parents[pid]
                chain = tree.ancestors if tree.ancestors[:1] == (parent,) else (parent,)
                outer = next((job_of_pid[ancestor] for ancestor in chain if ancestor in job_of_pid), None)
                if outer is not None:
                    nested[(pid, tree.mapping.start_ticks)] = (outer, tree_times[pid])
        for root, (outer, times) in self._nested.items():
            if root in nested:
                continue
            for (pid, start_ticks), seconds in times.items():
                fields = self._read_stat(pid)
                if fields is None or int(fields[19]) != start_ticks or job_of_pid.get(int(fields[1])) == outer:
                    reaped[outer] = reaped.get(outer, 0.0) + seconds
        return nested, reaped

    def refresh_trees(self, now: float) -> None:
        """Re-walk every live tree to find processes started since the last walk (slow loop: the jobs and
        energy collectors both ask, so it walks once per `now`)."""
        if self._trees_refreshed_at == now:
            return
        with self._lock:
            trees = list(self._live)
        for tree in trees:
            members = self._discover(tree.mapping.pid, tree.mapping.start_ticks)
            with self._lock:
                tree.members = members
        self._trees_refreshed_at = now
        # The members found are measured at the next update, even one of this same `now` (the GPU collector's
        # slow sample may have updated before the energy collector walks and updates).
        self._updated_at = None


def _job_process(tree: _Tree) -> tuple[str, int, int]:
    """Which job's process a tree is: its job id, pid and start ticks. A process whose file for one job went as one for
    another job came (a long-lived worker that serves one job, then a rank of another: in one listing) was taken for
    the same file rewritten: its first job lost its time (no departure), and the other job, counting already, took
    its whole time in one sample (the first job's base, 0: counted twice)."""
    return tree.mapping.job_id, tree.mapping.pid, tree.mapping.start_ticks


class ProcessFamilies:
    """Descendants of a process from one reading of every process's parent, shared by the walks of a pass
    (the tree walk asks once per mapped process: psutil's children() reads every process on the host per call,
    so a pass cost mapped processes x host processes, ~9 ms per job on a host with 400 processes). The reading
    is reused for PARENTS_MAX_AGE seconds; a child started since is found at the next pass, and a pid that
    died or was reused since is weeded out by its parent read afresh (JobTracker._discover)."""

    def __init__(self, proc_root: str = "/proc", clock: Callable[[], float] = time.monotonic):
        self._proc_root, self._clock = proc_root, clock
        self._read: tuple[float, dict[int, list[int]]] | None = None

    def _children(self) -> dict[int, list[int]]:
        now = self._clock()
        read = self._read
        if read is None or now - read[0] > PARENTS_MAX_AGE:
            # Each process's parent from its /proc/PID/stat: psutil's process_iter made an object per process,
            # ~4x the CPU (a walk of ~300 processes, once a second while a job runs: ~20 -> ~5 ms).
            children: dict[int, list[int]] = {}
            for entry in os.scandir(self._proc_root):
                if not entry.name.isdigit():
                    continue
                try:
                    stat_text = read_bytes(f"{self._proc_root}/{entry.name}/stat")
                except NO_PROCESS:  # gone since the listing (another error fails the walk: see NO_PROCESS)
                    continue
                parent = int(stat_fields(stat_text)[1])
                children.setdefault(parent, []).append(int(entry.name))
            read = self._read = (now, children)
        return read[1]

    def __call__(self, pid: int) -> list[int]:
        children, found, waiting = self._children(), {}, [pid]
        while waiting:
            for child in children.get(waiting.pop(), ()):
                if child not in found and child != pid:     # no loop even in a reading taken mid-reparenting
                    found[child] = None
                    waiting.append(child)
        return list(found)


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
        cpu = CounterMetricFamily(Node.JOB_CPU_SECONDS,
                                  "CPU seconds of the job's whole process tree (user + system, reaped "
                                  "children included).", labels=["job_id"])
        rss = GaugeMetricFamily(Node.JOB_RSS,
                                "Resident memory summed over the job's process tree (shared pages count "
                                "once per process).", labels=["job_id"])
        count = GaugeMetricFamily(Node.JOB_PROCESSES, "Processes in the job's tree (DataLoader workers included).",
                                  labels=["job_id"])
        for job_id in sorted(usage):
            job = usage[job_id]
            cpu.add_metric([job_id], job.cpu_seconds)
            rss.add_metric([job_id], job.rss_bytes)
            count.add_metric([job_id], job.processes)
        yield cpu
        yield rss
        yield count
