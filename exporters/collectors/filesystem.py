"""Filesystems: usage by state and size of real mounts (block devices, network filesystems, the root)."""

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from trainmetrics.exporters.collectors.base import Collector, CollectorContext, read_bytes

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


def unescape_mount_field(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def real_mounts(mounts_text: str, is_directory: Callable[[str], bool] = lambda mountpoint: True
                ) -> list[tuple[str, str]]:
    """(device, mountpoint) of each real filesystem, one mountpoint per device (the shortest directory: a file
    bind-mounted over another, as a container's /etc/hosts is, is no place a filesystem is used from)."""
    by_device: dict[str, str] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mountpoint, fs_type = fields[0], unescape_mount_field(fields[1]), fields[2]
        if mountpoint != "/" and (fs_type in PSEUDO_TYPES or (mountpoint + "/").startswith(PSEUDO_MOUNT_PREFIXES)):
            continue
        known = by_device.get(device)
        if (known is not None and len(mountpoint) >= len(known)) or not is_directory(mountpoint):
            continue
        by_device[device] = mountpoint
    return sorted(by_device.items(), key=lambda item: item[1])


class FilesystemCollector(Collector):
    """system_filesystem_usage_bytes{mountpoint,state}, system_filesystem_limit_bytes{mountpoint}."""

    name = "filesystem"
    slow = True  # statvfs can block on a network mount: keep it out of the fast loop

    def __init__(self, proc_root: Path | str = "/proc", statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 rootfs: Path | str = "/", is_directory: Callable[[str], bool] = os.path.isdir):
        self.proc_root = str(proc_root)
        self.statvfs, self.is_directory = statvfs, is_directory
        self.rootfs = str(rootfs)
        self._usage: list[tuple[str, int, int, int]] = []

    @classmethod
    def build(cls, context: CollectorContext) -> "FilesystemCollector":
        return cls(proc_root=context.proc_root, rootfs=context.rootfs)

    def _mounts(self) -> str:
        """The mount table: this process's, or with a host root filesystem mounted elsewhere (a container),
        the host's init's: a container's own has its overlay as `/` and the files Docker bind-mounts
        (/etc/hosts, a host disk's shortest mountpoint), and none of the host's other disks."""
        source = "mounts" if os.path.realpath(self.rootfs) == "/" else "1/mounts"
        return read_bytes(f"{self.proc_root}/{source}").decode()

    def _host(self, mountpoint: str) -> str:
        """Where a host mountpoint is seen from here."""
        return os.path.join(self.rootfs, mountpoint.lstrip("/"))

    def sample_slow(self, now: float) -> None:
        usage = []
        for _device, mountpoint in real_mounts(self._mounts(), lambda point: self.is_directory(self._host(point))):
            try:
                stat = self.statvfs(self._host(mountpoint))
            except OSError:
                continue  # unmounted since /proc/mounts was read, or not ours to see
            block = stat.f_frsize or stat.f_bsize
            usage.append((mountpoint, stat.f_blocks * block, stat.f_bfree * block, stat.f_bavail * block))
        self._usage = usage

    def collect(self):
        usage = GaugeMetricFamily("system_filesystem_usage_bytes",
                                  "Filesystem space by state (used, free to unprivileged users, reserved).",
                                  labels=["mountpoint", "state"])
        limit = GaugeMetricFamily("system_filesystem_limit_bytes", "Filesystem size.", labels=["mountpoint"])
        for mountpoint, size, free, available in self._usage:
            usage.add_metric([mountpoint, "used"], size - free)
            usage.add_metric([mountpoint, "free"], available)
            usage.add_metric([mountpoint, "reserved"], free - available)
            limit.add_metric([mountpoint], size)
        yield usage
        yield limit
