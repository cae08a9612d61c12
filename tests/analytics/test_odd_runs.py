"""Runs off the happy path, told as the trainer itself told them: a resume that fails in its restore, a process
killed before its first step, a job whose loss diverges, a job shorter than a rate window; and the fleet's
throughput trend adding up to the samples the jobs counted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import kill_left
from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.lookup import MISSED_SCRAPES_SECONDS
from trainmetrics.prometheus_process import PrometheusServer

from .conftest import finish, read_until, serve, start_job, train_command

pytestmark = pytest.mark.slow

COMMON = ("--model", "mlp", "--batch-size", "32", "--log-every", "5", "--epochs", "50")
# A user's own loop through the library, announced to Prometheus, killed while it is still setting up.
# A user's own loop, stepping until it is killed.
STEPPING = """
import sys, time
from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.telemetry import Publish
metrics = JobMetrics("stepping", JobInfo(model="mlp", dataset="blobs"), Publish(targets_dir=sys.argv[1]))
metrics.start()
while True:
    metrics.step(loss=1.0, samples=8)
    time.sleep(0.01)
"""
# A user's own loop whose last fraction of a second is its fastest: slow steps for 3 s, then a burst that ends
# with the job, between its last scrape before its end and its final scrape.
BURSTING = """
import json, sys, time
from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.telemetry import Publish
metrics = JobMetrics("burst-end", JobInfo(model="mlp", dataset="blobs"), Publish(targets_dir=sys.argv[1]))
metrics.start()
for _ in range(150):
    metrics.step(loss=1.0, samples=8)
    time.sleep(0.02)
before = metrics.samples
for _ in range(20000):
    metrics.step(loss=1.0, samples=8)
burst = metrics.samples - before
metrics.finish("completed")
print(json.dumps({"burst_samples": burst, "samples": metrics.samples}))
metrics.close()
"""
# One rank of a two-process job's own loop (the rank in argv[2]), stepping until it is killed.
RANK_STEPPING = """
import sys, time
from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.telemetry import Publish
info = JobInfo(model="mlp", dataset="blobs", rank=int(sys.argv[2]), world_size=2)
metrics = JobMetrics("two-ranks", info, Publish(targets_dir=sys.argv[1]))
metrics.start()
while True:
    metrics.step(loss=1.0, samples=8)
    time.sleep(0.01)
"""
SETTING_UP = """
import sys, time
from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.telemetry import Publish
metrics = JobMetrics("setup-killed", JobInfo(model="mlp", dataset="blobs"), Publish(targets_dir=sys.argv[1]))
time.sleep(120)
"""


@pytest.fixture(scope="module")
def odd_runs(tmp_path_factory):
    """Every odd run on one Prometheus, run side by side; yields (Prometheus, what each run said)."""
    work = tmp_path_factory.mktemp("odd-runs")
    prometheus = PrometheusServer(work / "prometheus").start()
    targets, checkpoints = prometheus.targets_dir, work / "checkpoints"
    processes = []
    try:
        # Paused at step 20 (its checkpoint written), then resumed on another dataset: refused (ValueError; before
        # that check, the weights did not fit: RuntimeError).
        first = start_job("restore-failed", targets, *COMMON, "--dataset", "blobs", "--checkpoint-dir",
                          str(checkpoints))
        # Loss NaN from step 25 (a corrupt batch) to its end, well under a second of training.
        diverging = subprocess.Popen(
            train_command("--job-id", "diverged", "--targets-dir", str(targets), "--model", "mlp", "--dataset",
                          "blobs", "--epochs", "1", "--batch-size", "64", "--log-every", "10"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TRAINMETRICS_FAULTS": '{"corrupt_batch": {"step": 25, "scale": Infinity}}'})
        diverging.log = None
        setting_up = subprocess.Popen([sys.executable, "-c", SETTING_UP, str(targets)])
        bursting = subprocess.Popen([sys.executable, "-c", BURSTING, str(targets)], stdout=subprocess.PIPE, text=True)
        processes += [first, diverging, setting_up, bursting]
        first_lines = read_until(first, "step=20 ")
        first.send_signal(signal.SIGUSR1)
        paused = finish("restore-failed", first, first_lines)
        second = start_job("restore-failed", targets, *COMMON, "--dataset", "digits", "--checkpoint-dir",
                           str(checkpoints), "--resume")
        processes.append(second)
        failed = finish("restore-failed", second)
        diverged = finish("diverged", diverging)
        burst = json.loads(bursting.communicate(timeout=120)[0])
        prometheus.wait_for('trainer_job_state{job_id="setup-killed",state="queued"} == 1', timeout=30)
        setting_up.send_signal(signal.SIGKILL)
        setting_up.wait()
        killed_at = time.time()
        # Stale at its first failed scrape; the others' final scrapes are in once their processes exited.
        prometheus.wait_for('absent(trainer_heartbeat_timestamp_seconds{job_id="setup-killed"})', timeout=30)
        time.sleep(max(0.0, killed_at + MISSED_SCRAPES_SECONDS - time.time()))     # missed scrapes, then vanished
        yield prometheus, {"paused": paused, "failed": failed, "diverged": diverged, "killed_at": killed_at,
                           "burst": burst}
    finally:
        kill_left(processes)
        prometheus.stop()


def analytics(client, job_id: str) -> dict:
    response = client.get(f"/api/training/{job_id}/analytics")
    assert response.status_code == 200, response.text
    return response.json()


def job_row(client, job_id: str) -> dict:
    jobs = client.get("/api/training/analytics/jobs").json()["jobs"]
    return next(row for row in jobs if row["job_id"] == job_id)


def test_a_resume_that_fails_its_restore_is_the_job_s_last_word(odd_runs):
    prometheus, runs = odd_runs
    paused, failed = runs["paused"].summary, runs["failed"].summary
    assert (paused["state"], failed["state"], failed["error_type"]) == ("paused", "failed", "ValueError")
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        body = analytics(client, "restore-failed")
        assert (body["status"], body["error_type"]) == ("failed", "ValueError")
        assert body["end_time"] == failed["end_time"]
        assert body["start_time"] == paused["start_time"]
        duration = body["duration"]
        assert duration["total_seconds"] == pytest.approx(failed["end_time"] - paused["start_time"], rel=1e-5)
        assert duration["training_seconds"] == pytest.approx(paused["end_time"] - paused["start_time"], rel=1e-5)
        assert body["performance"]["total_steps"] == paused["steps"] == failed["steps"]
        assert (body["losses"]["final"], body["losses"]["final_nonfinite"]) == (paused["loss"], False)
        # The failed run's init and restore are in the ledger, which still adds up to the wall clock.
        goodput = body["goodput"]
        assert goodput["wall_clock_seconds"] == pytest.approx(sum(goodput["seconds"].values()), abs=0.01)
        # Nothing lost but the paused run's loop end after its stop's checkpoint write, a millisecond or so (a
        # clean run read 0.001 s): the ledger's resolution, docs/api.md.
        assert goodput["seconds"]["restore"] > 0 and goodput["seconds"]["lost"] < 0.01
        assert job_row(client, "restore-failed")["status"] == "failed"
        assert job_row(client, "restore-failed")["end_time"] == failed["end_time"]


def test_a_process_killed_before_its_first_step_vanished(odd_runs):
    prometheus, runs = odd_runs
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        body = analytics(client, "setup-killed")
        assert body["status"] == "vanished"
        assert runs["killed_at"] - 5 < body["end_time"] <= runs["killed_at"]
        assert job_row(client, "setup-killed")["status"] == "vanished"


def test_a_job_whose_loss_diverged_has_no_final_loss(odd_runs):
    """NaN from step 25: trainer_loss keeps step 20's finite loss, which is not the job's final one."""
    prometheus, runs = odd_runs
    summary = runs["diverged"].summary
    assert summary["loss"] is None and summary["loss_first"] is not None     # the trainer's own word: NaN
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        losses = analytics(client, "diverged")["losses"]
        row = job_row(client, "diverged")
    assert losses["final"] is None and losses["reduction_percent"] is None
    assert (losses["final_nonfinite"], losses["nonfinite_intervals"]) == (True, 3)     # steps 30, 40 and 50
    assert losses["initial"] == summary["loss_first"] and losses["best"] == summary["loss_min"]
    assert row["final_loss"] is None


def test_a_run_shorter_than_the_rate_window_has_its_average_as_its_peak(odd_runs):
    """...and no throughput score: its average is no measured peak (it scored 100, and won a comparison's
    most_efficient over every job that ran long enough to be measured)."""
    prometheus, runs = odd_runs
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        body = analytics(client, "diverged")
    performance, summary = body["performance"], runs["diverged"].summary
    assert performance["total_samples"] == summary["samples"]
    assert performance["peak_samples_per_second"] >= performance["average_samples_per_second"] > 0
    # The run as the analytics measure it (the average divides by it), not as the trainer's summary has it: under
    # load the two differ, and a run the summary calls shorter than the window could be longer than it here.
    if body["duration"]["training_seconds"] < performance["peak_window_seconds"]:   # ~0.8 s here
        assert performance["peak_samples_per_second"] == performance["average_samples_per_second"]
        assert performance["peak_samples_per_second_at"] is None
    if performance["peak_samples_per_second_at"] is None:
        assert body["efficiency"] == {"gpu_utilization_score": None, "throughput_score": None, "overall_score": None}


def test_a_peak_at_the_end_of_a_job_is_counted(odd_runs):
    """What a job did after its last scrape before its end reaches Prometheus in its final scrape, after the
    end: the peak grid stopped at the end and never read it (a job's fastest last second: 5,384 samples/s
    reported for 8,802). Here a burst of 160,000 samples ends the job."""
    prometheus, runs = odd_runs
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        performance = analytics(client, "burst-end")["performance"]
    assert performance["total_samples"] == runs["burst"]["samples"]
    assert performance["peak_samples_per_second"] >= 0.99999 * runs["burst"]["burst_samples"] / \
        performance["peak_window_seconds"]
    assert performance["peak_samples_per_second_at"] > 0


def test_the_throughput_trend_adds_up_to_the_samples_counted(odd_runs):
    prometheus, runs = odd_runs
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        response = client.get("/api/training/analytics/summary", params={"range": "2m", "step": "0.5s"})
        assert response.status_code == 400 and "step" in response.json()["error"]["message"]
        trends = client.get("/api/training/analytics/summary", params={"range": "2m"}).json()["resource_trends"]
    # The default step (2 minutes / 240 = 0.5 s) is raised to the 1 s a rate is read over: no point reads
    # the samples of another's step.
    assert trends["step_seconds"] == 1.0
    throughput = trends["series"]["samples_per_second"]
    grid = throughput["points"][:-1] if throughput["points"][-1][0] % 1 else throughput["points"]
    counted = runs["paused"].summary["samples"] + runs["diverged"].summary["samples"] + runs["burst"]["samples"]
    assert sum(value for _, value in grid if value) * trends["step_seconds"] == pytest.approx(counted, rel=1e-5)
    # Over the whole range: a step without a job is 0 (its average was over the steps with a job only).
    assert len(grid) >= 120 - 1 and all(value is not None for _, value in grid)     # every step of 2 minutes
    assert throughput["average"] == pytest.approx(counted / (len(grid) * trends["step_seconds"]), rel=1e-5)
    for series in trends["series"].values():     # six significant digits, as every figure
        assert all(value is None or value == float(f"{value:.6g}") for _, value in series["points"])
    # A default step that is no whole number of milliseconds (241 s / 240) was reported as it was while the points
    # were a rounded step apart and each read a window rounded up: the sum missed the samples by a part in 2,000.
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        trends = client.get("/api/training/analytics/summary", params={"range": "241s"}).json()["resource_trends"]
    assert trends["step_seconds"] == 1.005
    points = trends["series"]["samples_per_second"]["points"]
    grid = points[:-1] if round(points[-1][0] * 1000) % 1005 else points
    assert sum(value for _, value in grid if value) * trends["step_seconds"] == pytest.approx(counted, rel=1e-5)


def test_a_running_job_that_misses_a_scrape_is_running_and_vanished_only_once_it_stays_unseen(odd_runs):
    """A scrape that times out (a busy host) makes Prometheus mark the job's series stale until the next: the
    job showed `vanished`, with an end, in its analytics and the job list for that moment. Frozen (SIGSTOP) past
    several scrape timeouts it is still running; killed, it is vanished once MISSED_SCRAPES_SECONDS passed."""
    prometheus, _ = odd_runs
    stepping = subprocess.Popen([sys.executable, "-c", STEPPING, str(prometheus.targets_dir)])
    try:
        prometheus.wait_for('trainer_job_state{job_id="stepping",state="running"} == 1', timeout=60)
        with serve(Settings(prometheus_url=prometheus.url)) as client:
            stepping.send_signal(signal.SIGSTOP)
            prometheus.wait_for('absent(trainer_heartbeat_timestamp_seconds{job_id="stepping"})', timeout=30)
            frozen = analytics(client, "stepping")
            assert frozen["status"] == "running" and frozen["end_time"] is None, frozen["status"]
            assert job_row(client, "stepping")["status"] == "running"
            stepping.send_signal(signal.SIGCONT)
            prometheus.wait_for('trainer_heartbeat_timestamp_seconds{job_id="stepping"}', timeout=30)
            stepping.kill()
            stepping.wait()
            killed_at = time.time()
            prometheus.wait_for('absent(trainer_heartbeat_timestamp_seconds{job_id="stepping"})', timeout=30)
            time.sleep(max(0.0, killed_at + MISSED_SCRAPES_SECONDS - time.time()))
            killed = analytics(client, "stepping")
            assert killed["status"] == "vanished" and killed_at - 5 < killed["end_time"] <= killed_at
            assert job_row(client, "stepping")["status"] == "vanished"
    finally:
        if stepping.poll() is None:
            stepping.send_signal(signal.SIGCONT)
            stepping.kill()
            stepping.wait()


def test_a_job_whose_rank_0_alone_is_frozen_is_running_while_another_rank_is_scraped(odd_runs):
    """Rank 0 publishes the job's lifecycle, and the job showed `vanished` (with an end) once rank 0 alone went
    unscraped, though rank 1 was still scraped and the job server said `running` (rank 0 frozen, or its node
    unreachable). The job is running while any of its ranks is scraped; vanished once none is."""
    prometheus, _ = odd_runs
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_STEPPING, str(prometheus.targets_dir), str(rank)])
             for rank in (0, 1)]
    try:
        prometheus.wait_for('trainer_job_state{job_id="two-ranks",state="running"} == 1', timeout=60)
        prometheus.wait_for('trainer_heartbeat_timestamp_seconds{job_id="two-ranks",rank="1"}', timeout=60)
        with serve(Settings(prometheus_url=prometheus.url)) as client:
            ranks[0].send_signal(signal.SIGSTOP)
            prometheus.wait_for('absent(trainer_heartbeat_timestamp_seconds{job_id="two-ranks",rank="0"})', timeout=30)
            time.sleep(MISSED_SCRAPES_SECONDS + 1)
            frozen = analytics(client, "two-ranks")
            assert frozen["status"] == "running" and frozen["end_time"] is None, frozen["status"]
            assert job_row(client, "two-ranks")["status"] == "running"
            ranks[1].kill()
            ranks[1].wait()
            killed_at = time.time()
            prometheus.wait_for('absent(trainer_heartbeat_timestamp_seconds{job_id="two-ranks"})', timeout=30)
            time.sleep(max(0.0, killed_at + MISSED_SCRAPES_SECONDS - time.time()))
            gone = analytics(client, "two-ranks")
            assert gone["status"] == "vanished" and gone["end_time"] is not None
            assert job_row(client, "two-ranks")["status"] == "vanished"
    finally:
        for process in ranks:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()


def test_a_resumed_run_killed_in_its_init_is_init_in_the_ledger(odd_runs, tmp_path):
    """Paused, resumed, the resumed run killed (-9) in its init (before its first step: no start of training,
    no end), then resumed again to its end. The lookup found only processes that started training or ended,
    so the killed run's init (seconds of it, scraped all along) counted as `paused`."""
    prometheus, _ = odd_runs
    targets, checkpoints = prometheus.targets_dir, tmp_path / "checkpoints"
    args = ("--model", "mlp", "--dataset", "blobs", "--batch-size", "32", "--log-every", "5", "--epochs", "3",
            "--checkpoint-dir", str(checkpoints))
    first = start_job("init-killed", targets, *args)
    lines = read_until(first, "step=20 ")
    first.send_signal(signal.SIGUSR1)
    assert finish("init-killed", first, lines).summary["state"] == "paused"
    # Held in its init (before its wait for a first scrape; scraped meanwhile) until killed.
    held = start_job("init-killed", targets, *args, "--resume",
                     env={"TRAINMETRICS_FAULTS": '{"slow_start": {"seconds": 120}}'})
    try:
        found = prometheus.wait_for('trainer_process_start_timestamp_seconds{job_id="init-killed"} '
                                    'unless on (instance) trainer_job_start_timestamp_seconds', timeout=60)
        killed_instance = found[0]["metric"]["instance"]
        time.sleep(3)
        # The job list tells the job as its own analytics do: the paused run spoke for it there (paused, its end),
        # the resumed process in its init being taken for the job server's queued entry.
        with serve(Settings(prometheus_url=prometheus.url)) as client:
            own = analytics(client, "init-killed")
            row = next(row for row in client.get("/api/training/analytics/jobs").json()["jobs"]
                       if row["job_id"] == "init-killed")
        assert (row["status"], row["end_time"], row["total_samples"]) == \
            (own["status"], own["end_time"], own["performance"]["total_samples"])
    finally:
        held.kill()
        held.communicate()
    prometheus.wait_for(f'absent(trainer_heartbeat_timestamp_seconds{{instance="{killed_instance}"}})', timeout=30)
    last = finish("init-killed", start_job("init-killed", targets, *args, "--resume")).summary
    assert last["state"] == "completed"
    life = prometheus.query(f'max_over_time(trainer_heartbeat_timestamp_seconds{{instance="{killed_instance}"}}[10m])'
                            f' - on (instance) max_over_time(trainer_process_start_timestamp_seconds'
                            f'{{instance="{killed_instance}"}}[10m])')
    killed_life = float(life[0]["value"][1])
    assert killed_life > 3
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        goodput = analytics(client, "init-killed")["goodput"]
    seconds = goodput["seconds"]
    assert goodput["wall_clock_seconds"] == pytest.approx(sum(seconds.values()), abs=0.01)
    # Its init in init (the two other runs' inits are seconds each too): paused only between the processes.
    assert seconds["init"] >= killed_life and seconds["lost"] == 0, (seconds, killed_life)
    assert seconds["paused"] < goodput["wall_clock_seconds"] - killed_life


def test_a_job_shorter_than_a_scrape_counts_as_running_in_its_step(odd_runs):
    """Scraped `queued` (its wait for a first scrape), then `completed`: never `running`, so the summary's
    running_jobs trend missed it, where a job shorter than a step still shows."""
    prometheus, _ = odd_runs
    run = finish("tiny-1", start_job("tiny-1", prometheus.targets_dir, "--owner", "tiny", "--model", "mlp",
                                     "--dataset", "blobs", "--epochs", "1", "--batch-size", "256"))
    assert run.summary["state"] == "completed"
    prometheus.wait_for('last_over_time(trainer_job_end_timestamp_seconds{job_id="tiny-1"}[5m])', timeout=30)
    with serve(Settings(prometheus_url=prometheus.url)) as client:
        body = client.get("/api/training/analytics/summary", params={"range": "2m", "step": "10s",
                                                                     "owner": "tiny"}).json()
    assert body["total_jobs"] == 1 and body["resource_trends"]["series"]["running_jobs"]["peak"] == 1
