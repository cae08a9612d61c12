"""The job-mapping directory is untrusted input: whatever lands in it, the real `trainmetrics exporter` keeps
sampling, stays small and cheap, and attributes to a job only processes its mapping can prove it means."""

import itertools
import json
import os
import subprocess
import sys
import time

import pytest

from tests.hardening.exporter_process import collector_ok, job_series, start_exporter
from trainmetrics.jobmap import JobMapping, process_start_ticks, write_job_mapping

NOBODY = 65534


@pytest.fixture
def exporter(tmp_path):
    running = start_exporter(tmp_path)
    yield running
    running.stop()


@pytest.fixture
def sleeper():
    """A live process to map (a job stand-in), killed after the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def host_cpu_seconds(series: dict) -> float:
    """Sum of system_cpu_time_seconds_total: grows with every sample the cpu collector takes."""
    return sum(value for (name, _), value in series.items() if name == "system_cpu_time_seconds_total")


def test_a_fifo_in_the_job_dir_does_not_freeze_sampling(exporter, sleeper):
    """Opening a FIFO for reading waits for a writer: it froze the whole sampling loop for good while scrapes
    stayed 200 and every collector said success 1."""
    write_job_mapping(exporter.job_dir, JobMapping(job_id="real-1", pid=sleeper.pid))
    exporter.wait_until(lambda s: job_series(s, "real-1"))
    os.mkfifo(exporter.job_dir / "fifo.rank0.json")
    time.sleep(0.5)                                         # a few samples with the FIFO there
    before = exporter.scrape()
    after = exporter.wait_until(lambda s: host_cpu_seconds(s) > host_cpu_seconds(before), timeout=5)
    assert collector_ok(after, "jobs") == 1 and job_series(after, "real-1")
    # And the directory is still read (a process of its own: a process counts in the one job that counts it).
    second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_job_mapping(exporter.job_dir, JobMapping(job_id="real-2", pid=second.pid))
        exporter.wait_until(lambda s: job_series(s, "real-2"), timeout=5)
    finally:
        second.kill()
        second.wait()


def test_dev_zero_behind_a_symlink_and_huge_files_are_not_read(exporter, sleeper):
    """A symlink to /dev/zero grew the exporter to 1.4 GB in 8 s: only regular files of at most 64 KiB are read."""
    rss_before = exporter.rss_bytes()
    (exporter.job_dir / "zero.rank0.json").symlink_to("/dev/zero")
    with open(exporter.job_dir / "huge.rank0.json", "wb") as huge:    # sparse: costs no disk
        huge.truncate(1 << 30)
    with open(exporter.job_dir / "padded.rank0.json", "w") as padded:  # a real mapping, but 100 KiB long
        json.dump({"job_id": "padded", "pid": sleeper.pid, "start_ticks": process_start_ticks(sleeper.pid),
                   "pad": "x" * 100_000}, padded)
    write_job_mapping(exporter.job_dir, JobMapping(job_id="real-1", pid=sleeper.pid))
    series = exporter.wait_until(lambda s: job_series(s, "real-1"))
    time.sleep(1)
    series = exporter.scrape()
    assert collector_ok(series, "jobs") == 1 and not job_series(series, "padded")
    assert exporter.rss_bytes() - rss_before < 32 << 20


def test_ten_thousand_stale_files_cost_under_five_percent_of_a_core(exporter, sleeper):
    """kill -9 leaves a job's file behind; 10,000 of them cost 70 % of a core when every sample re-listed,
    re-stat'ed and re-checked them. CPU time of the exporter itself, measured loosely over seconds."""
    def cpu_share(seconds: float) -> float:
        started, cpu = time.monotonic(), exporter.cpu_seconds()
        time.sleep(seconds)
        return (exporter.cpu_seconds() - cpu) / (time.monotonic() - started)

    baseline = cpu_share(2)
    dead_pids = itertools.islice((pid for pid in range(30_000, 4_194_304) if not os.path.exists(f"/proc/{pid}")), 10_000)
    for index, pid in enumerate(dead_pids):
        with open(exporter.job_dir / f"stale-{index}.rank0.json", "w") as handle:
            json.dump({"job_id": f"stale-{index}", "pid": pid, "gpus": [0], "rank": 0, "start_ticks": 4242}, handle)
    write_job_mapping(exporter.job_dir, JobMapping(job_id="real-1", pid=sleeper.pid))
    exporter.wait_until(lambda s: job_series(s, "real-1"), timeout=20)   # the directory was read
    time.sleep(1)                                           # reading 10,000 new files once is allowed to cost
    loaded = cpu_share(3)
    assert loaded - baseline < 0.05, f"10,000 stale files: {loaded:.1%} of a core, {baseline:.1%} without"


def test_mappings_that_cannot_prove_their_process_are_refused(exporter, sleeper):
    """A mapping without start ticks for pid 1 attributed every process of the host to one job. A mapping must
    carry its process's start time, and it must be that of the live process."""
    job_dir = exporter.job_dir
    (job_dir / "init.rank0.json").write_text(json.dumps({"job_id": "init", "pid": 1}))
    (job_dir / "exporter.rank0.json").write_text(json.dumps({"job_id": "itself", "pid": exporter.process.pid}))
    write_job_mapping(job_dir, JobMapping(job_id="wrong-ticks", pid=sleeper.pid,
                                          start_ticks=process_start_ticks(sleeper.pid) + 1))
    write_job_mapping(job_dir, JobMapping(job_id="real-1", pid=sleeper.pid))
    exporter.wait_until(lambda s: job_series(s, "real-1"))
    time.sleep(0.5)
    series = exporter.scrape()
    assert [job for job in ("init", "itself", "wrong-ticks") if job_series(series, job)] == []
    assert series[("process_tree_processes", 'job_id="real-1"')] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_a_mapping_owned_by_another_user_than_its_process_is_refused(exporter, sleeper, tmp_path):
    """Start ticks are public (/proc/PID/stat): only the file's owner proves who wrote it. Root's files may name
    any process; anyone else's only their own."""
    stranger = subprocess.Popen(["sleep", "120"], user=NOBODY)
    try:
        for job_id, pid in (("claims-root", sleeper.pid), ("own", stranger.pid)):
            path = write_job_mapping(tmp_path / "staging", JobMapping(job_id=job_id, pid=pid))
            os.chown(path, NOBODY, NOBODY)              # nobody's file from the start, as nobody would write it
            os.replace(path, exporter.job_dir / path.name)
        series = exporter.wait_until(lambda s: job_series(s, "own"))
        time.sleep(0.5)
        assert not job_series(exporter.scrape(), "claims-root") and not job_series(series, "claims-root")
    finally:
        stranger.kill()
        stranger.wait()
