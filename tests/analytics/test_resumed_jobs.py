"""Jobs that stopped and were resumed, through a real Prometheus and the VictoriaMetrics it remote-writes to: a
failed job's cached analytics do not outlive its resume, and a job killed with SIGKILL is vanished until it is
resumed, then one job from its first start."""

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.processes import finish_reading, kill_left
from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.lookup import MISSED_SCRAPES_SECONDS
from trainmetrics.jobfiles import checkpoint_name
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer

from .conftest import ARRIVED, RealJob, finish, read_until, same_answer, serve, start_job, train_command

pytestmark = pytest.mark.slow

COMMON = ("--model", "mlp", "--dataset", "blobs", "--batch-size", "16", "--log-every", "10")


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    victoria = VictoriaMetricsServer(tmp_path_factory.mktemp("victoria")).start()
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"),
                                  remote_write=[victoria.remote_write_url]).start()
    try:
        yield {"prometheus": prometheus, "victoria-metrics": victoria}
    finally:
        prometheus.stop()
        victoria.stop()


def get(client, path: str, **params) -> dict:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def prometheus_requests(client) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("analytics_prometheus_requests_total{"))


def test_a_resumed_job_is_told_afresh(backends, tmp_path):
    prometheus, victoria = backends["prometheus"], backends["victoria-metrics"]
    targets, refail_dir, crash_dir = prometheus.targets_dir, tmp_path / "refail", tmp_path / "crash"
    failing = start_job("refail-1", targets, *COMMON, "--epochs", "50", "--checkpoint-dir", str(refail_dir),
                        "--checkpoint-every", "5")
    crashing = start_job("crash-1", targets, *COMMON, "--epochs", "50", "--checkpoint-dir", str(crash_dir),
                         "--checkpoint-every", "10")
    processes = [failing, crashing]
    try:
        fail_lines = read_until(failing, "step=10 ")
        refail_dir.rename(tmp_path / "refail-moved")     # the next checkpoint write fails for real
        refail_dir.write_text("not a directory")
        crash_lines = read_until(crashing, "step=40 ")
        prometheus.wait_for('trainer_steps_total{job_id="crash-1"} >= 40', timeout=30)   # seen running
        os.kill(crashing.pid, signal.SIGKILL)
        killed_at = time.time()
        crash_lines.append(finish_reading(crashing)[1])     # the rest: communicate() lost what was read ahead
        failed = finish("refail-1", failing, fail_lines)
        assert failed.returncode == 1 and failed.summary["state"] == "failed"
        victoria.wait_until_agrees(prometheus, ARRIVED)
        time.sleep(max(0.0, killed_at + MISSED_SCRAPES_SECONDS - time.time()))     # missed scrapes, then vanished

        with serve(Settings(prometheus_url=prometheus.url)) as on_prometheus, \
                serve(Settings(prometheus_url=victoria.url)) as on_victoria:
            clients = {"prometheus": on_prometheus, "victoria-metrics": on_victoria}
            before = {}
            for name, client in clients.items():
                refail = get(client, "/api/training/refail-1/analytics")
                assert refail["status"] == "failed" and refail["error_type"] in ("NotADirectoryError",
                                                                                 "FileNotFoundError"), name
                assert refail["performance"]["total_steps"] == failed.summary["steps"]
                requests = prometheus_requests(client)
                assert get(client, "/api/training/refail-1/analytics") == refail      # served from the cache
                assert prometheus_requests(client) == requests + 1
                # Killed: no final state, its series stale at its first failed scrape, its end its last heartbeat.
                crash = get(client, "/api/training/crash-1/analytics")
                assert crash["status"] == "vanished", name
                assert killed_at - 5 < crash["end_time"] <= killed_at
                assert crash["duration"]["total_seconds"] == pytest.approx(crash["end_time"] - crash["start_time"],
                                                                           abs=1e-3)
                rows = {row["job_id"]: row for row in get(client, "/api/training/analytics/jobs")["jobs"]}
                assert rows["crash-1"]["status"] == "vanished"
                assert rows["crash-1"]["end_time"] == pytest.approx(crash["end_time"], abs=2e-5)
                assert get(client, "/api/training/analytics/summary", range="1h")["jobs_by_status"]["vanished"] == 1
                before[name] = refail, crash

            # Both resumed from their checkpoints to the end of the epoch they were in (200 steps each).
            resumed_at = int(max(crash_dir.glob("step-*.pt")).stem.removeprefix("step-"))
            refail_dir.unlink()
            (tmp_path / "refail-moved").rename(refail_dir)
            resumed = [start_job("refail-1", targets, *COMMON, "--epochs", "1", "--checkpoint-dir", str(refail_dir),
                                 "--checkpoint-every", "5", "--resume"),
                       start_job("crash-1", targets, *COMMON, "--epochs", str(resumed_at // 200 + 1),
                                 "--checkpoint-dir", str(crash_dir), "--checkpoint-every", "10", "--resume")]
            processes += resumed
            refail_job = RealJob("refail-1", [failed, finish("refail-1", resumed[0])])
            crash_job = RealJob("crash-1", [finish("crash-1", resumed[1], crash_lines)])
            assert [job.summary["state"] for job in (refail_job, crash_job)] == ["completed", "completed"]
            victoria.wait_until_agrees(prometheus, ARRIVED)

            for name, client in clients.items():
                refail_before, crash_before = before[name]
                refail = get(client, "/api/training/refail-1/analytics")
                assert refail["status"] == "completed" and refail["error_type"] is None, name
                assert refail["performance"]["total_steps"] == refail_job.summary["steps"]
                assert refail["performance"]["total_samples"] == refail_job.summary["samples"]
                # (VictoriaMetrics may give a time's last digits differently once it merged its data: 20 us)
                assert refail["start_time"] == pytest.approx(refail_before["start_time"], abs=2e-5)
                assert refail["end_time"] == pytest.approx(refail_job.summary["end_time"], abs=1e-3)
                assert refail["duration"]["paused_seconds"] == pytest.approx(
                    refail_job.summary["start_time"] - failed.summary["end_time"], abs=2e-3)

                crash = get(client, "/api/training/crash-1/analytics")
                assert crash["status"] == "completed" and crash["error_type"] is None, name
                assert crash["start_time"] == pytest.approx(crash_before["start_time"], abs=2e-5)
                assert crash["start_time"] < crash_job.summary["start_time"]
                assert crash["end_time"] == pytest.approx(crash_job.summary["end_time"], abs=1e-3)
                duration = crash["duration"]
                assert duration["paused_seconds"] == pytest.approx(
                    crash_job.summary["start_time"] - crash_before["end_time"], abs=2e-3)
                assert duration["training_seconds"] == pytest.approx(
                    duration["total_seconds"] - duration["paused_seconds"], abs=2e-3)
                assert crash["performance"]["total_samples"] == crash_job.summary["samples"]
                first_loss = crash_job.logged_losses[0][1]      # the killed run's first (the log holds both)
                assert crash["losses"]["initial"] == pytest.approx(first_loss, abs=0.5e-4)
                assert crash["losses"]["final"] == pytest.approx(crash_job.summary["loss"], rel=1e-9)

                with serve(Settings(prometheus_url=backends[name].url)) as fresh:     # nothing cached
                    for job_id, cached in (("refail-1", refail), ("crash-1", crash)):
                        same_answer(get(fresh, f"/api/training/{job_id}/analytics"), cached, job_id)
    finally:
        kill_left(processes)


def test_a_resumed_run_drops_the_evaluations_it_threw_away_before_it_evaluates(backends, tmp_path):
    """Killed at step 16 (evaluated at 5, 10 and 15, checkpointed at 10) and resumed from the checkpoint: the
    evaluation at 15 was thrown away with the steps after it. The job's evaluations listed it until the resumed
    run evaluated itself (the resumed run's numbers replaced the killed run's from its first evaluation on)."""
    prometheus = backends["prometheus"]
    checkpoints = tmp_path / "checkpoints"
    args = ("--job-id", "evals-1", "--targets-dir", str(prometheus.targets_dir), *COMMON, "--epochs", "5",
            "--eval-every", "5", "--checkpoint-every", "10", "--checkpoint-dir", str(checkpoints))

    def stalled_before(step: int, *extra: str):
        faults = f'{{"stall": {{"step": {step}, "seconds": 600}}}}'
        return subprocess.Popen(train_command(*args, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "TRAINMETRICS_FAULTS": faults})

    processes = [stalled_before(17)]
    try:
        read_until(processes[0], "stalling")
        prometheus.wait_for('trainer_evaluations_total{job_id="evals-1"} >= 3', timeout=30)
        os.kill(processes[0].pid, signal.SIGKILL)
        processes[0].communicate()
        kept = torch.load(checkpoints / checkpoint_name(10), weights_only=False)["metrics_by_rank"][0]["evaluations"]
        processes.append(stalled_before(13, "--resume"))
        read_until(processes[1], "stalling")
        assert kept == 2
        prometheus.wait_for('trainer_steps_total{job_id="evals-1"} == 12', timeout=30)
        # Remote write sends each series through one of several shards: the resumed run's steps can be in
        # VictoriaMetrics before its start and its evaluation count, without which it has not resumed there yet.
        backends["victoria-metrics"].wait_until_agrees(prometheus, (
            'count(last_over_time(trainer_job_start_timestamp_seconds{job_id="evals-1"}[10m]))',
            'count(min_over_time(trainer_evaluations_total{job_id="evals-1"}[10m]) == 2)',
            'sum(max_over_time(trainer_steps_total{job_id="evals-1"}[10m]))'))
        for backend in backends.values():
            with serve(Settings(prometheus_url=backend.url)) as client:
                body = get(client, "/api/training/evals-1/analytics")
            assert body["status"] == "running" and body["performance"]["total_steps"] == 12
            assert [e["step"] for e in body["evaluations"]] == [5, 10], backend
    finally:
        kill_left(processes)
