"""The test harness' real servers (trainmetrics.prometheus_process): each one a test starts is the one it talks to."""

import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainmetrics.prometheus_process import REPO_ROOT, PrometheusServer, free_port, listens_on


class Ready(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ready\n")

    def log_message(self, *args):
        pass


def test_free_ports_are_outside_the_range_outgoing_connections_take_theirs_from_and_never_given_twice():
    """free_port() was bind(0): a port the kernel hands out next as the own end of any process's outgoing
    connection and to the next bind(0), so a parallel worker's client or free_port() took the port a server was
    about to bind ('address already in use' in clean runs)."""
    lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < lowest_ephemeral for port in ports)
    with socket.socket() as outgoing_end:            # what a client's connect() would have been given
        outgoing_end.bind(("127.0.0.1", 0))
        assert outgoing_end.getsockname()[1] not in ports


def test_a_port_another_server_took_before_the_bind_is_not_taken_for_ours(tmp_path):
    """Two test workers can get the same free port: the other's server answered /-/ready for this one while this
    one's process exited (address in use), and a test then paused a process that was not serving it (seen: a
    'paused' Prometheus that answered 200)."""
    prometheus = PrometheusServer(tmp_path)
    squatter = ThreadingHTTPServer(("127.0.0.1", prometheus.port), Ready)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        prometheus.start()
        try:
            assert prometheus.port != squatter.server_address[1]
            assert prometheus.url == f"http://127.0.0.1:{prometheus.port}"
            assert listens_on(prometheus.process.pid, prometheus.port)
            assert prometheus.query("vector(1)")[0]["value"][1] == "1"
        finally:
            prometheus.stop()
    finally:
        squatter.shutdown()
        squatter.server_close()


@pytest.mark.parametrize("package,hint", [("prometheus", True), ("prometheus-alertmanager", False),
                                          ("victoria-metrics", False)])
def test_the_makefiles_package_check_offers_prometheus_bin_for_prometheus_alone(package, hint, tmp_path):
    """Without root, `make test` said "install Debian's 'victoria-metrics' package (or set PROMETHEUS_BIN)" for a
    missing VictoriaMetrics or Alertmanager too, where PROMETHEUS_BIN replaces nothing."""
    (tmp_path / "id").write_text("#!/bin/sh\necho 1000\n")       # not root, whoever runs the tests
    (tmp_path / "id").chmod(0o755)
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-debian-package"), package, "no-such-command-167"],
                            capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: no-such-command-167 not found; install Debian's '{package}' package"
                                      + (" (or set PROMETHEUS_BIN)" if hint else ""))
