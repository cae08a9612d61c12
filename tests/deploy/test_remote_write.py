"""Scaling out: Prometheus remote-writes into a real VictoriaMetrics, and the analytics pointed at
VictoriaMetrics answer as they do pointed at Prometheus."""

import subprocess
import sys
import time

import httpx
import pytest

from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer, free_port

JOB_ID = "rw-job-1"


def analytics(prometheus_url: str, path: str) -> dict:
    port = free_port()
    service = subprocess.Popen([sys.executable, "-m", "trainmetrics", "analytics", "--listen", f"127.0.0.1:{port}",
                                "--prometheus-url", prometheus_url], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=15)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "analytics did not start"
                time.sleep(0.2)
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        service.terminate()
        service.wait(timeout=10)


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory):
    work = tmp_path_factory.mktemp("remote-write")
    victoria = VictoriaMetricsServer(work / "victoria").start()
    prometheus = PrometheusServer(work / "prometheus", remote_write=[victoria.remote_write_url]).start()
    try:
        job = subprocess.run([sys.executable, "-m", "trainmetrics", "train", "--job-id", JOB_ID, "--epochs", "3",
                              "--batch-size", "32", "--log-every", "10", "--targets-dir", str(prometheus.targets_dir)],
                             capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr
        selector = f'last_over_time(trainer_job_end_timestamp_seconds{{job_id="{JOB_ID}"}}[5m])'
        victoria.wait_for(selector, timeout=60)            # the remote-written samples arrived
        time.sleep(3)                                      # and the rest of the queue after them
        yield prometheus, victoria
    finally:
        prometheus.stop()
        victoria.stop()


def test_every_sample_arrives_in_the_central_store(both_backends):
    prometheus, victoria = both_backends
    expr = f'max(last_over_time(trainer_samples_total{{job_id="{JOB_ID}"}}[5m]))'
    assert prometheus.query(expr)[0]["value"][1] == victoria.query(expr)[0]["value"][1] == str(3 * 3200)


def test_analytics_agree_on_both_backends(both_backends):
    prometheus, victoria = both_backends
    from_prometheus = analytics(prometheus.url, f"/api/training/{JOB_ID}/analytics")
    from_victoria = analytics(victoria.url, f"/api/training/{JOB_ID}/analytics")
    for section, field in [("performance", "total_samples"), ("performance", "total_steps"), ("checkpoints", "count")]:
        assert from_victoria[section][field] == from_prometheus[section][field], (section, field)
    # VictoriaMetrics stores values with 12 significant decimal digits: losses agree to that precision.
    for field in ("initial", "final", "best"):
        assert from_victoria["losses"][field] == pytest.approx(from_prometheus["losses"][field], rel=1e-11), field
    assert from_victoria["status"] == from_prometheus["status"] == "completed"
    assert from_victoria["start_time"] == pytest.approx(from_prometheus["start_time"], abs=1e-3)
    assert from_victoria["duration"]["total_seconds"] == pytest.approx(from_prometheus["duration"]["total_seconds"],
                                                                       abs=0.01)
