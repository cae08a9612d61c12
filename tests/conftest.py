"""Shared fixtures: a real Prometheus on a free loopback port with a temp data dir."""

import pytest

from trainmetrics.prometheus_process import PrometheusServer


@pytest.fixture
def prometheus_factory(tmp_path):
    """Start real Prometheus servers: factory(static_targets={...}, rule_files=[...]) -> PrometheusServer."""
    servers = []

    def start(**kwargs) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def prometheus(prometheus_factory) -> PrometheusServer:
    """A real Prometheus scraping trainer targets from its targets_dir every 250 ms."""
    return prometheus_factory()
