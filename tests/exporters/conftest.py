"""Fixtures for the exporter tests (helpers live in exporter_fixtures.py)."""

import pytest

from tests.exporters.exporter_fixtures import FixtureHost, build_fixture_host
from exporters.exporter import Exporter, MetricsServer


@pytest.fixture
def fixture_host() -> FixtureHost:
    """The exporter over the /proc fixtures and two fake GPUs."""
    return build_fixture_host()


@pytest.fixture
def serve():
    """serve(exporter) -> base URL of a MetricsServer on a free loopback port, shut down after the test."""
    servers = []

    def start(exporter: Exporter) -> str:
        server = MetricsServer(("127.0.0.1", 0), exporter)
        server.serve_in_background(poll_interval=0.05)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()

