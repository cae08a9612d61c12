"""Which filesystems and disks the host series cover: a container's bind-mounted files are no filesystem, the
host's are read through --path.rootfs, and partitions are never counted beside their disk."""

import os
import threading
import time

import pytest

from trainmetrics.exporters.collectors.cpu import CpuCollector
from trainmetrics.exporters.collectors.disk import DiskCollector
from trainmetrics.exporters.collectors.filesystem import FilesystemCollector
from trainmetrics.exporters.collectors.network import NetworkCollector
from trainmetrics.exporters.exporter import Exporter
from tests.exporters.exporter_fixtures import parse_exposition
from tests.exporters.test_exporter_golden import promtool_findings

# A container's own mount table (Docker, host network and PID namespace): its overlay root, the files Docker
# bind-mounts from the host's disk, the job directory.
CONTAINER_MOUNTS = """overlay / overlay rw,relatime 0 0
/dev/vda /etc/resolv.conf ext4 rw,relatime 0 0
/dev/vda /etc/hosts ext4 rw,relatime 0 0
/dev/vda /var/lib/trainmetrics/jobs ext4 ro,relatime 0 0
proc /proc proc rw 0 0
"""
# The host's, as its init (pid 1) sees it.
HOST_MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
/dev/vdb /data xfs rw,relatime 0 0
overlay /var/lib/docker/overlay2/abc/merged overlay rw,relatime 0 0
"""


def statvfs_of(sizes: dict[str, int]):
    def statvfs(path: str) -> os.statvfs_result:
        blocks = sizes[path] // 4096
        return os.statvfs_result((4096, 4096, blocks, blocks // 2, blocks // 4, 0, 0, 0, 0, 255))
    return statvfs


def filesystems(collector: FilesystemCollector) -> dict[str, float]:
    collector.sample_slow(0.0)
    found = parse_exposition(_render(collector))
    return {dict(labels)["mountpoint"]: value for labels, value in found["system_filesystem_limit_bytes"].items()}


def _render(collector) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def test_a_bind_mounted_file_is_no_filesystem(tmp_path):
    """The host disk was published as mountpoint="/etc/hosts", the shortest of its bind mounts."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mounts").write_text(CONTAINER_MOUNTS)
    files = {"/etc/resolv.conf", "/etc/hosts"}
    collector = FilesystemCollector(proc, statvfs=statvfs_of({"/": 100 * 4096, "/var/lib/trainmetrics/jobs": 7 * 4096}),
                                    is_directory=lambda path: path not in files)
    assert filesystems(collector) == {"/": 100 * 4096, "/var/lib/trainmetrics/jobs": 7 * 4096}


def test_with_the_hosts_root_mounted_the_hosts_filesystems_are_published(tmp_path):
    """In the compose file's container the exporter saw its overlay as `/` and none of the host's other disks
    (a checkpoint disk filling up raised no FilesystemAlmostFull)."""
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "mounts").write_text(CONTAINER_MOUNTS)
    (proc / "1" / "mounts").write_text(HOST_MOUNTS)
    host = tmp_path / "host"
    (host / "data").mkdir(parents=True)
    collector = FilesystemCollector(proc, rootfs=host, statvfs=statvfs_of({f"{host}/": 100 * 4096,
                                                                           f"{host}/data": 50 * 4096}))
    assert filesystems(collector) == {"/": 100 * 4096, "/data": 50 * 4096}


def test_partitions_are_never_counted_beside_their_disk(tmp_path):
    """sdaa1 (the 27th disk's partition), vdab2, md0p1 and nbd0p1 were published as disks: a sum over devices
    counted their I/O twice. So is any device the kernel says is a partition, whatever its name."""
    proc, sys_block = tmp_path / "proc", tmp_path / "block"
    proc.mkdir()
    devices = ["sda", "sda1", "sdaa", "sdaa1", "vdab", "vdab2", "md0", "md0p1", "nbd0", "nbd0p1", "dm-0",
               "oddname", "oddname7"]
    (proc / "diskstats").write_text("".join(f"   8       {i} {name} 1 0 2 0 3 0 4 0 0 0 0 0 0 0 0 0 0\n"
                                            for i, name in enumerate(devices)))
    (sys_block / "oddname7").mkdir(parents=True)
    (sys_block / "oddname7" / "partition").write_text("7\n")
    collector = DiskCollector(proc, sys_block=sys_block)
    collector.sample(0.0)
    found = parse_exposition(_render(collector))
    assert sorted({dict(labels)["device"] for labels in found["system_disk_io_bytes_total"]}) == \
        ["dm-0", "md0", "nbd0", "oddname", "sda", "sdaa", "vdab"]


def test_a_cpu_count_that_goes_back_is_held_and_a_hotplugged_cpu_starts_again(tmp_path):
    """iowait "will decrease in certain conditions" (proc(5)): published as is, the counter went down and
    Prometheus read a reset (increase() counted its whole 400 s again in one 0.1 s step). A CPU taken offline and
    brought back starts its counts again: that is a reset."""
    from trainmetrics.exporters.collectors.cpu import CpuCollector
    from trainmetrics.exporters.exporter import Exporter
    from tests.exporters.exporter_fixtures import parse_exposition

    collector = CpuCollector(tmp_path, peak_window=1.0, clock_ticks=100)
    exporter = Exporter([collector])

    def published(now: float, idle: int, iowait: int) -> tuple[float, float]:
        (tmp_path / "stat").write_text(f"cpu  1000 0 500 {idle} {iowait} 0 0 0 0 0\n"
                                       f"cpu0 1000 0 500 {idle} {iowait} 0 0 0 0 0\nintr 1\n")
        exporter.sample(now)
        times = parse_exposition(exporter.render())["system_cpu_time_seconds_total"]
        return tuple(times[(("cpu", "0"), ("mode", mode))] for mode in ("idle", "iowait"))

    assert published(0.0, 900_000, 40_000) == (9000.0, 400.0)
    assert published(0.1, 900_013, 39_997) == (9000.13, 400.0)        # iowait 3 ticks back: held
    assert published(0.2, 900_020, 40_001) == (9000.2, 400.01)
    assert published(0.3, 1_000, 20) == (10.0, 0.2)                    # hotplugged: counts anew


def test_processes_another_user_owns_under_hidepid_are_left_out_not_a_failed_sample(tmp_path, monkeypatch):
    """/proc mounted with hidepid=1 and an exporter not run as root: another user's /proc/PID/stat is listed but
    not readable (EACCES). That failed every sample of the processes collector, which published nothing; such a
    process is left out, as hidepid=2 leaves it out of the listing."""
    from trainmetrics.exporters.collectors import processes

    for pid, state in ((1, "S"), (2, "R"), (3, "S")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (a b) c) {state} 1 1 1\n")
    read_bytes = processes.read_bytes

    def hidden(path: str) -> bytes:
        if path.endswith("/3/stat"):
            raise PermissionError(13, "Permission denied", path)
        return read_bytes(path)

    monkeypatch.setattr(processes, "read_bytes", hidden)
    collector = processes.ProcessesCollector(tmp_path)
    collector.sample_slow(0.0)
    (family,) = collector.collect()
    counts = {sample.labels["status"]: sample.value for sample in family.samples}
    assert (counts["sleeping"], counts["running"]) == (1, 1)


def cpu_sampler(tmp_path):
    """sample(now, busy, idle): a CPU collector with a 1 s window samples a /proc/stat whose 2 CPUs spent `busy`
    and `idle` more ticks since the sample before; returns the exposition's series."""
    exporter = Exporter([CpuCollector(tmp_path, peak_window=1.0, clock_ticks=100)])
    ticks = {"busy": 0, "idle": 0}

    def sample(now: float, busy: int, idle: int) -> dict:     # ticks of 2 CPUs since the sample before
        ticks["busy"] += busy
        ticks["idle"] += idle
        line = f"{ticks['busy']} 0 0 {ticks['idle']} 0 0 0 0 0 0"
        (tmp_path / "stat").write_text(f"cpu  {line}\ncpu0 {line}\nintr 1\n")
        exporter.sample(now)
        return parse_exposition(exporter.render())

    return sample


def test_the_mean_cpu_utilisation_weighs_each_sample_by_the_time_it_covers(tmp_path):
    """A sampler held up while the host is busy (its thread starved, the exporter's cgroup throttled) takes its
    next sample late, and that one sample covers the whole busy stretch. Counted as one sample among the on-time
    ones, a host fully busy for 0.7 s of a 1 s window read 0.25 (the analytics' host CPU average with it); its
    busy share over that second is 0.7."""
    sample = cpu_sampler(tmp_path)
    sample(0.0, 0, 0)
    sample(0.1, 0, 20)
    sample(0.2, 0, 20)
    sample(0.9, 140, 0)         # 0.7 s late, every CPU busy all along
    series = sample(1.0, 0, 20)
    assert series["system_cpu_utilization_peak_ratio"][()] == 1.0
    assert series["system_cpu_utilization_ratio"][()] == 0.7    # 140 of the window's 200 ticks


def test_a_late_cpu_sample_weighs_in_the_mean_only_with_its_part_inside_the_window(tmp_path):
    """A sample taken 1.5 s late covers a stretch that began before the window; it kept its whole weight while it
    was in the window, so a host busy until 0.1 s into a 1 s window and idle after read 0.625, six times its busy
    share over that second (0.1)."""
    sample = cpu_sampler(tmp_path)
    sample(0.0, 0, 0)
    sample(0.1, 0, 20)
    series = sample(1.6, 300, 0)        # 1.5 s late, every CPU busy all along
    assert series["system_cpu_utilization_ratio"][()] == 1.0
    for tenth in range(17, 26):
        series = sample(tenth / 10, 0, 20)
    # The window (1.5 s, 2.5 s]: 0.1 s of the late sample's busy stretch, then 0.9 s idle.
    assert series["system_cpu_utilization_ratio"][()] == pytest.approx(0.1)
    assert series["system_cpu_utilization_peak_ratio"][()] == 1.0


def test_every_mount_is_its_own_series_though_devices_share_a_name(tmp_path):
    """One mountpoint per device name hid the second s3fs bucket, overlay and btrfs subvolume (/home filling up
    raised no FilesystemAlmostFull); a mount stacked on another is the one statvfs sees there."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mounts").write_text("""/dev/sda2 / btrfs rw,subvol=/@ 0 0
/dev/sda2 /home btrfs rw,subvol=/@home 0 0
s3fs /mnt/bucket-a fuse.s3fs rw 0 0
s3fs /mnt/bucket-b fuse.s3fs rw 0 0
overlay /srv/merged-a overlay rw 0 0
overlay /srv/merged-b overlay rw 0 0
/dev/sdb1 /scratch ext4 rw 0 0
tmpfs /scratch tmpfs rw 0 0
/dev/sdc1 /data xfs rw 0 0
/dev/sdd1 /data ext4 rw 0 0
""")
    sizes = {"/": 100, "/home": 90, "/mnt/bucket-a": 10, "/mnt/bucket-b": 20, "/srv/merged-a": 30,
             "/srv/merged-b": 40, "/scratch": 50, "/data": 60}
    collector = FilesystemCollector(proc, statvfs=statvfs_of({path: blocks * 4096 for path, blocks in sizes.items()}),
                                    is_directory=lambda path: True)
    collector.sample_slow(0.0)
    limits = parse_exposition(_render(collector))["system_filesystem_limit_bytes"]
    assert {tuple(value for _name, value in labels): size / 4096 for labels, size in limits.items()} == {
        ("/dev/sda2", "btrfs", "/"): 100, ("/dev/sda2", "btrfs", "/home"): 90,
        ("s3fs", "fuse.s3fs", "/mnt/bucket-a"): 10, ("s3fs", "fuse.s3fs", "/mnt/bucket-b"): 20,
        ("overlay", "overlay", "/srv/merged-a"): 30, ("overlay", "overlay", "/srv/merged-b"): 40,
        ("/dev/sdd1", "ext4", "/data"): 60}


def test_an_interface_or_mountpoint_name_that_is_not_utf8_is_published_with_every_other(tmp_path):
    """Read as strict UTF-8, one interface named with a byte that is not (Linux takes any but '/', ':' and spaces)
    or one such mountpoint failed every sample of its collector: every interface's or filesystem's series were
    dropped. The exporter's whole text goes through promtool, the parser of record."""
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    counters = b": " + b" ".join(b"7" for _ in range(16)) + b"\n"
    (proc / "net" / "dev").write_bytes(b"Inter-|   Receive\n face |bytes\n" + b"  eth0" + counters +
                                       b"eth\xff" + counters)
    (proc / "mounts").write_bytes(b"/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /mnt/da\xfft xfs rw 0 0\n")
    seen = []

    def statvfs(path: str) -> os.statvfs_result:
        seen.append(os.fsencode(path))
        return os.statvfs_result((4096, 4096, 100, 50, 25, 0, 0, 0, 0, 255))

    exporter = Exporter([NetworkCollector(proc), FilesystemCollector(proc, statvfs=statvfs,
                                                                     is_directory=lambda path: True)])
    exporter.sample(0.0)
    exporter.sample_slow(0.0)
    text = exporter.render()
    assert promtool_findings(text) == set()
    found = parse_exposition(text)
    assert {dict(labels)["device"] for labels in found["system_network_io_bytes_total"]} == {"eth0", "eth\\xff"}
    assert {dict(labels)["mountpoint"] for labels in found["system_filesystem_limit_bytes"]} == {"/", "/mnt/da\\xfft"}
    assert b"/mnt/da\xfft" in seen         # statvfs asked about that very mount, by its bytes
    assert found["exporter_collector_success"] == {(("collector", "network"),): 1.0,
                                                   (("collector", "filesystem"),): 1.0}


def test_names_differing_only_in_bytes_that_are_not_utf8_are_series_of_their_own(tmp_path):
    """Each byte that is not UTF-8 was written U+FFFD: two interfaces, mountpoints or disks differing only in such
    a byte were one series twice, a duplicate Prometheus drops; and a disk so named failed the disk collector."""
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    counters = b": " + b" ".join(b"7" for _ in range(16)) + b"\n"
    (proc / "net" / "dev").write_bytes(b"Inter-|   Receive\n face |bytes\n" + b"eth\xff" + counters +
                                       b"eth\xfe" + counters)
    (proc / "mounts").write_bytes(b"/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /mnt/\xff xfs rw 0 0\n"
                                  b"/dev/sdc1 /mnt/\xfe xfs rw 0 0\n")
    (proc / "diskstats").write_bytes(b"   8  0 sd\xff 1 2 3 4 5 6 7 8 9 10 11\n"
                                     b"   8 16 sd\xfe 1 2 3 4 5 6 7 8 9 10 11\n")
    statvfs = statvfs_of({os.fsdecode(path): 4096 for path in (b"/", b"/mnt/\xff", b"/mnt/\xfe")})
    exporter = Exporter([NetworkCollector(proc), DiskCollector(proc, sys_block=tmp_path / "no-sys"),
                         FilesystemCollector(proc, statvfs=statvfs, is_directory=lambda path: True)])
    exporter.sample(0.0)
    exporter.sample_slow(0.0)
    text = exporter.render()
    assert promtool_findings(text) == set()
    found = parse_exposition(text)
    assert len(found["system_network_io_bytes_total"]) == text.count(b"\nsystem_network_io_bytes_total{") == 4
    assert {dict(labels)["device"] for labels in found["system_disk_io_bytes_total"]} == {"sd\\xff", "sd\\xfe"}
    assert {dict(labels)["mountpoint"] for labels in found["system_filesystem_limit_bytes"]} == {
        "/", "/mnt/\\xff", "/mnt/\\xfe"}
    assert text.count(b"\nsystem_filesystem_limit_bytes{") == 3


def test_a_mount_field_is_read_with_every_octal_escape_the_kernel_writes(tmp_path):
    """Only \\040, \\011, \\012 and \\134 were read: Linux 5.13 on also writes '#' as \\043, so /mnt/run#1 was
    published as /mnt/run\\0431 and statvfs of that path failed (the filesystem was dropped); a fuse type's
    escapes were published as they stand."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mounts").write_text("/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /mnt/run\\0431 xfs rw 0 0\n"
                                 "me@host:/a\\040b /mnt/my\\040disk\\012\\042x\\134 fuse.my\\040fs rw 0 0\n")
    collector = FilesystemCollector(proc, statvfs=statvfs_of({"/": 4096, "/mnt/run#1": 4096,
                                                              '/mnt/my disk\n"x\\': 4096}),
                                    is_directory=lambda path: True)
    collector.sample_slow(0.0)
    text = _render(collector)
    assert promtool_findings(text) == set()
    limits = parse_exposition(text)["system_filesystem_limit_bytes"]
    assert {tuple(value for _name, value in labels) for labels in limits} == {
        ("/dev/sda1", "ext4", "/"), ("/dev/sdb1", "xfs", "/mnt/run#1"),
        ("me@host:/a b", "fuse.my fs", '/mnt/my disk\n"x\\')}


def test_a_cpu_taken_offline_between_two_samples_is_no_busy_host(tmp_path):
    """The aggregate cpu line sums every possible CPU, an offline one's idle from another count than an online
    one's: when cpu1 went offline its idle in the sum stepped back, and the step between the two samples read as
    a fully busy host (utilisation peak 1.0) while cpu0 was half busy; when it came back, its idle stepped up and
    the mean read 0.25. A change in the CPUs online starts the
    utilisation again from that sample; its per-CPU counters never go back."""
    from trainmetrics.exporters.collectors.cpu import CpuCollector

    collector = CpuCollector(tmp_path, peak_window=10.0, clock_ticks=100)
    exporter = Exporter([collector])

    def sample(now: float, host: str, *cpus: str) -> dict:
        lines = [f"cpu  {host}"] + [f"cpu{n} {line}" for n, line in enumerate(cpus) if line]
        (tmp_path / "stat").write_text("\n".join(lines) + "\nintr 1\n")
        exporter.sample(now)
        return parse_exposition(exporter.render())

    sample(0.0, "0 0 0 2000 0 0 0 0 0 0", "0 0 0 1000 0 0 0 0 0 0", "0 0 0 1000 0 0 0 0 0 0")
    sample(0.1, "5 0 0 2000 0 0 0 0 0 0", "5 0 0 1005 0 0 0 0 0 0", "")      # cpu1 offline: 995 idle in the sum
    series = sample(0.2, "10 0 0 2005 0 0 0 0 0 0", "10 0 0 1010 0 0 0 0 0 0", "")
    assert series["system_cpu_utilization_peak_ratio"][()] == 0.5
    # cpu1 back: its 1000 idle ticks in the sum again, which read as 10 ticks of idle host in one step
    series = sample(0.3, "15 0 0 2015 0 0 0 0 0 0", "15 0 0 1015 0 0 0 0 0 0", "0 0 0 1000 0 0 0 0 0 0")
    assert (series["system_cpu_utilization_peak_ratio"][()], series["system_cpu_utilization_ratio"][()]) == (0.5, 0.5)
    times = series["system_cpu_time_seconds_total"]
    assert (times[(("cpu", "1"), ("mode", "idle"))], times[(("cpu", "0"), ("mode", "user"))]) == (10.0, 0.15)


def test_meminfo_without_slab_lines_is_read_with_no_reclaimable_slab(tmp_path):
    """gVisor's /proc/meminfo (GKE Sandbox) has no SReclaimable line: every sample of the memory collector failed
    and the host published no memory series at all."""
    from trainmetrics.exporters.collectors.memory import MemoryCollector

    (tmp_path / "meminfo").write_text("MemTotal:        1000 kB\nMemFree:          400 kB\nMemAvailable:     400 kB\n"
                                      "Buffers:            0 kB\nCached:           100 kB\nShmem:             10 kB\n")
    exporter = Exporter([MemoryCollector(tmp_path)])
    exporter.sample(0.0)
    series = parse_exposition(exporter.render())
    usage = {dict(labels)["state"]: value for labels, value in series["system_memory_usage_bytes"].items()}
    assert usage == {"used": 500 * 1024, "free": 400 * 1024, "buffers": 0, "cached": 100 * 1024,
                     "slab_reclaimable": 0}
    assert series["system_memory_used_peak_bytes"][()] == 500 * 1024


def test_a_dead_network_mount_leaves_out_that_mount_alone(tmp_path):
    """statvfs of a hard NFS mount whose server is gone never returns: the whole filesystem sample stalled, so the
    collector said 0 and dropped every filesystem's series, `/` with them (its disk-full alerts silenced), for as
    long as that server stayed away. Now only that mount is left out, until its call returns."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mounts").write_text("/dev/sda1 / ext4 rw 0 0\nnas:/export /mnt/nfs nfs4 rw 0 0\n")
    healthy, release = statvfs_of({"/": 100 * 4096, "/mnt/nfs": 4096}), threading.Event()

    def statvfs(path: str) -> os.statvfs_result:
        if path == "/mnt/nfs":
            release.wait(30)    # the server is gone
        return healthy(path)

    exporter = Exporter([FilesystemCollector(proc, statvfs=statvfs, is_directory=lambda path: True)],
                        sample_interval=0.05, slow_interval=0.1).start()
    def mountpoints() -> set[str]:
        found = parse_exposition(exporter.snapshot())
        assert found["exporter_collector_success"] == {(("collector", "filesystem"),): 1.0}
        return {dict(labels)["mountpoint"] for labels in found["system_filesystem_limit_bytes"]}

    try:
        time.sleep(2.5)         # past the slow loop's stall bound (1 s) and the mount's timeout
        assert mountpoints() == {"/"}
        release.set()           # the server is back
        time.sleep(1.0)
        assert mountpoints() == {"/", "/mnt/nfs"}
    finally:
        release.set()
        exporter.stop()
