"""Real jobs resumed at the address of the run before them (a fixed --metrics-listen port, as a container restarted
in its pod has): the runs are still told apart. Before each process published its own `run_id` label, the two runs
were one series: the job started at its resume (the killed run's training and its thrown-away steps were gone from
its duration and ledger), and a paused job's resumed run ended at the pause while it trained."""

import os
import signal
import time

import pytest

from tests.processes import finish_reading, kill_left
from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.goodput import NO_SUBMISSION
from trainmetrics.analytics.lookup import MISSED_SCRAPES_SECONDS
from trainmetrics.prometheus_process import PrometheusServer, free_port

from .conftest import RealJob, finish, read_until, serve, start_job

pytestmark = pytest.mark.slow

COMMON = ("--model", "mlp", "--dataset", "blobs", "--batch-size", "16", "--log-every", "10")


def get(client, path: str) -> dict:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


def stall_before(step: int) -> dict[str, str]:
    return {"TRAINMETRICS_FAULTS": f'{{"stall": {{"step": {step}, "seconds": 600}}}}'}


def test_runs_at_one_address_are_runs_of_their_own(tmp_path):
    prometheus = PrometheusServer(tmp_path / "prometheus").start()
    targets = prometheus.targets_dir
    killed_listen, paused_listen = (f"127.0.0.1:{free_port()}" for _ in range(2))
    killed_args = (*COMMON, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "killed"),
                   "--checkpoint-every", "15", "--metrics-listen", killed_listen)
    paused_args = (*COMMON, "--epochs", "50", "--checkpoint-dir", str(tmp_path / "paused"),
                   "--metrics-listen", paused_listen)
    launched = time.time()
    killed = start_job("addr-killed", targets, *killed_args, env=stall_before(41))
    paused = start_job("addr-paused", targets, *paused_args, env=stall_before(21))
    processes = [killed, paused]
    try:
        # Killed in a stall before step 41, 10 steps past its checkpoint at 30; paused in one before step 21.
        killed_lines = read_until(killed, "stalling")
        read_until(paused, "stalling")
        prometheus.wait_for('trainer_steps_total{job_id="addr-killed"} == 40', timeout=30)
        prometheus.wait_for('trainer_steps_total{job_id="addr-paused"} == 20', timeout=30)
        os.kill(killed.pid, signal.SIGKILL)
        killed_at = time.time()
        killed_lines.append(finish_reading(killed)[1])
        os.kill(paused.pid, signal.SIGUSR1)
        paused_run = finish("addr-paused", paused)
        assert paused_run.summary["state"] == "paused"
        time.sleep(max(0.0, killed_at + MISSED_SCRAPES_SECONDS - time.time()))

        # Both resumed at the address they had: the killed one from its checkpoint at step 30 to the end of its
        # first epoch (200 steps), the paused one from its pause at step 20 into a stall before step 41.
        resumed = start_job("addr-killed", targets, *killed_args, "--resume")
        stalled = start_job("addr-paused", targets, *paused_args, "--resume", env=stall_before(41))
        processes += [resumed, stalled]
        killed_job = RealJob("addr-killed", [finish("addr-killed", resumed, killed_lines)])
        assert killed_job.summary["state"] == "completed"
        read_until(stalled, "stalling")
        prometheus.wait_for('count(last_over_time(trainer_job_end_timestamp_seconds{job_id="addr-killed"}[5m]))',
                            timeout=30)
        prometheus.wait_for('trainer_steps_total{job_id="addr-paused"} == 40', timeout=30)

        with serve(Settings(prometheus_url=prometheus.url)) as client:
            job = get(client, "/api/training/addr-killed/analytics")
            assert job["status"] == "completed"
            assert launched < job["start_time"] < killed_at       # the killed run's start, not the resume's
            assert job["end_time"] == pytest.approx(killed_job.summary["end_time"], abs=1e-3)
            duration = job["duration"]
            # The gap: from the killed run's last scrape to the resumed run's start of training.
            assert 0 < duration["paused_seconds"] < killed_job.summary["start_time"] - killed_at + 1
            resumed_run = killed_job.summary["end_time"] - killed_job.summary["start_time"]
            assert duration["training_seconds"] > resumed_run + (killed_at - job["start_time"]) - 1.0
            assert job["performance"]["total_steps"] == killed_job.summary["steps"] == 200
            assert job["performance"]["total_samples"] == killed_job.summary["samples"]
            # The ledger tells both runs: the killed run's steps after its checkpoint at 30 are lost.
            goodput = job["goodput"]
            assert goodput["unavailable_reason"] == NO_SUBMISSION, goodput       # (a standalone job's)
            assert goodput["seconds"]["lost"] > 0
            assert goodput["step_seconds_by_part"]["compute"] > 0
            assert sum(goodput["seconds"].values()) == pytest.approx(goodput["wall_clock_seconds"], rel=0.01)

            job = get(client, "/api/training/addr-paused/analytics")
            assert job["status"] == "running" and job["end_time"] is None
            assert launched < job["start_time"] < paused_run.summary["end_time"]
            duration = job["duration"]
            assert duration["paused_seconds"] == pytest.approx(
                duration["total_seconds"] - duration["training_seconds"], abs=1e-3)
            assert 0 < duration["paused_seconds"] < time.time() - paused_run.summary["end_time"]
            assert duration["training_seconds"] > paused_run.summary["end_time"] - paused_run.summary["start_time"]
    finally:
        kill_left(processes)
        prometheus.stop()
