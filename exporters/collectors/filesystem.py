"""Filesystems: usage by state and size of real mounts (block devices, network filesystems, the root)."""

import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from trainmetrics.exporters.collectors.base import Collector, CollectorContext, label_text, read_bytes

log = logging.getLogger(__name__)

# Kernel and in-memory filesystems: node_exporter's default exclusions plus tmpfs/ramfs (memory, which
# the memory collector already counts) and squashfs/erofs (read-only images, always 100 % full).
PSEUDO_TYPES = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts", "devtmpfs",
    "efivarfs", "erofs", "fusectl", "fuse.lxcfs", "hugetlbfs", "iso9660", "mqueue", "nsfs", "proc",
    "procfs", "pstore", "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "sockfs", "squashfs", "sysfs",
    "tmpfs", "tracefs", "cpuset", "pipefs",
})
PSEUDO_MOUNT_PREFIXES = ("/proc/", "/sys/", "/dev/", "/run/credentials/", "/var/lib/docker/",
                         "/var/lib/containers/storage/", "/var/lib/kubelet/pods/")


# The kernel writes space, tab, newline, backslash and (Linux 5.13 on) '#' in a mount's device, mountpoint and
# type as octal escapes (`\040`); with '#' left escaped a mountpoint such as /mnt/run#1 was published as
# /mnt/run\0431, and statvfs of that path, which does not exist, dropped the filesystem.
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# How long a mount's stat and statvfs may take before it is left out: well inside the slow loop's stall bound (1 s
# and up), which a hung call took whole, every filesystem's series dropped with it.
MOUNT_TIMEOUT_SECONDS = 0.5


def unescape_mount_field(field: str) -> str:
    """A field of /proc/mounts as the text it stands for: each octal escape the character it names."""
    return OCTAL_ESCAPE.sub(lambda escape: chr(int(escape.group(1), 8)), field)


def real_mounts(mounts_text: str, is_directory: Callable[[str], bool] = lambda mountpoint: True
                ) -> list[tuple[str, str, str]]:
    """(device, mountpoint, fstype) of each real filesystem's mount, one per mountpoint: its identity (a device
    name is none: every tmpfs, overlay or s3fs is named so, two btrfs subvolumes share their disk's). Of mounts
    stacked on one mountpoint the last, the one seen there; a file bind-mounted over another, as a container's
    /etc/hosts is, is no place a filesystem is used from."""
    by_mountpoint: dict[str, tuple[str, str]] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mountpoint = unescape_mount_field(fields[1])
        by_mountpoint.pop(mountpoint, None)     # moved to the end: the order of the table is the order mounted
        by_mountpoint[mountpoint] = (fields[0], unescape_mount_field(fields[2]))
    mounts = []
    for mountpoint, (device, fs_type) in by_mountpoint.items():
        if mountpoint != "/" and (fs_type in PSEUDO_TYPES or (mountpoint + "/").startswith(PSEUDO_MOUNT_PREFIXES)):
            continue
        if is_directory(mountpoint):
            mounts.append((unescape_mount_field(device), mountpoint, fs_type))
    return sorted(mounts, key=lambda mount: mount[1])


class MountReader:
    """Calls read(path) on a thread of its own and waits at most `timeout` for it. A hard NFS mount whose server is
    gone blocks stat and statvfs until it is back: that mount is then `stuck`, left out and not asked again until
    its call returns, and a new thread reads the others (the stuck one ends once its call returns)."""

    def __init__(self, read: Callable[[str], object], timeout: float):
        self.read, self.timeout = read, timeout
        self.stuck: set[str] = set()
        self._lock = threading.Lock()   # a reply is either answered or abandoned, never both
        self._requests: queue.SimpleQueue | None = None

    def __call__(self, path: str):
        """read(path)'s result (its exception raised), or None while the path's call has not returned."""
        if path in self.stuck:
            return None
        if self._requests is None:
            self._requests = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(self._requests,), name="exporter-filesystem-reader",
                             daemon=True).start()
        reply = {"done": threading.Event()}
        self._requests.put((path, reply))
        if not reply["done"].wait(self.timeout):
            with self._lock:
                if not reply["done"].is_set():
                    reply["abandoned"] = True
                    self.stuck.add(path)
                    self._requests = None     # its thread is held by this call: the next one starts a new one
                    log.warning("filesystem %s: no answer in %.1fs, left out until it answers", path, self.timeout)
                    return None
        if "error" in reply:
            raise reply["error"]
        return reply["result"]

    def _serve(self, requests: queue.SimpleQueue) -> None:
        while (request := requests.get()) is not None:
            path, reply = request
            try:
                reply["result"] = self.read(path)
            except Exception as error:  # raised in the sample, as when it called read itself
                reply["error"] = error
            with self._lock:
                reply["done"].set()
                if reply.get("abandoned"):
                    self.stuck.discard(path)
                    log.info("filesystem %s answers again", path)
                    return

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
            self._requests = None


class FilesystemCollector(Collector):
    """system_filesystem_usage_bytes{device,fstype,mountpoint,state}, system_filesystem_limit_bytes{device,fstype,
    mountpoint}: one series per mountpoint."""

    name = "filesystem"
    slow = True  # statvfs can block on a network mount: keep it out of the fast loop

    def __init__(self, proc_root: Path | str = "/proc", statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 rootfs: Path | str = "/", is_directory: Callable[[str], bool] = os.path.isdir):
        self.proc_root = str(proc_root)
        self.statvfs, self.is_directory = statvfs, is_directory
        self.rootfs = str(rootfs)
        self._usage: list[tuple[tuple[str, str, str], int, int, int]] = []  # (device, fstype, mountpoint), sizes
        self._reader = MountReader(self._stat, MOUNT_TIMEOUT_SECONDS)

    @classmethod
    def build(cls, context: CollectorContext) -> "FilesystemCollector":
        return cls(proc_root=context.proc_root, rootfs=context.rootfs)

    def _mounts(self) -> str:
        """The mount table: this process's, or with a host root filesystem mounted elsewhere (a container),
        the host's init's: a container's own has its overlay as `/` and the files Docker bind-mounts
        (/etc/hosts, a host disk's shortest mountpoint), and none of the host's other disks."""
        source = "mounts" if os.path.realpath(self.rootfs) == "/" else "1/mounts"
        # Read as paths are: a mountpoint that is not UTF-8 failed every sample, every filesystem's series dropped;
        # its bytes kept this way, statvfs reads that very mount (and its label writes such a byte `\xNN`).
        return os.fsdecode(read_bytes(f"{self.proc_root}/{source}"))

    def _host(self, mountpoint: str) -> str:
        """Where a host mountpoint is seen from here."""
        return os.path.join(self.rootfs, mountpoint.lstrip("/"))

    def _stat(self, path: str) -> os.statvfs_result | None:
        """The filesystem's sizes, or None where the mountpoint is no directory (a bind-mounted file)."""
        return self.statvfs(path) if self.is_directory(path) else None

    def sample_slow(self, now: float) -> None:
        usage = []
        for device, mountpoint, fs_type in real_mounts(self._mounts()):
            try:
                stat = self._reader(self._host(mountpoint))
            except OSError:
                continue  # unmounted since /proc/mounts was read, or not ours to see
            self.progressed()   # several mounts of one dead server each wait their timeout: no stall of the sample
            if stat is None:
                continue  # no directory, or a mount that does not answer
            block = stat.f_frsize or stat.f_bsize
            labels = (label_text(device), label_text(fs_type), label_text(mountpoint))
            usage.append((labels, stat.f_blocks * block, stat.f_bfree * block, stat.f_bavail * block))
        self._usage = usage

    def collect(self):
        usage = GaugeMetricFamily("system_filesystem_usage_bytes",
                                  "Filesystem space by state (used, free to unprivileged users, reserved).",
                                  labels=["device", "fstype", "mountpoint", "state"])
        limit = GaugeMetricFamily("system_filesystem_limit_bytes", "Filesystem size.",
                                  labels=["device", "fstype", "mountpoint"])
        for mount, size, free, available in self._usage:
            usage.add_metric([*mount, "used"], size - free)
            usage.add_metric([*mount, "free"], available)
            usage.add_metric([*mount, "reserved"], free - available)
            limit.add_metric(list(mount), size)
        yield usage
        yield limit

    def close(self) -> None:
        self._reader.close()
