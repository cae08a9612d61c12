"""JobMetrics, the instrumentation library: exposition, lifecycle, linger, never breaking the loop."""

import subprocess
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainer import instruments
from trainer.metrics import JobMetrics
from trainmetrics.prometheus_process import find_binary


def samples_by_name(registry) -> dict[str, list]:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    found: dict[str, list] = {}
    for family in families:
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def state_of(metrics: JobMetrics) -> str:
    states = [s for s in samples_by_name(metrics.registry)["trainer_job_state"] if s.value == 1]
    assert len(states) == 1
    return states[0].labels["state"]


def test_lifecycle_queued_running_completed_and_series_carry_job_id():
    metrics = JobMetrics("lib-1", model="mlp", dataset="blobs", listen=None, log_every=2)
    assert state_of(metrics) == "queued"
    with metrics:
        assert state_of(metrics) == "running"
        for loss in (torch.tensor(4.0), torch.tensor(2.0), 1.0):
            metrics.step(loss=loss, samples=10)
        metrics.eval(loss=0.5, accuracy=0.75)
        found = samples_by_name(metrics.registry)
        assert found["trainer_steps_total"][0].value == 3
        assert found["trainer_samples_total"][0].value == 30
        assert found["trainer_loss"][0].value == 3.0          # mean of the first interval (4, 2)
        assert found["trainer_eval_accuracy_ratio"][0].value == 0.75
        assert all(s.labels["job_id"] == "lib-1" for samples in found.values() for s in samples)
        assert "trainer_job_end_timestamp_seconds" not in found
        assert "rank" not in found["trainer_steps_total"][0].labels
    assert metrics.state == "completed" and metrics.last_loss == 1.0


def test_step_histogram_uses_training_buckets_and_counts_every_step():
    metrics = JobMetrics("lib-2", listen=None)
    metrics.start()
    for _ in metrics.timed(range(7)):
        time.sleep(0.002)
        metrics.step(samples=1)
    found = samples_by_name(metrics.registry)
    bounds = [float(s.labels["le"]) for s in found["trainer_step_duration_seconds_bucket"]][:-1]
    assert tuple(bounds) == instruments.DURATION_BUCKETS
    assert found["trainer_step_duration_seconds_count"][0].value == 7
    assert found["trainer_data_wait_seconds_count"][0].value == 7
    assert found["trainer_step_duration_seconds_sum"][0].value >= 7 * 0.002
    metrics.finish("completed")
    metrics.close()


def test_exception_marks_failed_with_error_class_and_interrupt_marks_cancelled():
    failing = JobMetrics("lib-3", listen=None)
    with pytest.raises(ZeroDivisionError):
        with failing:
            1 / 0
    assert failing.state == "failed" and failing.error_type == "ZeroDivisionError"

    interrupted = JobMetrics("lib-4", listen=None)
    with pytest.raises(KeyboardInterrupt):
        with interrupted:
            raise KeyboardInterrupt
    assert interrupted.state == "cancelled" and interrupted.error_type is None


def test_failure_info_series_names_the_error_class():
    metrics = JobMetrics("lib-5", listen=None)
    metrics.start()
    metrics.finish("failed", RuntimeError("boom"))
    found = samples_by_name(metrics.registry)
    assert found["trainer_job_failure_info"][0].labels["error_type"] == "RuntimeError"
    assert found["trainer_job_end_timestamp_seconds"][0].value >= found["trainer_job_start_timestamp_seconds"][0].value
    metrics.close()


def test_bad_values_never_raise_out_of_a_metric_call():
    metrics = JobMetrics("lib-6", listen=None, log_every=1)
    metrics.start()
    metrics.step(loss="not a number", samples=1)
    metrics.step(loss=torch.tensor(float("nan")), samples=1)
    assert metrics.steps == 2
    metrics.step(loss=torch.tensor(2.0), samples=1)
    found = samples_by_name(metrics.registry)
    # The SDK drops NaN gauges: the divergence is counted instead, and the gauge keeps finite values only.
    assert found["trainer_loss_nonfinite_total"][0].value == 1
    assert found["trainer_loss"][0].value == 2.0
    metrics.close()


def test_invalid_job_id_is_rejected():
    for bad in ("", "-x", "a b", "x" * 65, 'a"}', "ünï"):
        with pytest.raises(ValueError, match="invalid job id"):
            JobMetrics(bad, listen=None)


def test_served_metrics_pass_promtool_check(tmp_path):
    metrics = JobMetrics("lib-7", model="cnn", dataset="digits", listen="127.0.0.1:0", log_every=1,
                         flops_per_sample=1e6, peak_flops=1e12, upload_seconds=0.1)
    metrics.start()
    for _ in metrics.timed(range(3)):
        metrics.step(loss=torch.tensor(1.0), samples=4)
    with metrics.checkpoint():
        pass
    metrics.eval(loss=1.0, accuracy=0.5)
    metrics.set_epoch(0)
    metrics.set_learning_rate(0.01)
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.metrics_port}/metrics").read()
    metrics.finish("completed")
    metrics.close()
    check = subprocess.run([find_binary("promtool"), "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check


def test_close_lingers_until_a_scrape_after_the_end_then_removes_its_target_file(tmp_path):
    metrics = JobMetrics("lib-8", listen="127.0.0.1:0", targets_dir=tmp_path, linger_timeout=30)
    target = tmp_path / "lib-8.rank0.json"
    assert target.exists()
    metrics.start()
    metrics.finish("completed")
    scraped_at = []

    def scrape_later():
        time.sleep(0.5)
        started = time.monotonic()
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.metrics_port}/metrics").read().decode()
        scraped_at.append((started, 'state="completed"} 1.0' in body))

    scraper = threading.Thread(target=scrape_later)
    scraper.start()
    began = time.monotonic()
    metrics.close()
    returned = time.monotonic()
    scraper.join()
    assert scraped_at and scraped_at[0][1]            # the scrape saw the final state
    assert scraped_at[0][0] <= returned               # close returned only after that scrape began ...
    assert returned - began < 25                      # ... not after the whole 30 s timeout
    assert not target.exists()


def test_linger_is_bounded_when_nobody_scrapes(tmp_path):
    metrics = JobMetrics("lib-9", listen="127.0.0.1:0", targets_dir=tmp_path, linger_timeout=0.3)
    metrics.start()
    metrics.finish("completed")
    began = time.monotonic()
    metrics.close()
    assert 0.3 <= time.monotonic() - began < 5
    assert list(tmp_path.iterdir()) == []
