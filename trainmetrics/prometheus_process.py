"""Start and query a real Prometheus: used by `trainmetrics demo`, the tests and the benchmarks.

The deployable deploy/prometheus/prometheus.yml is the single source of the scrape configuration;
this module renders it with local paths (targets dir, exporter address) and runs the real binary on a
loopback port with a temporary data dir.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_TEMPLATE = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
AGENT_TEMPLATE = REPO_ROOT / "deploy" / "prometheus" / "agent.yml"


class PrometheusNotFound(RuntimeError):
    """No prometheus binary: set PROMETHEUS_BIN or install Debian's prometheus package."""


def find_binary(name: str) -> str:
    """Locate prometheus/promtool: $PROMETHEUS_BIN / $PROMTOOL_BIN, beside PROMETHEUS_BIN, then PATH."""
    variable = f"{name.upper()}_BIN"
    override = os.environ.get(variable)
    if override:
        # Checked here: a wrong path was a FileNotFoundError traceback from deep inside Popen.
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise PrometheusNotFound(f"{variable}={override}: not an executable file")
        return override
    configured = os.environ.get("PROMETHEUS_BIN")
    if configured and name != "prometheus":
        sibling = Path(configured).with_name(name)
        if sibling.exists():
            return str(sibling)
    found = shutil.which(name)
    if not found:
        raise PrometheusNotFound(f"{name} not found: install Debian's prometheus package or set PROMETHEUS_BIN")
    return found


# Ray's workers take ports 10002-19999 by default; the kernel's ephemeral range starts at 32768 unless set otherwise.
_LOWEST_CHOSEN_PORT = 20000
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a server started after this returns.

    Chosen at random between Ray's worker ports and the kernel's ephemeral range, and never twice by one process.
    A port from bind(0) is one the kernel hands out next to any process's outgoing connection (its own end) and
    to the next bind(0), either of which could take it before the server binds: the test suite's parallel workers
    lost servers' ports so ('address already in use'). Where that range is too narrow to choose from, bind(0)."""
    lowest_ephemeral = _ephemeral_ports_start()
    for _ in range(100):
        port = random.randrange(_LOWEST_CHOSEN_PORT, max(lowest_ephemeral, _LOWEST_CHOSEN_PORT + 1))
        if port < lowest_ephemeral and port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768        # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def listens_on(pid: int, port: int) -> bool:
    """True when process `pid` holds a TCP socket listening on `port` (Linux: /proc/net/tcp and tcp6 name the
    listening sockets' inodes, /proc/PID/fd the process's)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    fields = row.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            continue
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:         # gone, or a /proc this user cannot read: nothing to tell it by
        return not os.path.isdir("/proc/self/fd")


def render_config(targets_dir: Path, static_targets: dict[str, list[str]] | None = None,
                  rule_files: list[str] | None = None, alertmanagers: list[str] | None = None,
                  remote_write: list[str] | None = None, job_server: str | None = None,
                  job_server_token: str | None = None, extra_target_dirs: list[Path] = (),
                  template: Path = CONFIG_TEMPLATE) -> dict:
    """The deployable config with file_sd pointed at targets_dir, the job server's HTTP service discovery at
    job_server (with the @metrics token when given), static targets, alertmanagers and remote_write URLs
    replaced (scrape jobs without a static target or a job server given are dropped; no alertmanager and no
    remote_write unless given)."""
    config = yaml.safe_load(template.read_text())
    config.pop("remote_write", None)
    if remote_write:
        # Flush small batches quickly so a short test sees its samples in the central store within seconds.
        config["remote_write"] = [{"url": url, "queue_config": {"batch_send_deadline": "1s"}}
                                  for url in remote_write]
    if alertmanagers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]}
    else:
        config.pop("alerting", None)
    static_targets = static_targets or {}
    kept = []
    for scrape in config["scrape_configs"]:
        name = scrape["job_name"]
        if "file_sd_configs" in scrape:
            for sd in scrape["file_sd_configs"]:
                sd["files"] = [str(Path(directory) / "*.json") for directory in (targets_dir, *extra_target_dirs)]
            kept.append(scrape)
        elif "http_sd_configs" in scrape:
            if job_server is None:
                continue
            scrape.pop("relabel_configs", None)     # the agent template's per-node filter: all nodes are this one
            for sd in scrape["http_sd_configs"]:
                sd["url"] = f"{job_server}/api/training/sd"
                if job_server_token:
                    # `type` spelled out: Prometheus 2.42's http_sd sends the bare token without it.
                    sd["authorization"] = {"type": "Bearer", "credentials": job_server_token}
            kept.append(scrape)
        elif name in static_targets:
            scrape["static_configs"] = [{"targets": static_targets[name]}]
            if name == "server" and job_server_token:       # with --tokens, its /metrics is the @metrics token's
                scrape["authorization"] = {"type": "Bearer", "credentials": job_server_token}
            kept.append(scrape)
    config["scrape_configs"] = kept
    if template == AGENT_TEMPLATE:      # an agent evaluates no rules
        return config
    if rule_files is None:   # the deployable rules, found relative to the template as Prometheus would
        rule_files = [str(CONFIG_TEMPLATE.parent / pattern) for pattern in config.get("rule_files", [])]
    config["rule_files"] = rule_files
    return config


class PrometheusServer:
    """A real Prometheus process on a free loopback port with its own data dir."""

    def __init__(self, workdir: Path, static_targets: dict[str, list[str]] | None = None,
                 rule_files: list[str] | None = None, port: int | None = None,
                 extra_args: list[str] | None = None, alertmanagers: list[str] | None = None,
                 remote_write: list[str] | None = None, job_server: str | None = None,
                 job_server_token: str | None = None, extra_target_dirs: list[Path] = (), agent: bool = False,
                 process_group: int | None = None):
        self.workdir = Path(workdir)
        self.targets_dir = self.workdir / "targets"
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "prometheus.yml"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._port_chosen = port is None        # another may be taken in its place (_launch)
        self.static_targets = static_targets
        self.rule_files = rule_files
        self.alertmanagers = alertmanagers
        self.remote_write = remote_write
        self.job_server, self.job_server_token = job_server, job_server_token
        self.extra_target_dirs, self.agent = list(extra_target_dirs), agent
        self.extra_args = extra_args or []
        self.process_group = process_group      # Popen's: 0 keeps it out of its starter's terminal signals
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        """Write the config, start the binary and wait until /-/ready answers."""
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = render_config(self.targets_dir, self.static_targets, self.rule_files, self.alertmanagers,
                               self.remote_write, self.job_server, self.job_server_token, self.extra_target_dirs,
                               AGENT_TEMPLATE if self.agent else CONFIG_TEMPLATE)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        storage = ["--enable-feature=agent", f"--storage.agent.path={self.data_dir}"] if self.agent else \
            [f"--storage.tsdb.path={self.data_dir}"]
        command = [
            find_binary("prometheus"),
            f"--config.file={self.config_path}",
            *storage,
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
            *self.extra_args,
        ]
        return self._launch(command, "/-/ready", timeout)

    def _launch(self, command: list[str], ready_path: str, timeout: float, tries: int = 3):
        """Start the command with its output in the log, and wait until ready_path answers 200 from it: not from
        another process that took the port between free_port() and the bind (a parallel test's server, which
        answered for this one while this one exited; a port this object chose is then chosen again)."""
        name = Path(command[0]).name
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            process_group=self.process_group)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = self.log_path.read_text(errors="replace")[-2000:]
                if "address already in use" in said and self._port_chosen and tries > 1:
                    taken, self.port = self.port, free_port()
                    self.url = f"http://127.0.0.1:{self.port}"
                    command = [part.replace(f"127.0.0.1:{taken}", f"127.0.0.1:{self.port}") for part in command]
                    return self._launch(command, ready_path, deadline - time.monotonic(), tries - 1)
                raise RuntimeError(f"{name} exited with {self.process.returncode}: {said}")
            try:
                with urllib.request.urlopen(f"{self.url}{ready_path}", timeout=1) as response:
                    if response.status == 200 and listens_on(self.process.pid, self.port):
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{name} not ready after {timeout}s")

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path> and return its "data"; raise RuntimeError on an error answer."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{url}: {error.code} {error.read()[:500]!r}") from error
        if body.get("status") != "success":
            raise RuntimeError(f"{url}: {body}")
        return body["data"]

    def query(self, expr: str, time_: float | None = None) -> list[dict]:
        """Instant query; returns the result vector."""
        return self.api("query", query=expr, time=time_)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """Range query; returns the result matrix."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for(self, expr: str, timeout: float = 20.0, predicate=bool) -> list[dict]:
        """Poll an instant query until predicate(result) holds; return the result or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r} did not match within {timeout}s; last result {result}")


class VictoriaMetricsServer(PrometheusServer):
    """A real single-node VictoriaMetrics (Debian's victoria-metrics) on a free loopback port: the central
    store Prometheus remote-writes into, queried through the same Prometheus HTTP API."""

    def start(self, timeout: float = 30.0) -> "VictoriaMetricsServer":
        """Start the binary and wait until /health answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = os.environ.get("VICTORIA_METRICS_BIN") or shutil.which("victoria-metrics")
        if not binary:
            raise PrometheusNotFound("victoria-metrics not found: install Debian's victoria-metrics package")
        # Without its guard against samples still arriving: it answers a range query's points within
        # -search.latencyOffset of now (1.79 keeps at least 1 s of it) with the point before them, for steps
        # under -search.maxStepForPointsAdjustment. The tests compare its answers with Prometheus' own.
        command = [binary, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.data_dir}",
                   "-retentionPeriod=1", "-search.latencyOffset=0s", "-search.maxStepForPointsAdjustment=1ms",
                   "-loggerLevel=WARN", *self.extra_args]
        return self._launch(command, "/health", timeout)

    @property
    def remote_write_url(self) -> str:
        """Where Prometheus remote-writes to this store."""
        return f"{self.url}/api/v1/write"

    def wait_until_agrees(self, source: PrometheusServer, expressions: tuple[str, ...],
                          timeout: float = 60.0) -> None:
        """Poll until every expression answers here as it does on the Prometheus that remote-writes here
        (both asked at the same time): the samples they count have all arrived. TimeoutError otherwise.
        Ask for counts and integer sums: a stored float keeps fewer digits here than in Prometheus."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.time()
            values = [tuple(result[0]["value"][1] if result else None
                            for result in (source.query(expr, now), self.query(expr, now))) for expr in expressions]
            if all(ours == theirs for ours, theirs in values):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"remote write incomplete after {timeout}s: {list(zip(expressions, values))}")
            time.sleep(0.5)


ALERTMANAGER_TEMPLATE = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


class AlertmanagerServer(PrometheusServer):
    """A real Alertmanager (Debian's prometheus-alertmanager) on a free loopback port, with the deployable
    config: its receiver's webhook pointed at `webhook` (None: left as deployed, whose failed deliveries do
    not matter to what the API lists) and a short group wait."""

    def __init__(self, workdir: Path, webhook: str | None = None, group_wait: str = "1s"):
        super().__init__(workdir)
        self.webhook, self.group_wait = webhook, group_wait

    def start(self, timeout: float = 30.0) -> "AlertmanagerServer":
        """Write the config, start the binary and wait until /-/ready answers."""
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            raise PrometheusNotFound("prometheus-alertmanager not installed (make test installs Debian's package)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(ALERTMANAGER_TEMPLATE.read_text())
        if self.webhook:
            config["receivers"][0]["webhook_configs"][0]["url"] = self.webhook
        config["route"]["group_wait"] = self.group_wait
        self.config_path.write_text(yaml.safe_dump(config))
        command = [binary, f"--config.file={self.config_path}", f"--storage.path={self.data_dir}",
                   f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"]
        return self._launch(command, "/-/ready", timeout)

    @property
    def address(self) -> str:
        """HOST:PORT, as Prometheus' alerting config takes it."""
        return f"127.0.0.1:{self.port}"

    def alerts(self) -> list[dict]:
        """Every alert it holds now (API v2), firing or resolved-but-kept."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=10) as response:
            return json.load(response)
