"""The hardening suite's shared stack: one real Prometheus (deployable config and rules), real jobs in it,
`trainmetrics analytics` and `trainmetrics server` as child processes on loopback.

Built once per session (~20 s, mostly torch start-up of the jobs, which run at once). One job is killed
with SIGKILL as soon as Prometheus sees it running: test_zz_target_down.py (collected last) checks that the
deployable TargetDown alert fired for it, so its 30 s `for:` overlaps the other tests instead of adding to
the suite's time.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from trainmetrics.contract import JOB_ID_PATTERN
from tests.prometheus_proxy import CapturingProxy
from trainmetrics.prometheus_process import PrometheusServer, free_port

COMPLETED_JOBS = {"hard-srv-1": "default", "hard-cli-1": "alice"}   # job id -> owner
KILLED_JOB = "hard-kill-1"
MAX_UPLOAD_BYTES = 1 << 20


def trainmetrics(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainmetrics", *args]


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not up after {timeout}s: {log.read_text()[-2000:]}")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def hold_address(instance: str) -> socket.socket | None:
    """A socket listening on HOST:PORT that never answers (scrapes of it time out: `up` 0), so that no other
    server can bind it (a listener excludes even SO_REUSEADDR binds); None where it cannot be bound."""
    host, _, port = instance.rpartition(":")
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # past the killed server's TIME_WAITs
    try:
        holder.bind((host, int(port)))
        holder.listen(1)
    except OSError:
        holder.close()
        return None
    return holder


@dataclass
class Stack:
    prometheus: PrometheusServer
    analytics_url: str
    analytics: subprocess.Popen
    server_url: str
    server: subprocess.Popen
    data_dir: Path
    workdir: Path
    proxy: CapturingProxy
    killed_at: float = 0.0
    killed_instance: str = ""
    children: list[subprocess.Popen] = field(default_factory=list)
    # Holds the killed job's address, so no later job's server gets it: one that did answered the killed target's
    # scrapes (up 1), and TargetDown never fired (a clean-clone run).
    killed_port_holder: socket.socket | None = None

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def start_logged(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                **kwargs)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("hardening")
    server_port = free_port()
    prometheus = PrometheusServer(work / "prometheus", static_targets={"server": [f"127.0.0.1:{server_port}"]},
                                  job_server=f"http://127.0.0.1:{server_port}")   # its jobs through http_sd
    prometheus.start()
    data_dir = work / "data"
    data_dir.mkdir()
    analytics_port = free_port()
    processes: list[subprocess.Popen] = []
    proxy = CapturingProxy(prometheus.url)          # both services reach Prometheus only through it
    stack: Stack | None = None
    try:
        analytics = start_logged(trainmetrics("analytics", "--listen", f"127.0.0.1:{analytics_port}",
                                              "--prometheus-url", proxy.url), work / "analytics.log")
        processes.append(analytics)
        server = start_logged(trainmetrics("server", "--listen", f"127.0.0.1:{server_port}", "--data-dir",
                                           str(data_dir), "--prometheus-url", proxy.url, "--max-upload-bytes",
                                           str(MAX_UPLOAD_BYTES), "--linger-timeout", "10"),
                              work / "server.log")
        processes.append(server)
        common = ("--model", "mlp", "--dataset", "blobs", "--targets-dir", str(prometheus.targets_dir))
        victim = start_logged(trainmetrics("train", "--job-id", KILLED_JOB, "--epochs", "500", *common),
                              work / "victim.log", cwd=work)
        cli_job = start_logged(trainmetrics("train", "--job-id", "hard-cli-1", "--epochs", "1", "--owner",
                                            "alice", *common), work / "cli-job.log", cwd=work)
        processes += [victim, cli_job]
        analytics_url, server_url = f"http://127.0.0.1:{analytics_port}", f"http://127.0.0.1:{server_port}"
        wait_http(f"{server_url}/api/training/jobs", server, work / "server.log")
        submitted = httpx.post(f"{server_url}/api/training/jobs", timeout=30,
                               json={"dataset": "blobs", "epochs": 1, "job_id": "hard-srv-1"})
        assert submitted.status_code == 201, submitted.text
        wait_http(f"{analytics_url}/healthz", analytics, work / "analytics.log")
        stack = Stack(prometheus, analytics_url, analytics, server_url, server, data_dir, work, proxy,
                      children=processes)

        # The victim: SIGKILL once Prometheus has scraped it running (its targets file stays behind).
        running = prometheus.wait_for(f'trainer_job_state{{job_id="{KILLED_JOB}",state="running"}} == 1',
                                      timeout=90)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        stack.killed_at, stack.killed_instance = time.time(), running[0]["metric"]["instance"]
        stack.killed_port_holder = hold_address(stack.killed_instance)

        for job_id in COMPLETED_JOBS:
            prometheus.wait_for(f'last_over_time(trainer_job_state{{job_id="{job_id}",state="completed"}}[5m]) == 1',
                                timeout=120)
        # The server stores its job's report once the job has settled, asking Prometheus: done before the
        # tests count what reaches Prometheus.
        deadline = time.monotonic() + 60
        while not httpx.get(f"{server_url}/api/training/jobs/hard-srv-1", timeout=30).json().get("report_stored"):
            assert time.monotonic() < deadline, "the server never stored hard-srv-1's report"
            time.sleep(0.2)
        yield stack
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        proxy.close()
        prometheus.stop()
        if stack is not None and stack.killed_port_holder is not None:     # (test_zz_target_down ran elsewhere)
            stack.killed_port_holder.close()


@pytest.fixture(params=["analytics", "server"])
def base_url(request, stack) -> str:
    """The analytics routes, served standalone and by the job server."""
    return stack.analytics_url if request.param == "analytics" else stack.server_url


def assert_json_error(response: httpx.Response, *statuses: int) -> dict:
    """The response is one of `statuses` with the one error shape {"error": {"code", "message"}}."""
    assert response.status_code in statuses, (response.request.url, response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = json.loads(response.content)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str), error
    return error


@pytest.fixture(scope="session")
def json_error():
    return assert_json_error


@pytest.fixture(scope="session")
def rss():
    return rss_bytes


JOB_MATCHER = re.compile(r'job_id\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def assert_queries_safe(queries: list[str]) -> None:
    """Every job id in the PromQL is the whole value of an equality matcher and an allowlisted id; no job id
    in a regex matcher, ever."""
    for query in queries:
        matchers = JOB_MATCHER.findall(query)
        assert len(matchers) == len(re.findall(r"job_id\s*[=!]", query)), query     # no unquoted job_id=...
        for operator, value in matchers:
            assert operator == "=", query
            assert JOB_ID_PATTERN.fullmatch(value), (value, query)


@pytest.fixture(scope="session")
def queries_safe():
    return assert_queries_safe
