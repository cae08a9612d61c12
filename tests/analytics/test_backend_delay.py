"""A backend whose answers lag now (a default VictoriaMetrics answers range queries as of 30 s ago, its
-search.latencyOffset): a job is not settled, so not cached nor stored, until its end is that far behind."""

import asyncio
import contextlib
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.cache import AnalyticsCache, settled_job_analytics
from trainmetrics.analytics.prometheus import PrometheusClient, answer_delay_of
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer
from trainmetrics.reports import NotSettled

from tests.prometheus_proxy import Relay
from .conftest import as_openmetrics, backfilled_prometheus, finish, running, scraped_job, serve, start_job

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

    assert asyncio.run(delays()) == [math.inf, math.inf, 45.0, 45.0] and answers == []


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


class LaggedBackend(Relay):
    """A real Prometheus passed off as a VictoriaMetrics whose answers lag an hour (its /flags page says so), whose
    /flags page first fails as `failure` says: a proxy's 502, or no answer within the client's deadline."""

    def __init__(self, upstream: str, failure: str):
        super().__init__(upstream)
        self.failure: str | None = failure

    def relay(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        if path != "/flags":
            return self.forward(method, path, headers, body)
        failure, self.failure = self.failure, None
        if failure == "frozen":
            time.sleep(3)       # past the client's 1 s deadline
        if failure is not None:
            return 502, "text/plain", b"Bad Gateway"
        return 200, "text/plain", b'-search.latencyOffset="1h"\n'


@pytest.mark.parametrize("failure", ["bad_gateway", "frozen"])
def test_a_job_read_while_the_backends_answer_delay_cannot_be_read_is_not_settled(tmp_path, failure):
    """A /flags page that could not be read (a proxy's 502, a VictoriaMetrics that did not answer in time) was read
    as no answer delay for that request: a job ended less than the backend's delay ago counted as settled, its
    analytics were cached and its report stored for good without its last seconds."""
    end = round(time.time() - 600)      # no longer scraped (Prometheus' 5-minute lookback), within the hour's delay
    base, info = 'job_id="lag-2",instance="h:1",job="trainer",rank="0"', 'job_name="lag",owner="a",device="cpu"'
    lines = [line for t in [end - 60 + 5.0 * i for i in range(13)] + [end + 0.25]
             for line in scraped_job(base, info, end - 60, end, t)]
    cache = AnalyticsCache()

    async def settle() -> None:
        client = PrometheusClient(backend.url, deadline=1.0)
        try:
            with pytest.raises(NotSettled):
                await settled_job_analytics(client, cache, "lag-2", 86400.0)
            with pytest.raises(NotSettled):         # the page read now: an hour's delay
                await settled_job_analytics(client, cache, "lag-2", 86400.0)
        finally:
            await client.aclose()

    with running(backfilled_prometheus(tmp_path, as_openmetrics(lines))) as prometheus, \
            LaggedBackend(prometheus.url, failure).running() as backend:
        asyncio.run(settle())
    assert len(cache) == 0


class FrozenFlags(BaseHTTPRequestHandler):
    """A backend whose /flags page never answers in time (3 s) and whose queries answer an empty vector at once."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/flags":
            time.sleep(3)
        body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


def test_callers_of_an_answer_delay_that_does_not_come_share_one_read_and_queries_go_on():
    """Every caller of answer_delay started a read of its own; with /flags not answering, the reads of callers
    gone at their deadline queued for the slots and each held one for a whole deadline: a burst of them made
    every query after it time out for as many deadlines as there were callers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FrozenFlags)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def burst_then_query() -> list[dict]:
        client = PrometheusClient(f"http://127.0.0.1:{server.server_address[1]}", deadline=1.0, max_concurrency=1)
        try:
            async def asked_within_a_deadline() -> None:     # as a request of the service is (its deadline)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.5):
                        await client.answer_delay()

            await asyncio.gather(*(asked_within_a_deadline() for _ in range(6)))
            return await client.query("up")
        finally:
            await client.aclose()

    try:
        assert asyncio.run(burst_then_query()) == []
    finally:
        server.shutdown()
        server.server_close()
