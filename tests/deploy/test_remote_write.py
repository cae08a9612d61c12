"""Scaling out: Prometheus remote-writes into a real VictoriaMetrics, and the analytics pointed at
VictoriaMetrics answer as they do pointed at Prometheus."""

import subprocess
import sys

import pytest

from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer

JOB_ID = "rw-job-1"


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
        # The remote-written samples arrived, to the last of the job's (its end) and all of its counts.
        victoria.wait_until_agrees(prometheus, (
            f'count(last_over_time(trainer_job_end_timestamp_seconds{{job_id="{JOB_ID}"}}[5m]))',
            f'sum(count_over_time(trainer_samples_total{{job_id="{JOB_ID}"}}[5m]))',
            f'sum(count_over_time(trainer_loss{{job_id="{JOB_ID}"}}[5m]))'))
        yield prometheus, victoria
    finally:
        prometheus.stop()
        victoria.stop()


def test_every_sample_arrives_in_the_central_store(both_backends):
    prometheus, victoria = both_backends
    expr = f'max(last_over_time(trainer_samples_total{{job_id="{JOB_ID}"}}[5m]))'
    assert prometheus.query(expr)[0]["value"][1] == victoria.query(expr)[0]["value"][1] == str(3 * 3200)


def test_analytics_agree_on_both_backends(both_backends, analytics_get):
    prometheus, victoria = both_backends
    responses = [analytics_get(backend.url, f"/api/training/{JOB_ID}/analytics") for backend in both_backends]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    from_prometheus, from_victoria = (r.json() for r in responses)
    for section, field in [("performance", "total_samples"), ("performance", "total_steps"), ("checkpoints", "count")]:
        assert from_victoria[section][field] == from_prometheus[section][field], (section, field)
    # VictoriaMetrics stores values with 12 significant decimal digits: losses agree to that precision.
    for field in ("initial", "final", "best"):
        assert from_victoria["losses"][field] == pytest.approx(from_prometheus["losses"][field], rel=1e-11), field
    assert from_victoria["status"] == from_prometheus["status"] == "completed"
    assert from_victoria["start_time"] == pytest.approx(from_prometheus["start_time"], abs=1e-3)
    assert from_victoria["duration"]["total_seconds"] == pytest.approx(from_prometheus["duration"]["total_seconds"],
                                                                       abs=0.01)
