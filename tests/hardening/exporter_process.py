"""The real `trainmetrics exporter` as a child process, for the exporter's fault tests: start it, scrape it, read
its CPU time and thread count from /proc, stop it."""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from trainmetrics.prometheus_process import free_port

SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


def parse(text: str) -> dict[tuple[str, str], float]:
    """{(name, labels as written): value} from exposition text."""
    series = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            series[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return series


def job_series(series: dict, job_id: str) -> dict:
    """The series of one job."""
    return {key: value for key, value in series.items() if f'job_id="{job_id}"' in key[1]}


def collector_ok(series: dict, name: str) -> float:
    """exporter_collector_success of one collector."""
    return series[("exporter_collector_success", f'collector="{name}"')]


@dataclass
class ExporterProcess:
    """A running exporter: its process, /metrics URL, job dir and log file."""

    process: subprocess.Popen
    port: int
    job_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def scrape(self) -> dict[tuple[str, str], float]:
        """One scrape, which must answer 200."""
        response = httpx.get(self.url, timeout=5)
        assert response.status_code == 200, response.text[:300]
        return parse(response.text)

    def wait_until(self, predicate, timeout: float = 10) -> dict:
        """Scrape until predicate(series) holds; the series that satisfied it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            series = self.scrape()
            if predicate(series):
                return series
            time.sleep(0.1)
        raise AssertionError(f"condition not met within {timeout}s; log: {self.log.read_text()[-2000:]}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the exporter used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        """The exporter's resident memory."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE).group(1)) * 1024

    def threads(self) -> int:
        """The exporter's thread count."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)$", status, re.MULTILINE).group(1))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_exporter(workdir: Path, *args: str) -> ExporterProcess:
    """`trainmetrics exporter` sampling at 10 Hz on a free port with a job dir under workdir (gpu collector off),
    once it answers /metrics."""
    job_dir = workdir / "jobs"
    job_dir.mkdir(exist_ok=True)
    port = free_port()
    log = workdir / "exporter.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", "trainmetrics", "exporter", "--listen", f"127.0.0.1:{port}",
                                    "--sample-interval", "0.1", "--job-dir", str(job_dir), "--no-collector.gpu",
                                    *args], stdout=handle, stderr=subprocess.STDOUT)
    exporter = ExporterProcess(process, port, job_dir, log)
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=1) as poller:     # one for every poll: httpx.get() builds a TLS context each time
        while True:
            try:
                if poller.get(exporter.url).status_code == 200:
                    return exporter
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
