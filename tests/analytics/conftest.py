"""Helpers for analytics tests: the real service on a free port, real jobs, a capturing MockTransport."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn

from analytics.app import Settings, create_app
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer, free_port


@contextmanager
def serve(settings: Settings):
    """The analytics app under real uvicorn on a free loopback port; yields an httpx.Client for it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                          log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "analytics server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class CapturingTransport(httpx.MockTransport):
    """A MockTransport that records every request it is asked to send to 'Prometheus'."""

    def __init__(self, handler):
        self.requests: list[httpx.Request] = []

        def record(request: httpx.Request):
            self.requests.append(request)
            return handler(request)

        super().__init__(record)

    def queries(self) -> list[str]:
        """The PromQL of every query received."""
        return [self.params(request).get("query", "") for request in self.requests]

    @staticmethod
    def params(request: httpx.Request) -> dict[str, str]:
        """The API parameters of a request: its form body (the client POSTs queries), else its URL."""
        if request.method == "POST":
            return dict(urllib.parse.parse_qsl(request.content.decode()))
        return dict(request.url.params)


def empty_vector(request: httpx.Request) -> httpx.Response:
    """A Prometheus that knows nothing: every query answers an empty vector, /-/ready answers 200."""
    if request.url.path == "/-/ready":
        return httpx.Response(200, text="Prometheus Server is Ready.\n")
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})


# ----- real jobs ----------------------------------------------------------------------------------------

def train_command(*args: str) -> list[str]:
    """The real `trainmetrics train` command line."""
    return [sys.executable, "-m", "trainmetrics", "train", *args]


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* step=\d+ samples=\d+ loss=(\S+) ")


@dataclass
class RealJob:
    """A finished `trainmetrics train` run: its exit code, summary line and logged losses."""

    job_id: str
    returncode: int
    summary: dict
    stderr: str
    # (unix time of the log line, loss) per log interval, in order
    logged_losses: list[tuple[float, float]] = field(default_factory=list)

    def held_losses(self, at_least: float, after: float) -> list[float]:
        """Losses logged after `after` that stayed published for at least `at_least` seconds (till the next
        log line, or the end for the last one)."""
        times = [t for t, _ in self.logged_losses] + [self.summary["end_time"]]
        return [loss for (t, loss), following in zip(self.logged_losses, times[1:])
                if t >= after and following - t >= at_least]


def finish(job_id: str, process: subprocess.Popen, stderr_lines: list[str], timeout: float = 120) -> RealJob:
    """Wait for a started job and parse what it printed."""
    stdout, stderr_rest = process.communicate(timeout=timeout)
    stderr = "".join(stderr_lines) + stderr_rest
    summaries = [line for line in stdout.splitlines() if line.startswith("summary ")]
    assert summaries, f"job {job_id}: no summary line\n{stdout}\n{stderr}"
    losses = []
    for line in stderr.splitlines():
        match = LOG_LINE.match(line)
        if match and match.group(2) != "None":
            logged = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            losses.append((logged, float(match.group(2))))
    return RealJob(job_id, process.returncode, json.loads(summaries[-1][len("summary "):]), stderr, losses)


def start_job(job_id: str, targets_dir: Path, *args: str) -> subprocess.Popen:
    """Start `trainmetrics train` announced to Prometheus through targets_dir."""
    return subprocess.Popen(train_command("--job-id", job_id, "--targets-dir", str(targets_dir), *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent)


def read_until(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read stderr lines until one contains needle; return them."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n{''.join(lines)}")


# What must agree between Prometheus and the store it remote-writes to before the tests read the store.
ARRIVED = ("count(last_over_time(trainer_job_end_timestamp_seconds[10m]))",
           "sum(max_over_time(trainer_samples_total[10m]))",
           "count(count_over_time(trainer_loss[10m]))",
           "sum(count_over_time(trainer_loss[10m]))")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A real Prometheus remote-writing into a real VictoriaMetrics, and three real jobs that have exited:
    completed, failed and cancelled. Yields ({backend name: server}, jobs); both backends hold every sample.

    The three run at once (each pays ~6 s of interpreter and torch start-up); the module's tests share them.
    """
    victoria = VictoriaMetricsServer(tmp_path_factory.mktemp("victoria")).start()
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"),
                                  remote_write=[victoria.remote_write_url]).start()
    work = tmp_path_factory.mktemp("jobs")
    processes: list[subprocess.Popen] = []
    try:
        common = ("--model", "mlp", "--dataset", "blobs")
        done = start_job("done-1", prometheus.targets_dir, *common, "--epochs", "6", "--log-every", "10",
                         "--owner", "alice", "--checkpoint-dir", str(work / "done"))
        processes.append(done)
        fail_ckpt = work / "fail"
        failing = start_job("fail-1", prometheus.targets_dir, *common, "--epochs", "50", "--batch-size", "16",
                            "--log-every", "10", "--owner", "bob", "--checkpoint-dir", str(fail_ckpt),
                            "--checkpoint-every", "5")
        # Long log intervals: some of its losses stay published for over a second, so they must be scraped.
        cancelled = start_job("cancel-1", prometheus.targets_dir, *common, "--epochs", "50", "--batch-size", "16",
                              "--log-every", "150", "--owner", "bob")
        processes += [failing, cancelled]
        fail_lines = read_until(failing, "step=10 ")
        # The checkpoint dir turns into a file: the next checkpoint write fails for real. (A rename, not a
        # removal: the job may be writing a checkpoint into it right now.)
        fail_ckpt.rename(work / "fail-moved")
        fail_ckpt.write_text("not a directory")
        # Cancel once Prometheus scrapes the job and three more losses were logged, so its rates and some
        # long-held losses are measured before the end.
        prometheus.wait_for('trainer_samples_total{job_id="cancel-1"} > 0', timeout=30)
        cancel_lines = []
        for _ in range(3):
            cancel_lines += read_until(cancelled, " loss=")
        cancelled.send_signal(signal.SIGTERM)
        jobs = {job.job_id: job for job in (finish("done-1", done, []), finish("fail-1", failing, fail_lines),
                                            finish("cancel-1", cancelled, cancel_lines))}
        victoria.wait_until_agrees(prometheus, ARRIVED)
        yield {"prometheus": prometheus, "victoria-metrics": victoria}, jobs
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
        prometheus.stop()
        victoria.stop()
