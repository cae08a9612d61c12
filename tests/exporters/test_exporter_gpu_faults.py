"""One GPU's faults stay that GPU's: a lost GPU, queries a GPU or its driver cannot answer, nonsense readings.

The other GPUs' series and their jobs' energy carry on; each GPU's energy interval is its own, so one GPU's
outage cannot stretch another's. A job's mapping may name its GPUs by UUID as well as by index.
"""

import logging
import math
from pathlib import Path

import pynvml
import pytest

from tests.exporters.exporter_fixtures import (FIXTURE_JOB_DIR, GIB, FakeNvml, FixtureHost, build_fixture_host,
                                              parse_exposition, two_gpus)
from trainmetrics.exporters.collectors.gpu import GpuCollector
from trainmetrics.exporters.collectors.jobs import JobsSnapshot
from trainmetrics.exporters.exporter import Exporter
from trainmetrics.exporters.job_energy import JobEnergy
from trainmetrics.jobmap import JobMapping, write_job_mapping

# Labels that name the GPU (or the job) rather than the series.
IDENTITY_LABELS = {"gpu", "uuid", "job_id"}


def one_pass(host: FixtureHost, now: float) -> dict:
    """A fast and a slow sample at `now`, then the parsed exposition."""
    host.exporter.sample(now)
    host.exporter.sample_slow(now)
    return parse_exposition(host.exporter.render())


def success(metrics: dict) -> float:
    """exporter_collector_success of the gpu collector."""
    return next(value for labels, value in metrics["exporter_collector_success"].items()
                if dict(labels)["collector"] == "gpu")


def gpu_energy(metrics: dict) -> dict[str, float]:
    """process_energy_joules_total{source="gpu"} by job."""
    series = metrics.get("process_energy_joules_total", {})
    return {dict(labels)["job_id"]: value for labels, value in series.items() if dict(labels)["source"] == "gpu"}


def series_of(metrics: dict, gpu: str) -> set[str]:
    """The hw_gpu_* series of one GPU, each as name{its other labels}."""
    found = set()
    for name, samples in metrics.items():
        if not name.startswith("hw_gpu_"):
            continue
        for labels in samples:
            if dict(labels).get("gpu") == gpu:
                extra = ",".join(f"{key}={value}" for key, value in labels if key not in IDENTITY_LABELS)
                found.add(f"{name}{{{extra}}}")
    return found


def gpu_log(caplog, *words: str) -> list[logging.LogRecord]:
    """The gpu collector's log records that contain every word."""
    return [record for record in caplog.records
            if record.name.endswith(".gpu") and all(word in record.getMessage() for word in words)]


def value_of(metrics: dict, name: str, gpu: str) -> float | None:
    values = [value for labels, value in metrics.get(name, {}).items() if dict(labels).get("gpu") == gpu]
    return values[0] if values else None


def host_without_cpu_energy(tmp_path: Path, nvml: FakeNvml | None = None, job_dir: Path = FIXTURE_JOB_DIR):
    """The fixture host (mnist-1 holds GPU 0) with no powercap tree, so only GPU energy is counted."""
    return build_fixture_host(nvml=nvml, job_dir=job_dir, powercap_root=tmp_path / "no-powercap")


def test_a_lost_gpu_leaves_the_other_gpus_series_and_energy_counting_and_is_tried_again(tmp_path, caplog):
    """GPU 1 "lost" blacked out GPU 0's series and froze its job's energy (0 of 289 scrapes had GPU 0)."""
    caplog.set_level(logging.DEBUG, logger="trainmetrics.exporters")
    host = host_without_cpu_energy(tmp_path)
    gpu0, gpu1 = host.nvml.gpus
    healthy = one_pass(host, 100.0)
    gpu1.lost = True
    for second in range(1, 8):
        gpu0.energy_millijoules += 1_000
        metrics = one_pass(host, 100.0 + second)
        assert success(metrics) == 1
        assert series_of(metrics, "0") == series_of(healthy, "0")
        assert series_of(metrics, "1") == set()             # no frozen values
        assert gpu_energy(metrics) == {"mnist-1": second}
    lost = gpu_log(caplog, "lost")
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING and "GPU 1" in lost[0].getMessage()
    # Tried again now and then (1 s doubling), not every pass, and without re-initialising NVML under GPU 0.
    assert host.nvml.calls["nvmlDeviceGetHandleByIndex", 1] <= 1 + 3
    assert host.nvml.init_calls == 1

    gpu1.lost = False
    back = [second for second in range(8, 20) if series_of(one_pass(host, 100.0 + second), "1")]
    assert back and back[0] <= 8 + 8                        # within the last retry delay
    assert series_of(one_pass(host, 121.0), "1") == series_of(healthy, "1")
    assert host.nvml.init_calls == 1


def test_a_lost_gpu_whose_handle_nvml_still_gives_stays_lost_until_it_answers(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="trainmetrics.exporters")
    host = host_without_cpu_energy(tmp_path)
    gpu1 = host.nvml.gpus[1]
    one_pass(host, 100.0)
    gpu1.errors = {call: pynvml.NVML_ERROR_GPU_IS_LOST for call in ("nvmlDeviceGetUtilizationRates",
                                                                    "nvmlDeviceGetMemoryInfo")}
    for second in range(1, 31):
        assert series_of(one_pass(host, 100.0 + second), "1") == set()
    assert len(gpu_log(caplog, "lost")) == 1 and gpu_log(caplog, "answers again") == []
    assert host.nvml.calls["nvmlDeviceGetHandleByIndex", 1] <= 1 + 4     # 1, 2, 4, 8, 16 s apart
    gpu1.errors.clear()
    assert any(series_of(one_pass(host, 131.0 + second), "1") for second in range(0, 17))
    assert len(gpu_log(caplog, "answers again")) == 1


def test_a_gpu_lost_when_nvml_starts_does_not_keep_the_others_out(tmp_path):
    """Enumeration stopped at the first GPU whose handle failed, and re-initialising could never succeed."""
    host = host_without_cpu_energy(tmp_path)
    host.nvml.gpus[1].lost = True
    metrics = one_pass(host, 100.0)
    assert success(metrics) == 1
    assert "hw_gpu_utilization_ratio{}" in series_of(metrics, "0") and series_of(metrics, "1") == set()
    host.nvml.gpus[1].lost = False
    assert any(series_of(one_pass(host, 100.0 + second), "1") for second in range(1, 4))
    assert host.nvml.init_calls == 1


def test_when_every_gpu_is_lost_the_collector_fails_and_nvml_is_started_again():
    host = build_fixture_host(backoff_initial=0.5)
    for gpu in host.nvml.gpus:
        gpu.lost = True
    metrics = one_pass(host, 100.0)
    assert success(metrics) == 0 and series_of(metrics, "0") == series_of(metrics, "1") == set()
    for gpu in host.nvml.gpus:
        gpu.lost = False
    one_pass(host, 100.2)                                   # inside the backoff
    metrics = one_pass(host, 100.6)
    assert success(metrics) == 1 and series_of(metrics, "0") and series_of(metrics, "1")


ECC_SERIES = {"hw_gpu_errors_total{type=ecc_corrected}", "hw_gpu_errors_total{type=ecc_uncorrected}"}


@pytest.mark.parametrize("gpus, call, error, missing, asked_once", [
    # A MIG-enabled GPU has no utilisation (NVML docs): its memory and slow series stay.
    ([1], "nvmlDeviceGetUtilizationRates", pynvml.NVML_ERROR_NOT_SUPPORTED,
     {"hw_gpu_utilization_ratio{}", "hw_gpu_utilization_peak_ratio{}"}, True),
    # A driver older than R535 lacks the new name (pynvml raises FunctionNotFound): the old name answers.
    ([0, 1], "nvmlDeviceGetCurrentClocksEventReasons", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, set(), True),
    ([0], "nvmlDeviceGetTotalEccErrors", pynvml.NVML_ERROR_NO_PERMISSION, ECC_SERIES, True),
    # A query failing for no stated reason: that series is left out while it fails and asked again each pass.
    ([1], "nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN, {"hw_gpu_temperature_celsius{}"}, False),
])
def test_a_query_a_gpu_cannot_answer_leaves_out_that_series_alone(tmp_path, caplog, gpus, call, error, missing,
                                                                   asked_once):
    caplog.set_level(logging.DEBUG, logger="trainmetrics.exporters")
    healthy = [series_of(one_pass(host_without_cpu_energy(tmp_path), 100.0), gpu) for gpu in ("0", "1")]
    host = host_without_cpu_energy(tmp_path)
    for index in gpus:
        host.nvml.gpus[index].errors[call] = error
    passes = 5
    for second in range(passes):
        host.nvml.gpus[0].energy_millijoules += 1_000
        metrics = one_pass(host, 100.0 + second)
        assert success(metrics) == 1
        for index in (0, 1):
            expected = healthy[index] - missing if index in gpus else healthy[index]
            assert series_of(metrics, str(index)) == expected, index
        assert gpu_energy(metrics) == {"mnist-1": second}
    for index in gpus:
        assert host.nvml.calls[call, index] == (1 if asked_once else passes)
        assert len(gpu_log(caplog, f"GPU {index}:", call)) == 1    # said once, not once per pass


def test_nonsense_readings_are_clamped_or_left_out_for_that_sample(tmp_path):
    host = host_without_cpu_energy(tmp_path)
    gpu0, gpu1 = host.nvml.gpus
    gpu0.utilization = [150]
    gpu0.memory_used = [90 * GIB]                           # more than the 80 GiB it has
    gpu0.power_milliwatts = math.nan
    gpu1.power_milliwatts = -5_000
    metrics = one_pass(host, 100.0)
    assert value_of(metrics, "hw_gpu_utilization_ratio", "0") == 1.0
    assert value_of(metrics, "hw_gpu_utilization_peak_ratio", "0") == 1.0
    assert value_of(metrics, "hw_gpu_memory_usage_bytes", "0") == 80 * GIB
    assert value_of(metrics, "hw_gpu_memory_usage_peak_bytes", "0") == 80 * GIB
    assert "hw_gpu_power_watts" not in metrics
    assert value_of(metrics, "hw_gpu_temperature_celsius", "1") == 35

    # A NaN energy reading counts nothing and leaves the previous reading as the baseline.
    gpu0.energy_millijoules = math.nan
    metrics = one_pass(host, 101.0)
    assert value_of(metrics, "hw_gpu_energy_joules_total", "0") is None
    assert gpu_energy(metrics) == {"mnist-1": 0.0}
    gpu0.energy_millijoules = 9_002_000
    assert gpu_energy(one_pass(host, 102.0)) == {"mnist-1": 2.0}


def test_a_job_that_changed_hands_during_another_gpus_outage_keeps_its_energy(tmp_path):
    """Truth: mnist-1 used 3 J on GPU 0 while GPU 1 was lost, then eval-2 took GPU 0 and used 0.5 J. The shared
    interval across the outage gave mnist-1 nothing and eval-2 everything."""
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    first = job_dir / "mnist-1.rank0.json"
    first.write_text((FIXTURE_JOB_DIR / "mnist-1.rank0.json").read_text())
    host = host_without_cpu_energy(tmp_path, job_dir=job_dir)
    gpu0, gpu1 = host.nvml.gpus
    one_pass(host, 100.0)
    gpu1.lost = True
    for second in (1, 2, 3):
        gpu0.energy_millijoules += 1_000
        one_pass(host, 100.0 + second)
    first.unlink()
    write_job_mapping(job_dir, JobMapping(job_id="eval-2", pid=5100, gpus=[0], start_ticks=8))
    gpu1.lost = False
    one_pass(host, 104.0)                                   # eval-2 holds GPU 0 from here
    gpu0.energy_millijoules += 500
    assert gpu_energy(one_pass(host, 105.0)) == {"mnist-1": 3.0, "eval-2": 0.5}


class DeclaredJobs:
    """A job tracker that only declares GPUs, by index or by UUID."""

    def __init__(self, gpus: dict[str, frozenset]):
        self.snapshot = JobsSnapshot(gpus=gpus)

    def update(self, now: float) -> None:
        pass


def held_after_gpu_1_spends_4_joules(nvml: FakeNvml, declared: dict[str, frozenset]) -> tuple[set, dict]:
    """The (gpu, job_id) pairs of hw_gpu_job_info for jobs declaring `declared`, and each job's GPU energy, after GPU 1
    spent 4 J."""
    energy = JobEnergy()
    exporter = Exporter([GpuCollector(nvml=nvml, job_tracker=DeclaredJobs(declared), job_energy=energy)])
    exporter.sample(100.0)
    exporter.sample_slow(100.0)
    nvml.gpus[1].energy_millijoules += 4_000
    exporter.sample_slow(101.0)
    held = {(dict(labels)["gpu"], dict(labels)["job_id"])
            for labels in parse_exposition(exporter.render()).get("hw_gpu_job_info", {})}
    energy.publish()
    return held, energy.published


def test_a_job_may_name_its_gpus_by_uuid():
    nvml = FakeNvml(two_gpus())
    held, energy = held_after_gpu_1_spends_4_joules(nvml, {"by-uuid": frozenset({nvml.gpus[1].uuid}),
                                                           "by-index": frozenset({0})})
    assert held == {("0", "by-index"), ("1", "by-uuid")}
    assert energy == {("by-uuid", "gpu"): 4.0, ("by-index", "gpu"): 0.0}


def test_a_job_naming_its_gpu_by_a_uuid_prefix_holds_that_gpu():
    """CUDA takes a unique prefix of a UUID (CUDA_VISIBLE_DEVICES=GPU-5d2f9e81), and the trainer writes the entry as
    the variable gave it: such a job held no GPU (no hw_gpu_job_info, its GPU's energy went to no job)."""
    nvml = FakeNvml(two_gpus())
    prefix = nvml.gpus[1].uuid[:len("GPU-") + 8]
    held, energy = held_after_gpu_1_spends_4_joules(nvml, {"by-prefix": frozenset({prefix})})
    assert held == {("1", "by-prefix")}
    assert energy == {("by-prefix", "gpu"): 4.0}


def test_xid_counts_last_over_nvml_reinitialising():
    """hw_gpu_errors_total{type="xid"} counts since the exporter started (docs/metrics.md): every GPU lost for a
    moment (as after an XID 79) re-enumerated the GPUs, and the counts went back to 0."""
    nvml = FakeNvml(two_gpus())
    exporter = Exporter([GpuCollector(nvml=nvml, backoff_initial=1.0)])

    def xids() -> dict[str, float]:
        errors = parse_exposition(exporter.render()).get("hw_gpu_errors_total", {})
        return {dict(labels)["gpu"]: value for labels, value in errors.items() if dict(labels)["type"] == "xid"}

    exporter.sample(0.0)
    exporter.sample_slow(0.0)
    nvml.pending_xids += [(0, 79), (0, 79), (1, 48)]
    exporter.sample(0.5)
    exporter.sample_slow(0.5)
    assert xids() == {"0": 2, "1": 1}
    nvml.lost = True
    exporter.sample(1.0)
    nvml.lost = False
    exporter.sample(3.0)
    exporter.sample_slow(3.0)
    assert xids() == {"0": 2, "1": 1}


def test_nvml_giving_handles_of_gpus_that_answer_nothing_is_re_initialised_with_backoff_not_every_second():
    """NVML gave the handles of GPUs that answered nothing ("GPU is lost" on every query): each start reset the
    backoff before a GPU had answered, so NVML was shut down and initialised again every second for good (114
    times in 2 minutes, each with a warning per GPU) instead of 1 s doubling to 60 s."""
    nvml = FakeNvml(two_gpus())
    exporter = Exporter([GpuCollector(nvml=nvml, backoff_initial=1.0, backoff_max=60.0)])
    exporter.sample(0.0)
    lost = {call: pynvml.NVML_ERROR_GPU_IS_LOST for call in ("nvmlDeviceGetUtilizationRates",
                                                             "nvmlDeviceGetMemoryInfo")}
    for gpu in nvml.gpus:
        gpu.errors = dict(lost)
    for tenth in range(1, 1200):                            # two minutes of fast samples
        exporter.sample(tenth / 10)
    assert nvml.init_calls <= 1 + 7                         # 1, 2, 4, 8, 16, 32 s apart, then 60 s
    for gpu in nvml.gpus:
        gpu.errors.clear()
    for tenth in range(1200, 1800):                         # the longest delay later, the GPUs are back
        exporter.sample(tenth / 10)
    assert {dict(labels)["gpu"] for labels in parse_exposition(exporter.render())["hw_gpu_utilization_ratio"]} \
        == {"0", "1"}


def test_a_utilisation_query_that_starts_failing_shows_no_peak_older_than_the_window():
    """While the utilisation query failed (an NVML error of no stated kind), the window kept every reading until the
    latest one was a whole window old: 1.4 s after a spike, 0.9 s into the failure, the 1 s peak still showed it and
    the mean held readings 1.4 s old. The window now moves on with each sample, read or not."""
    from tests.exporters.exporter_fixtures import FakeGpu

    nvml = FakeNvml([FakeGpu("GPU-failing", utilization=[100, 0], memory_used=[GIB])])
    exporter = Exporter([GpuCollector(nvml=nvml, peak_window=1.0)])
    for now in (100.0, 100.1, 100.2, 100.3, 100.4, 100.5):     # the spike, then idle
        exporter.sample(now)
    nvml.gpus[0].errors["nvmlDeviceGetUtilizationRates"] = pynvml.NVML_ERROR_UNKNOWN
    for now in (100.6, 100.8, 101.0, 101.2, 101.4):
        exporter.sample(now)
    metrics = parse_exposition(exporter.render())
    assert value_of(metrics, "hw_gpu_utilization_peak_ratio", "0") == 0.0       # the spike is 1.4 s old
    assert value_of(metrics, "hw_gpu_utilization_ratio", "0") == 0.0
    exporter.sample(101.6)                                                       # no reading in the last 1 s
    assert value_of(parse_exposition(exporter.render()), "hw_gpu_utilization_peak_ratio", "0") is None
