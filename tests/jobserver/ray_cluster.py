"""A real Ray cluster on loopback for the tests: a head and a second node (`ray start --block`, one CPU each, so
a 2-rank job spans both, and one GPU each as Ray counts them: Ray only accounts for it, and names it in a rank's
CUDA_VISIBLE_DEVICES; torch finds no CUDA here and trains on the CPU), in their own process groups, stopped by ending those groups (a `ray start --block`
outlives a SIGTERM to its group; nothing else on the machine is touched: no `ray stop`)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainmetrics.prometheus_process import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class RayCluster:
    """Two Ray nodes on 127.0.0.1; `dashboard` is the Jobs API's address."""

    def __init__(self, env: dict[str, str] | None = None):
        """`env`: more variables for every node (Ray's own settings, `RAY_<name>`)."""
        # Ray's sockets live under its temp dir: a short path (unix sockets allow ~107 characters).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}

    def _start_node(self, *args: str) -> None:
        log = open(self.temp_dir / f"node{len(self.nodes)}.log", "wb")
        # Every port a node would take at Ray's fixed default given free: a cluster another run left on this host
        # held the dashboard agent's 52365 (and the client server's 10001), and the new head's Jobs API handed its
        # submissions to that cluster's agent: "Ray did not answer", nothing trained.
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port())]
        self.nodes.append(subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "1",
                                            "--node-ip-address", "127.0.0.1", *ports,
                                            "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *args],
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, env=self.env))
        log.close()

    def start(self, timeout: float = 120) -> "RayCluster":
        """Start the head, wait for its Jobs API, add the second node and wait until Ray counts two; stopped again
        when that fails (a head left running by a start that raised outlived the tests)."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> "RayCluster":
        self._start_node("--head", "--port", str(self.port), "--include-dashboard", "true", "--dashboard-host",
                         "127.0.0.1", "--dashboard-port", str(self.dashboard_port))
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            try:
                JobSubmissionClient(self.dashboard).list_jobs()
                break
            except Exception:
                self._check_alive(deadline)
                time.sleep(0.5)
        self._start_node("--address", f"127.0.0.1:{self.port}")
        while self.alive_nodes() < 2:
            self._check_alive(deadline)
            time.sleep(0.5)
        return self

    def alive_nodes(self) -> int:
        """Nodes the head counts alive (asked of its status command)."""
        status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{self.port}"], capture_output=True,
                                text=True, timeout=60, env=self.env)
        return status.stdout.count(" node_")

    def _check_alive(self, deadline: float) -> None:
        for node in self.nodes:
            if node.poll() is not None:
                raise RuntimeError("a Ray node exited: " + self.logs())
        if time.monotonic() > deadline:
            raise RuntimeError("the Ray cluster did not come up: " + self.logs())

    def logs(self) -> str:
        """The nodes' own output, for failure messages."""
        return "\n".join(path.read_text(errors="replace")[-1500:] for path in sorted(self.temp_dir.glob("node*.log")))

    def stop(self) -> None:
        """End both nodes' process groups (SIGTERM, then SIGKILL), and remove the temp dir."""
        for node in reversed(self.nodes):
            for signum, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
                try:
                    os.killpg(node.pid, signum)
                except ProcessLookupError:
                    break
                try:
                    node.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(node.pid, signal.SIGKILL)      # its daemons, should the leader have gone first
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
