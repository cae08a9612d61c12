"""Faults under the real `trainmetrics exporter` process: the job-mapping dir deleted while it runs, and
/proc entries vanishing between listing and reading (a job whose process tree churns short-lived children)."""

import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from trainmetrics.jobmap import JobMapping, write_job_mapping
from trainmetrics.prometheus_process import free_port

SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


def scrape(url: str) -> dict[tuple[str, str], float]:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200, response.text[:300]
    series = {}
    for line in response.text.splitlines():
        match = SAMPLE.match(line)
        if match:
            series[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return series


@pytest.fixture
def exporter(tmp_path):
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    port = free_port()
    log = open(tmp_path / "exporter.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "trainmetrics", "exporter", "--listen", f"127.0.0.1:{port}",
                                "--sample-interval", "0.1", "--job-dir", str(job_dir), "--no-collector.gpu"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline and process.poll() is None, (tmp_path / "exporter.log").read_text()
            time.sleep(0.1)
    yield url, job_dir, process
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    log.close()


def job_series(series, job_id: str) -> dict:
    return {key: value for key, value in series.items() if f'job_id="{job_id}"' in key[1]}


def collector_ok(series, name: str) -> float:
    return series[("exporter_collector_success", f'collector="{name}"')]


def wait_until(predicate, url: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series = scrape(url)
        if predicate(series):
            return series
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def test_job_mapping_dir_deleted_while_running(exporter, tmp_path):
    url, job_dir, _ = exporter
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_job_mapping(job_dir, JobMapping(job_id="map-1", pid=sleeper.pid, started=time.time()))
        wait_until(lambda s: job_series(s, "map-1"), url)
        shutil.rmtree(job_dir)
        for _ in range(20):                       # 2 s of scrapes: every one 200, the jobs collector healthy
            series = scrape(url)
            assert collector_ok(series, "jobs") == 1
            time.sleep(0.1)
        assert not job_series(series, "map-1")    # the mapping is gone, so is the attribution
        job_dir.mkdir()                           # and it comes back when the dir and the file do
        write_job_mapping(job_dir, JobMapping(job_id="map-1", pid=sleeper.pid, started=time.time()))
        wait_until(lambda s: job_series(s, "map-1"), url)
    finally:
        sleeper.kill()
        sleeper.wait()


CHURN = """
import subprocess, sys, time
end = time.monotonic() + 4
while time.monotonic() < end:
    children = [subprocess.Popen(["sleep", "0.2"]) for _ in range(4)]
    for child in children:
        child.wait()
"""


def test_proc_entries_vanishing_between_listing_and_reading(exporter):
    """A job whose tree spawns and reaps short-lived processes all the time: /proc/PID entries listed by the
    sampler disappear before they are read. Every scrape stays 200 with every collector succeeding."""
    url, job_dir, _ = exporter
    churn = subprocess.Popen([sys.executable, "-c", CHURN])
    try:
        write_job_mapping(job_dir, JobMapping(job_id="churn-1", pid=churn.pid, started=time.time()))
        scrapes, most_processes = 0, 0.0
        while churn.poll() is None:
            series = scrape(url)
            scrapes += 1
            failing = {key[1] for key, value in series.items() if key[0] == "exporter_collector_success" and value != 1}
            assert not failing, failing
            for key, value in job_series(series, "churn-1").items():
                if key[0] == "process_tree_processes":
                    most_processes = max(most_processes, value)
            time.sleep(0.05)
        assert churn.returncode == 0
        assert scrapes >= 20
        assert most_processes >= 2, "the churning children were never seen in the job's tree"
    finally:
        if churn.poll() is None:
            churn.kill()
        churn.wait()
