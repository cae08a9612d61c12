"""Fixtures for the exporter tests (helpers live in exporter_fixtures.py)."""

import pytest

from tests.exporters.exporter_fixtures import FixtureHost, build_fixture_host
from trainmetrics.exporters.exporter import Exporter, metrics_server


@pytest.fixture
def fixture_host() -> FixtureHost:
    """The exporter over the /proc fixtures and two fake GPUs."""
    return build_fixture_host()


@pytest.fixture
def serve():
    """serve(exporter) -> base URL of the exporter's HTTP server on a free loopback port, closed after the test."""
    servers = []

    def start(exporter: Exporter) -> str:
        server = metrics_server(exporter, ("127.0.0.1", 0)).serve_in_background()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.close()
