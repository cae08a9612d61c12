"""A backend whose answers lag now (a default VictoriaMetrics answers range queries as of 30 s ago, its
-search.latencyOffset): a job is not settled, so not cached nor stored, until its end is that far behind."""

import asyncio
import time

import httpx
import pytest

from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.prometheus import PrometheusClient, answer_delay_of
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer

from .conftest import finish, serve, start_job

pytestmark = pytest.mark.slow

LATENCY_OFFSET_SECONDS = 12


@pytest.mark.parametrize("status, page, delay", [
    (200, '-httpListenAddr="127.0.0.1:8428"\n-storageDataPath="/data"\n', 30.0),     # VictoriaMetrics' default
    (200, '-search.latencyOffset="1m30s"\n-retentionPeriod="1"\n', 90.0),
    (200, '-search.latencyOffset="0s"\n', 1.0),           # 1.79 keeps at least 1 s of it
    (200, '-search.latencyOffset="soon"\n', 30.0),        # not understood: its default
    (404, "404 page not found\n", 0.0),                     # Prometheus has no /flags
    (200, "<html>a proxy's page</html>\n", 0.0),
    (200, "", 0.0),
])
def test_the_answer_delay_is_victoria_metrics_latency_offset(status, page, delay):
    assert answer_delay_of(status, page) == delay


def test_a_flags_page_that_cannot_answer_now_is_asked_again():
    """A /flags answer of 5xx or 429 (a VictoriaMetrics restarting, its proxy's 502) was read as "no VictoriaMetrics"
    and kept: the answer delay was 0 for the service's life, and every job read within 30 s of its end was cached
    without its last seconds."""
    answers = [httpx.Response(502, text="Bad Gateway"), httpx.Response(429, text="slow down"),
               httpx.Response(200, text='-search.latencyOffset="45s"\n')]

    async def delays() -> list[float]:
        client = PrometheusClient("http://victoria", transport=httpx.MockTransport(lambda request: answers.pop(0)))
        try:
            return [await client.answer_delay() for _ in range(4)]
        finally:
            await client.aclose()

    assert asyncio.run(delays()) == [0.0, 0.0, 45.0, 45.0] and answers == []


@pytest.mark.parametrize("url", ["http://vmselect:8481/select/0/prometheus",
                                 "http://vmselect:8481/select/7:2/prometheus/"])
def test_a_victoria_metrics_clusters_flags_are_read_at_vmselects_root(url):
    """vmselect serves the API under /select/<tenant>/prometheus and /flags at its root: asked under the API's path
    (a 400 there), the cluster was taken for no VictoriaMetrics and its 30 s latency offset for 0."""
    asked = []

    def vmselect(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.url.path == "/flags":
            return httpx.Response(200, text='-search.latencyOffset="45s"\n-dedup.minScrapeInterval="1ms"\n')
        return httpx.Response(400, text="unsupported path requested")

    async def read() -> float:
        client = PrometheusClient(url, transport=httpx.MockTransport(vmselect))
        try:
            return await client.answer_delay()
        finally:
            await client.aclose()

    assert asyncio.run(read()) == 45.0
    assert asked == ["http://vmselect:8481/flags"]


def test_a_job_read_within_the_backends_answer_delay_of_its_end_is_not_cached(tmp_path):
    """On a default VictoriaMetrics, a job asked for in the first 30 s after its end showed `completed` (its
    instant reads found the end) with `evaluations: []` and no peak (the range reads held nothing of its last
    30 s), and the cache served that answer for as long as the service ran."""
    # (The later of a flag given twice wins: VictoriaMetrics' guard, as by default, with a shorter offset.)
    victoria = VictoriaMetricsServer(tmp_path / "victoria", extra_args=[
        f"-search.latencyOffset={LATENCY_OFFSET_SECONDS}s", "-search.maxStepForPointsAdjustment=1m"]).start()
    prometheus = PrometheusServer(tmp_path / "prometheus", remote_write=[victoria.remote_write_url]).start()
    try:
        job = start_job("lagged-1", prometheus.targets_dir, "--model", "mlp", "--dataset", "blobs", "--epochs", "4",
                        "--batch-size", "32", "--log-every", "10", "--eval-every", "20")
        summary = finish("lagged-1", job).summary
        ended = summary["end_time"]
        with serve(Settings(prometheus_url=victoria.url)) as client:
            while True:         # read as soon as it shows its end
                first = client.get("/api/training/lagged-1/analytics").json()
                if first.get("status") == "completed":
                    break
                time.sleep(0.3)
            assert time.time() - ended < LATENCY_OFFSET_SECONDS - 1, "too late to read it within the delay"
            assert len(first["evaluations"]) < summary["evaluations"]       # what the backend held back
            time.sleep(max(0.0, ended + LATENCY_OFFSET_SECONDS + 3 - time.time()))
            later = client.get("/api/training/lagged-1/analytics").json()
        assert len(later["evaluations"]) == summary["evaluations"] > 0
    finally:
        prometheus.stop()
        victoria.stop()
