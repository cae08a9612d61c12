"""End to end: the exporter process, a real job process tree, a real Prometheus scraping every 250 ms."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainmetrics.jobmap import JobMapping, write_job_mapping
from trainmetrics.prometheus_process import free_port

REPO = Path(__file__).resolve().parents[2]
# A stand-in for a training job: burns CPU in its main process and keeps a DataLoader-like worker.
JOB_SCRIPT = r"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("ready", worker.pid, flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    sum(range(20000))
    time.sleep(0.002)
"""


@pytest.mark.slow
def test_job_series_reach_prometheus_and_go_when_the_job_ends(tmp_path, prometheus_factory):
    job_dir = tmp_path / "jobs"
    port = free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "exporters", "--listen", f"127.0.0.1:{port}",
                                 "--job-dir", str(job_dir), "--sample-interval", "0.1", "--peak-window", "1s"],
                                cwd=REPO, stderr=subprocess.PIPE, text=True)
    job = subprocess.Popen([sys.executable, "-c", JOB_SCRIPT], stdout=subprocess.PIPE, text=True)
    worker_pid = None
    try:
        _ready, worker_pid = job.stdout.readline().split()
        mapping = write_job_mapping(job_dir, JobMapping(job_id="e2e-1", pid=job.pid, started=time.time()))
        prometheus = prometheus_factory(static_targets={"exporter": [f"127.0.0.1:{port}"]})

        count = prometheus.wait_for('process_tree_processes{job="exporter",job_id="e2e-1"}', timeout=30)
        assert float(count[0]["value"][1]) == 2  # the job and its worker
        prometheus.wait_for('rate(process_cpu_time_seconds_total{job_id="e2e-1"}[2s]) > 0', timeout=20)
        prometheus.wait_for('process_memory_rss_bytes{job_id="e2e-1"} > 0', timeout=10)
        prometheus.wait_for('system_cpu_utilization_peak_ratio >= system_cpu_utilization_ratio', timeout=10)
        assert prometheus.query('exporter_collector_success{collector="jobs"}')[0]["value"][1] == "1"

        mapping.unlink()
        prometheus.wait_for('process_tree_processes{job_id="e2e-1"}', timeout=10, predicate=lambda result: result == [])
    finally:
        exporter.terminate()
        _, stderr = exporter.communicate(timeout=10)
        if worker_pid is not None:
            os.kill(int(worker_pid), signal.SIGKILL)  # it holds the job's stdout open
        job.kill()
        job.communicate(timeout=10)
    assert exporter.returncode == 0, stderr
