"""A real Alertmanager receives a firing alert from a real Prometheus running the deployable rules."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.telemetry import Publish
from trainmetrics.prometheus_process import AlertmanagerServer, PrometheusServer


class Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def alertmanager(tmp_path):
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    server = AlertmanagerServer(tmp_path / "alertmanager", webhook=f"http://127.0.0.1:{webhook.server_port}/alerts")
    server.start()
    Webhook.received = []
    yield server.address
    server.stop()
    webhook.shutdown()
    webhook.server_close()


def test_failed_job_alert_reaches_alertmanager(alertmanager, tmp_path):
    prometheus = PrometheusServer(tmp_path / "prometheus", alertmanagers=[alertmanager]).start()
    try:
        metrics = JobMetrics("am-failing-job", JobInfo(owner="team-a"),
                             publish=Publish(targets_dir=prometheus.targets_dir, linger_timeout=20))
        metrics.start()
        metrics.finish("failed", MemoryError())
        metrics.close()                          # returns once Prometheus has scraped the failed state
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not Webhook.received:
            time.sleep(0.5)
    finally:
        prometheus.stop()
    assert Webhook.received, "no notification reached the webhook"
    alerts = [alert for message in Webhook.received for alert in message["alerts"]]
    fired = [a for a in alerts if a["labels"]["alertname"] == "TrainerJobFailed"]
    assert fired and fired[0]["status"] == "firing"
    assert fired[0]["labels"]["job_id"] == "am-failing-job"
    assert fired[0]["labels"]["owner"] == "team-a"      # from trainer_job_info: an owner's own route can take it
    assert fired[0]["annotations"]["summary"] == "Training job am-failing-job failed"
