"""Optional OTLP push: with the standard OTEL_EXPORTER_OTLP_* variables a job also pushes its metrics to an
OTLP/HTTP receiver (here a real HTTP server decoding the protobuf requests)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from trainmetrics.trainer.metrics import JobMetrics


class Receiver(BaseHTTPRequestHandler):
    requests: list[ExportMetricsServiceRequest] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        Receiver.requests.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_job_pushes_its_metrics_over_otlp_when_asked(monkeypatch):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Receiver.requests = []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.server_port}")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    try:
        metrics = JobMetrics("otlp-job-1", log_every=1)
        with metrics:
            for _ in range(5):
                metrics.step(loss=0.5, samples=8)
        # close() shut the provider down, which pushes a last time
        assert Receiver.requests
        path, last = Receiver.requests[-1]
        assert path == "/v1/metrics"
        resource = {kv.key: kv.value.string_value for kv in last.resource_metrics[0].resource.attributes}
        assert resource["job_id"] == "otlp-job-1"
        points = {metric.name: metric for scope in last.resource_metrics[0].scope_metrics for metric in scope.metrics}
        assert points["trainer_steps_total"].sum.data_points[0].as_int == 5
        assert points["trainer_samples_total"].sum.data_points[0].as_int == 40
        assert points["trainer_step_duration_seconds"].histogram.data_points[0].count == 5
    finally:
        receiver.shutdown()
        receiver.server_close()
