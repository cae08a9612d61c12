"""A real Alertmanager receives a firing alert from a real Prometheus running the deployable rules."""

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from trainmetrics.trainer.metrics import JobMetrics
from trainmetrics.trainer.telemetry import Publish
from trainmetrics.prometheus_process import PrometheusServer, free_port

ALERTMANAGER_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager" / "alertmanager.yml"


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
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.fail("prometheus-alertmanager not installed (make test installs Debian's package)")
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    # The deployable config with the webhook pointed here and a short group wait for the test.
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{webhook.server_port}/alerts"
    config["route"]["group_wait"] = "1s"
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    Webhook.received = []
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    webhook.shutdown()
    webhook.server_close()


def test_failed_job_alert_reaches_alertmanager(alertmanager, tmp_path):
    prometheus = PrometheusServer(tmp_path / "prometheus", alertmanagers=[alertmanager]).start()
    try:
        metrics = JobMetrics("am-failing-job", publish=Publish(targets_dir=prometheus.targets_dir, linger_timeout=20))
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
    assert fired[0]["annotations"]["summary"] == "Training job am-failing-job failed"
