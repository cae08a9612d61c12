"""`trainmetrics server` as a child process, for the job server's tests and the hardening suite."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from trainmetrics.prometheus_process import free_port

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab", "@metrics": "scraper-token-0123456789"}


class Server:
    """`trainmetrics server` as a child process."""

    def __init__(self, data_dir: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        """With `cwd`, it runs there and is given the data dir relative to it."""
        self.data_dir, self.extra, self.env, self.cwd = data_dir, extra, env, cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._chosen_port = self.port       # a port a caller set (for a Prometheus config) is not changed
        self.process: subprocess.Popen | None = None
        self.clients: list[httpx.Client] = []

    def start(self, tries: int = 3) -> "Server":
        """Start it and wait until it supervises jobs. A port it chose itself that another process took between
        free_port() and the bind (a parallel worker's job, a restart's port given out again) is chosen anew."""
        data_dir = os.path.relpath(self.data_dir, self.cwd) if self.cwd else str(self.data_dir)
        command = [sys.executable, "-m", "trainmetrics", "server", "--listen", f"127.0.0.1:{self.port}",
                   "--data-dir", data_dir, "--linger-timeout", "10", *self.extra]
        with open(self.data_dir / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=self.cwd,
                                            env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + 60
        # One client for every poll: httpx.get() builds one each time, with a TLS context (~25 ms of CPU).
        with httpx.Client(timeout=1) as poller:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    health = poller.get(f"{self.url}/healthz")
                    if health.json()["checks"]["jobs"]["status"] == "ok":     # supervising (Prometheus may be absent)
                        return self
                except (httpx.TransportError, ValueError, KeyError, TypeError):     # not up, or another process's
                    pass
                time.sleep(0.1)
        said = (self.data_dir / "server.log").read_text()[-2000:]
        if self.process.poll() is not None and said.rstrip().endswith("address already in use") and \
                self.port == self._chosen_port and tries > 1:
            self.port = self._chosen_port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            return self.start(tries - 1)
        raise RuntimeError("server did not start: " + said)

    def stop(self, sig=signal.SIGTERM) -> None:
        """Send it a signal (SIGTERM: a clean stop) and wait for it to exit."""
        for client in self.clients:
            client.close()
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def client(self, owner: str | None = None) -> httpx.Client:
        """An HTTP client for it, with the owner's bearer token."""
        headers = {"Authorization": f"Bearer {TOKENS[owner]}"} if owner else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=150)
        self.clients.append(client)
        return client


def wait_job(client: httpx.Client, job_id: str, predicate, timeout: float = 120) -> dict:
    """Poll the job until predicate(job) holds; the job, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/training/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not reach the condition: {job}")


def write_tokens(path: Path) -> Path:
    """A tokens file with TOKENS."""
    path.write_text("".join(f"{token} {owner}\n" for owner, token in TOKENS.items()))
    return path
