"""The fleet's throughput trend across failed scrapes, on a real Prometheus scraping a job that keeps counting while
its scrapes fail (a busy trainer missing the scrape timeout): a failed scrape marks the target's series stale until
its next one, and the samples counted across the gap are still the job's."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainmetrics.analytics.app import Settings
from trainmetrics.prometheus_process import PrometheusServer, free_port

from .conftest import serve

pytestmark = pytest.mark.slow

RATE = 100.0        # samples per second, counted from the first scrape


class BusyJob:
    """A job's /metrics whose samples count grows at RATE from its first scrape; scrapes in `failing` answer 500,
    and from `ended` on the count stays where it was."""

    def __init__(self):
        self.first_scrape = self.ended = None
        self.failing = (0.0, 0.0)
        self.count = 0
        job = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                now = time.time()
                if job.failing[0] <= now < job.failing[1]:
                    self.send_response(500)
                    self.end_headers()
                    return
                job.first_scrape = job.first_scrape or now
                if job.ended is None:
                    job.count = int(RATE * (now - job.first_scrape))
                body = (f'trainer_samples_total{{job_id="busy"}} {job.count}\n'
                        f'trainer_job_state{{job_id="busy",state="running"}} 1\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_throughput_trend_counts_the_samples_across_failed_scrapes(tmp_path):
    """The count before each step was read at the step's start; across failed scrapes that was a stale marker,
    so the step counted from its first sample and lost what the job counted in the gap (75 of 705 samples)."""
    job = BusyJob()
    prometheus = PrometheusServer(tmp_path / "prometheus", rule_files=[]).start()
    try:
        address = f"127.0.0.1:{job.server.server_address[1]}"
        (prometheus.targets_dir / "busy.json").write_text(json.dumps([{"targets": [address]}]))
        prometheus.wait_for('trainer_samples_total{job_id="busy"}', timeout=30)
        time.sleep(2)
        boundary = float(int(time.time()) + 2)      # a trend point's start (1 s steps): its scrapes fail across it
        job.failing = (boundary - 0.4, boundary + 0.4)
        time.sleep(boundary + 2 - time.time())
        job.ended = time.time()
        time.sleep(1.5)                             # its last count scraped
        job.server.shutdown()
        time.sleep(1.5)                             # and inside the trend's grid
        with serve(Settings(prometheus_url=prometheus.url, recorded_series=False)) as client:
            response = client.get("/api/training/analytics/summary", params={"range": "1m"})
        assert response.status_code == 200, response.text
    finally:
        job.server.server_close()
        prometheus.stop()
    trends = response.json()["resource_trends"]
    assert trends["step_seconds"] == 1.0
    points = trends["series"]["samples_per_second"]["points"]
    grid = points[:-1] if points[-1][0] % 1 else points
    # (Over 3 s counted, 0.8 s of them across the failed scrapes: ~500 to 600, as the scrapes fall.)
    assert job.count >= 300 and sum(value for _, value in grid if value) * trends["step_seconds"] == job.count
