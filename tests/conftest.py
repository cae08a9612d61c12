"""Shared fixtures: a real Prometheus on a free loopback port with a temp data dir."""

import os
import signal
import sys

import pytest

# One compute thread per torch process, here and in every job the tests start (they inherit it): a test runs
# this process's torch, a job or two, Prometheus and a server side by side on a 2-core machine, and torch's
# OpenMP threads, one per core in each process, spin waiting for each other's cores (a fifth of the time of
# the training-heavy tests). Before torch is imported: OpenMP reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Bytecode written, here and in every process the tests start, whatever the environment says: with
# PYTHONDONTWRITEBYTECODE set (these machines' containers set it) each of the run's hundreds of Python processes
# compiled the project's sources again, and each xdist worker rewrote and compiled every test module (6 s of its
# 10 s of CPU collecting). Set here, before the workers start and before any test module is collected.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

from trainmetrics.trainer.stopping import STOP_SIGNALS
from trainmetrics.prometheus_process import PrometheusServer
from tests.processes import analytics_service


@pytest.fixture(autouse=True)
def stop_signals_restored():
    """The stop signals' handlers and mask as they were before each test. A job run in the test's own process
    (`main(["train", ...])`) ignores them once it has reported (StopFlag.stand_down): the pytest worker's later
    children inherited SIGHUP ignored, took it for `nohup`, and a test's SIGHUP let its job run to the end (a
    clean run failed two such tests)."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for signum, handler in handlers.items():
        if handler is not None and signal.getsignal(signum) != handler:
            signal.signal(signum, handler)


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


@pytest.fixture
def analytics_get():
    """get(prometheus_url, path) -> httpx.Response: a real `trainmetrics analytics` process pointed at
    prometheus_url answers one GET (started per call, stopped afterwards)."""
    import httpx

    def get(prometheus_url: str, path: str) -> httpx.Response:
        with analytics_service("--prometheus-url", prometheus_url) as url:
            return httpx.get(f"{url}{path}", timeout=15)

    return get


@pytest.hookimpl(tryfirst=True)         # before -m reads the marks
def pytest_collection_modifyitems(config, items):
    """Marks every test on a real Ray cluster `ray`: `make test` runs them on their own after the rest (a
    session fixture; beside another worker's tests its Jobs API stopped answering for minutes on 2 cores). The
    rest run on three pytest-xdist workers by file (`--dist loadfile`: a module's fixtures start once; xdist's
    `loadgroup` marks no longer reach its scheduler under pytest 9, whose node ids it cannot suffix)."""
    for item in items:
        params = getattr(item, "callspec", None)
        if "ray_cluster" in item.fixturenames or (params is not None and params.params.get("executor") == "ray"):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray_own_cluster") is not None:
            # Not beside the session's cluster: two clusters on 2 cores, its job did not train within 2 minutes.
            item.add_marker(pytest.mark.ray)
