"""Golden-file tests: the whole exposition text from /proc fixtures and a fake NVML, and promtool on it.

UPDATE_GOLDEN=1 rewrites the golden file; review the diff before committing it.
"""

import os
import re
import subprocess
import time

import pytest

from tests.exporters.exporter_fixtures import FIXTURES, build_fixture_host, parse_exposition
from trainmetrics.exporters.collectors import COLLECTORS
from trainmetrics.exporters.collectors.base import CollectorContext
from trainmetrics.exporters.collectors.jobs import JobTracker
from trainmetrics.exporters.exporter import Exporter
from trainmetrics.prometheus_process import find_binary

GOLDEN = FIXTURES / "golden" / "exporter.prom"
DURATION_LINE = re.compile(rb'^(exporter_collector_duration_seconds\{collector="[a-z]+"\}) .*$', re.MULTILINE)


def normalise(text: bytes) -> bytes:
    """Durations are the only values that differ between runs: zero them."""
    return DURATION_LINE.sub(rb"\1 0.0", text)


def render_fixtures() -> bytes:
    host = build_fixture_host()
    host.nvml.pending_xids = [(1, 79)]
    return host.sample_twice()


def test_exposition_matches_golden_file():
    text = normalise(render_fixtures())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_bytes(text)
    assert GOLDEN.exists(), "no golden file: run with UPDATE_GOLDEN=1 once and review it"
    assert text.decode() == GOLDEN.read_text()


def test_golden_values_follow_from_the_fixtures():
    """Spot checks computed by hand from the fixture files, so the golden file cannot be wrong silently."""
    metrics = parse_exposition(render_fixtures())
    # t0 -> t1: 20 busy-or-idle ticks elapsed in total, 9 of them idle -> 11/20 busy.
    assert metrics["system_cpu_utilization_ratio"][()] == pytest.approx(0.55)
    assert metrics["system_cpu_time_seconds_total"][(("cpu", "1"), ("mode", "user"))] == pytest.approx(12.02)
    # used = total - free - buffers - cached - slab_reclaimable, in KiB * 1024; the peak is t1's.
    assert metrics["system_memory_usage_bytes"][(("state", "used"),)] == (16_000_000 - 7_000_000 - 200_000 - 4_100_000 - 300_000) * 1024
    assert metrics["system_memory_used_peak_bytes"][()] == 4_400_000 * 1024
    # Partitions and loop devices are skipped; sectors are 512 bytes.
    devices = {dict(labels)["device"] for labels in metrics["system_disk_io_bytes_total"]}
    assert devices == {"nvme0n1", "sda", "dm-0"}
    assert metrics["system_disk_io_bytes_total"][(("device", "nvme0n1"), ("direction", "write"))] == 801_600 * 512
    # Real mounts only, each its own series (a bind mount too), escaped spaces decoded.
    mounts = {dict(labels)["mountpoint"] for labels in metrics["system_filesystem_limit_bytes"]}
    assert mounts == {"/", "/boot/efi", "/data", "/data/bind mount", "/mnt/nfs"}
    assert metrics["system_network_io_bytes_total"][(("device", "eth0"), ("direction", "receive"))] == 10_015_000
    # Processes: one each running/defunct/blocked/stopped/idle, three sleeping.
    assert metrics["system_processes"][(("status", "sleeping"),)] == 4
    assert metrics["system_processes"][(("status", "defunct"),)] == 1
    # Job mnist-1: root 4242 and its two DataLoader workers at t1, utime+stime+cutime+cstime / 100.
    assert metrics["process_tree_processes"] == {(("job_id", "mnist-1"),): 3}
    assert metrics["process_cpu_time_seconds_total"][(("job_id", "mnist-1"),)] == pytest.approx((530 + 105 + 50 + 10 + 310 + 21 + 290 + 26) / 100)
    assert metrics["process_memory_rss_bytes"][(("job_id", "mnist-1"),)] == (250_000 + 120_000 + 110_000) * 4096
    # GPU 0: utilisation 40 % then 90 %; pid 4242 is mnist-1's, pid 7777 nobody's.
    gpu0 = (("gpu", "0"), ("uuid", "GPU-0b7e1c3a-0000-4000-8000-000000000000"))
    assert metrics["hw_gpu_utilization_ratio"][gpu0] == pytest.approx(0.65)
    assert metrics["hw_gpu_utilization_peak_ratio"][gpu0] == pytest.approx(0.9)
    assert metrics["hw_gpu_process_memory_bytes"] == {(("gpu", "0"), ("job_id", "mnist-1")): 18 * 2**30}
    assert set(metrics["hw_gpu_job_info"]) == {tuple(sorted(gpu0 + (("job_id", "mnist-1"),)))}
    assert metrics["hw_gpu_errors_total"][(("gpu", "1"), ("type", "xid"), ("uuid", "GPU-5d2f9e81-0000-4000-8000-000000000001"))] == 1
    assert all(value == 1 for value in metrics["exporter_collector_success"].values())
    assert len(metrics["exporter_collector_success"]) == len(COLLECTORS)


def promtool_findings(text: bytes) -> set[str]:
    """promtool check metrics' complaints; it exits 0 only with none."""
    result = subprocess.run([find_binary("promtool"), "check", "metrics"], input=text, capture_output=True,
                            timeout=30)
    findings = set((result.stdout + result.stderr).decode().splitlines())
    assert result.returncode == (0 if not findings else 3), findings
    return findings


def test_promtool_finds_nothing_in_golden_output():
    assert promtool_findings(GOLDEN.read_bytes()) == set()


def test_promtool_finds_nothing_in_real_output(tmp_path):
    """The real collectors on this machine's /proc (GPU absent here: its series come from the golden test)."""
    context = CollectorContext(peak_window=1.0, job_tracker=JobTracker(tmp_path))
    exporter = Exporter([spec.load().build(context) for spec in COLLECTORS.values()])
    exporter.sample_slow(1.0)
    exporter.sample(time.monotonic())
    time.sleep(0.1)
    exporter.sample(time.monotonic())
    text = exporter.render()
    assert b"system_cpu_utilization_peak_ratio" in text and b"system_filesystem_limit_bytes" in text
    assert promtool_findings(text) == set()


def test_promtool_findings_are_not_swallowed():
    """Guards the two promtool tests above against passing vacuously."""
    assert promtool_findings(b"# HELP bad_total Things.\n# TYPE bad_total gauge\nbad_total 1\n") != set()
