"""Real jobs, real Prometheus servers at 250 ms: the final state lands whoever else reads /metrics, every
scraper of an HA pair gets it, and the README's instrumentation example keeps its start and its end."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from trainmetrics.prometheus_process import PrometheusServer

from .conftest import parse_summary, train_command

README = Path(__file__).resolve().parents[2] / "README.md"


def last(prometheus: PrometheusServer, expr: str) -> float | None:
    result = prometheus.query(f"last_over_time({expr}[10m])")
    return float(result[0]["value"][1]) if result else None


def target_port(targets_dir: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in targets_dir.glob("*.json"):
            try:
                return int(json.loads(path.read_text())[0]["targets"][0].rsplit(":", 1)[1])
            except (ValueError, IndexError, KeyError):
                pass
        time.sleep(0.02)
    raise AssertionError("the job never announced itself")


@pytest.mark.slow
def test_an_ha_pair_both_hold_the_final_state_while_a_curl_loop_reads_the_job(tmp_path):
    first = PrometheusServer(tmp_path / "prometheus-a").start()
    second_dir = tmp_path / "prometheus-b"
    second_dir.mkdir()
    (second_dir / "targets").symlink_to(first.targets_dir, target_is_directory=True)   # the same file_sd dir
    second = PrometheusServer(second_dir).start()
    stop = threading.Event()
    reads = []

    def curl_loop():
        port = target_port(first.targets_dir)
        while not stop.is_set():
            try:
                reads.append(len(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()))
            except OSError:
                return                               # the job has gone
            time.sleep(0.01)

    try:
        reader = threading.Thread(target=curl_loop)
        reader.start()
        job = subprocess.run(train_command("--job-id", "ha-1", "--epochs", "2", "--log-every", "5", "--eval-every", "7",
                                           "--targets-dir", str(first.targets_dir), "--linger-timeout", "20"),
                             capture_output=True, text=True, timeout=180)
        stop.set()
        reader.join(timeout=10)
        assert job.returncode == 0, job.stderr[-2000:]
        summary = parse_summary(job.stdout)
        assert len(reads) > 20                      # somebody else read /metrics all along
        for prometheus in (first, second):
            assert last(prometheus, 'trainer_job_state{job_id="ha-1",state="completed"}') == 1, prometheus.url
            assert last(prometheus, 'trainer_steps_total{job_id="ha-1"}') == summary["steps"]
            assert last(prometheus, 'trainer_evaluations_total{job_id="ha-1"}') == summary["evaluations"]
            indices = prometheus.query('max_over_time(trainer_eval_history_index{job_id="ha-1"}[10m])')
            assert max(float(s["value"][1]) for s in indices) == summary["evaluations"]
        assert not list(first.targets_dir.glob("*.json"))
    finally:
        stop.set()
        first.stop()
        second.stop()


def readme_example() -> str:
    section = README.read_text().split("### Instrumenting your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_as_pasted_keeps_its_first_interval_and_its_end(tmp_path):
    prometheus = PrometheusServer(tmp_path / "prometheus").start()
    jobs = tmp_path / "jobs"
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {**os.environ, "TRAINMETRICS_TARGETS_DIR": str(prometheus.targets_dir), "TRAINMETRICS_JOB_DIR": str(jobs)}
    process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        job_id = re.search(r'JobMetrics\("([^"]+)"', readme_example()).group(1)
        prometheus.wait_for(f'trainer_loss_intervals_total{{job_id="{job_id}"}} >= 3', timeout=90)
        # Its evaluations' time is theirs (the example marks them): it was the next step's, and compute.
        prometheus.wait_for(f'trainer_evaluations_total{{job_id="{job_id}"}} >= 1 and on (job_id) '
                            f'trainer_phase_seconds_total{{job_id="{job_id}",phase="eval"}} > 0', timeout=90)
        assert list(jobs.glob("*.json"))             # the exporter can attribute its processes
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode != 0, output      # stopped like Ctrl-C: cancelled, not completed
        selector = f'{{job_id="{job_id}"}}'
        assert last(prometheus, f'trainer_job_state{{job_id="{job_id}",state="cancelled"}}') == 1
        # It waited for the first scrape: Prometheus holds the job from its first step on.
        first_samples = prometheus.query(f"min_over_time(trainer_samples_total{selector}[10m])")
        assert float(first_samples[0]["value"][1]) == 0
        assert last(prometheus, f"trainer_loss_first{selector}") is not None
        assert not list(prometheus.targets_dir.glob("*")) and not list(jobs.glob("*"))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        prometheus.stop()
