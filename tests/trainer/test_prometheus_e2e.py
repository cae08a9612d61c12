"""A real job through a real Prometheus: what Prometheus holds after the job exited equals what it logged,
and docs/metrics.md lists exactly the series a job exposes."""

import re
from pathlib import Path

import pytest

from trainmetrics.prometheus_process import PrometheusServer

from .conftest import parse_summary, run_train

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
JOB_ID = "e2e-blobs-1"
# Series a CPU job without a failure does not expose; each is documented as conditional.
CONDITIONAL = {"trainer_gpu_memory_peak_bytes", "trainer_job_failure_info", "trainer_job_submitted_timestamp_seconds"}


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """A real Prometheus and a short real job announced to it through file_sd; the job has exited."""
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus")).start()
    try:
        result = run_train("--job-id", JOB_ID, "--model", "mlp", "--dataset", "blobs", "--epochs", "2",
                           "--log-every", "10", "--peak-flops", "1e11", "--owner", "alice", "--checkpoint-dir",
                           str(tmp_path_factory.mktemp("ckpt")), "--targets-dir", str(prometheus.targets_dir))
        assert result.returncode == 0, result.stderr
        assert list(prometheus.targets_dir.glob("*.json")) == []      # the job removed its target file
        yield prometheus, parse_summary(result.stdout)
    finally:
        prometheus.stop()


def last(prometheus, metric: str, extra: str = "") -> float:
    result = prometheus.query(f'last_over_time({metric}{{job_id="{JOB_ID}"{extra}}}[5m])')
    assert len(result) == 1, (metric, result)
    return float(result[0]["value"][1])


def test_prometheus_holds_what_the_job_logged(finished_job):
    prometheus, summary = finished_job
    assert summary["state"] == "completed"
    assert last(prometheus, "trainer_steps_total") == summary["steps"] == 2 * 50
    assert last(prometheus, "trainer_samples_total") == summary["samples"] == 2 * 3200
    assert last(prometheus, "trainer_loss") == pytest.approx(summary["loss"], rel=1e-12)
    assert last(prometheus, "trainer_eval_accuracy_ratio") == pytest.approx(summary["eval_accuracy"], rel=1e-12)
    assert summary["eval_accuracy"] > 0.8
    assert last(prometheus, "trainer_job_state", ',state="completed"') == 1
    assert last(prometheus, "trainer_job_state", ',state="running"') == 0
    assert last(prometheus, "trainer_job_end_timestamp_seconds") == pytest.approx(summary["end_time"], abs=1e-3)
    assert last(prometheus, "trainer_job_start_timestamp_seconds") == pytest.approx(summary["start_time"], abs=1e-3)
    assert last(prometheus, "trainer_checkpoints_total") == summary["checkpoints"] == 2
    assert last(prometheus, "trainer_step_duration_seconds_count") == summary["steps"]
    assert 0 < last(prometheus, "trainer_model_flops_utilization_ratio") < 1


def documented_trainer_series() -> set[str]:
    section = DOCS.read_text().split("## Trainer", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| (trainer_[a-z_]+) \|", section, flags=re.M))


def exposed_families(names: set[str]) -> set[str]:
    families = set()
    for name in names:
        families.add(re.sub(r"_(bucket|sum|count)$", "", name) if name.startswith(
            ("trainer_step_duration", "trainer_data_wait", "trainer_checkpoint_duration")) else name)
    return families


def test_docs_list_exactly_the_series_a_job_exposes(finished_job):
    prometheus, _ = finished_job
    series = prometheus.api("series", **{"match[]": f'{{job_id="{JOB_ID}"}}'})
    exposed = exposed_families({s["__name__"] for s in series if ":" not in s["__name__"]})  # no recording rules
    documented = documented_trainer_series()
    assert exposed - documented == set(), "exposed but not documented"
    assert documented - exposed == CONDITIONAL, "documented but not exposed"
    labels = {key for s in series if ":" not in s["__name__"] for key in s} - {"__name__", "instance", "job"}
    assert labels == {"job_id", "run_id", "state", "job_name", "model", "dataset", "owner", "device", "task",
                      "world_size", "le", "slot", "phase"}
