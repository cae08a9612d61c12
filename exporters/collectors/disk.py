"""Disk: bytes and completed operations per block device and direction from /proc/diskstats."""

import os
import re
from pathlib import Path

from prometheus_client.core import CounterMetricFamily

from trainmetrics.exporters.collectors.base import Collector, CollectorContext, label_text, read_bytes

# Skip RAM/loop devices and partitions, whose I/O their disk already counts: node_exporter's default, with
# disk names of several letters (sdaa1, the 27th disk's) and md/nbd partitions; and any device the kernel
# says is a partition (/sys/class/block/DEV/partition), whatever its name.
IGNORED_DEVICES = re.compile(r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]+|nvme\d+n\d+p|mmcblk\d+p|md\d+p|nbd\d+p)\d+$")
SYS_BLOCK = Path("/sys/class/block")
SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's sector size


class DiskCollector(Collector):
    """system_disk_io_bytes_total{device,direction}, system_disk_operations_total{device,direction}."""

    name = "disk"
    fast = True

    def __init__(self, proc_root: Path | str = "/proc", ignored_devices: re.Pattern = IGNORED_DEVICES,
                 sys_block: Path | str = SYS_BLOCK):
        self.proc_root = str(proc_root)
        self.ignored_devices = ignored_devices
        self.sys_block = str(sys_block)
        self._ignored: dict[str, bool] = {}       # per device name, asked once
        self._devices: list[tuple[str, int, int, int, int]] = []

    def _is_ignored(self, device: str) -> bool:
        ignored = self._ignored.get(device)
        if ignored is None:
            ignored = bool(self.ignored_devices.match(device)) or \
                os.path.exists(f"{self.sys_block}/{device}/partition")
            if len(self._ignored) < 4096:
                self._ignored[device] = ignored
        return ignored

    @classmethod
    def build(cls, context: CollectorContext) -> "DiskCollector":
        return cls(proc_root=context.proc_root)

    def sample(self, now: float) -> None:
        devices = []
        for line in read_bytes(f"{self.proc_root}/diskstats").split(b"\n"):
            fields = line.split()
            if len(fields) < 10:
                continue
            device = os.fsdecode(fields[2])   # strict UTF-8 failed every sample on one name that is not
            if self._is_ignored(device):
                continue
            devices.append((label_text(device), int(fields[3]), int(fields[5]), int(fields[7]), int(fields[9])))
        self._devices = devices

    def collect(self):
        io = CounterMetricFamily("system_disk_io_bytes_total", "Bytes read from and written to each disk.",
                                 labels=["device", "direction"])
        operations = CounterMetricFamily("system_disk_operations_total",
                                         "Completed read and write operations of each disk.",
                                         labels=["device", "direction"])
        for device, reads, read_sectors, writes, written_sectors in self._devices:
            io.add_metric([device, "read"], read_sectors * SECTOR_BYTES)
            io.add_metric([device, "write"], written_sectors * SECTOR_BYTES)
            operations.add_metric([device, "read"], reads)
            operations.add_metric([device, "write"], writes)
        yield io
        yield operations
