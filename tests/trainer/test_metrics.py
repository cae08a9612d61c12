"""JobMetrics, the instrumentation library: exposition, lifecycle, exact loss statistics, evaluations held until
read, the linger that waits for every scraper and only for scrapers, bounded memory, never breaking the loop."""

import http.client
import json
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import urllib.request

import pytest
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from trainmetrics.metrics_http import SCRAPE_TIMEOUT_HEADER
from trainmetrics.prometheus_process import find_binary
from trainmetrics.trainer import evaluations, instruments
from trainmetrics.trainer import metrics as metrics_module
from trainmetrics.trainer.histograms import DurationHistogram
from trainmetrics.trainer.metrics import Diagnostics, JobInfo, JobMetrics
from trainmetrics.trainer.models import device_peak_flops
from trainmetrics.trainer.phases import COMPUTE, OPTIMIZER
from trainmetrics.trainer.telemetry import Publish


def samples_by_name(metrics: JobMetrics) -> dict[str, list]:
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.collect().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(metrics: JobMetrics, name: str) -> float | None:
    found = samples_by_name(metrics).get(name)
    return found[0].value if found else None


def state_of(metrics: JobMetrics) -> str:
    states = [s for s in samples_by_name(metrics)["trainer_job_state"] if s.value == 1]
    assert len(states) == 1
    return states[0].labels["state"]


class Scraper:
    """A Prometheus-like scraper: one keep-alive connection, the scrape-timeout header on every GET."""

    def __init__(self, port: int, counting: bool = True):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        # 0.5 s, not Prometheus' 0.2 s: an answer later than its timeout is one the scraper dropped (not read),
        # and a test's renders on a loaded host may take longer than 0.2 s. (Its window as a scraper stays 2 s.)
        self.headers = {SCRAPE_TIMEOUT_HEADER: "0.5"} if counting else {}

    def scrape(self) -> dict[str, list]:
        self.connection.request("GET", "/metrics", headers=self.headers)
        body = self.connection.getresponse().read().decode()
        found: dict[str, list] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(sample)
        return found

    def close(self):
        self.connection.close()


def scraper_of_announced_job(targets, timeout: float = 30) -> Scraper:
    """A Scraper of the job that announces itself in the file_sd directory `targets` (waited for)."""
    deadline = time.monotonic() + timeout
    while not list(targets.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    port = json.loads(next(targets.glob("*.json")).read_text())[0]["targets"][0].rsplit(":", 1)[1]
    return Scraper(int(port))


def test_lifecycle_queued_running_completed_and_series_carry_job_id():
    metrics = JobMetrics("lib-1", JobInfo(model="mlp", dataset="blobs"), log_every=2)
    assert state_of(metrics) == "queued"
    with metrics:
        assert state_of(metrics) == "running"
        for loss in (torch.tensor(4.0), torch.tensor(2.0), 1.0):
            metrics.step(loss=loss, samples=10)
        metrics.eval(loss=0.5, accuracy=0.75)
        found = samples_by_name(metrics)
        assert found["trainer_steps_total"][0].value == 3
        assert found["trainer_samples_total"][0].value == 30
        assert found["trainer_loss"][0].value == 3.0          # mean of the first interval (4, 2)
        assert found["trainer_eval_accuracy_ratio"][0].value == 0.75
        assert all(s.labels["job_id"] == "lib-1" for samples in found.values() for s in samples)
        assert "trainer_job_end_timestamp_seconds" not in found
        assert "rank" not in found["trainer_steps_total"][0].labels
    assert metrics.state == "completed" and metrics.last_loss == 1.0


def test_loss_statistics_are_exact_whatever_was_scraped():
    metrics = JobMetrics("lib-stats", log_every=1)
    metrics.start()
    losses = [3.0, 1.5, 0.25, 2.0, float("nan"), 0.5]
    for loss in losses:
        metrics.step(loss=torch.tensor(loss), samples=1)     # nothing collects in between
    finite = [loss for loss in losses if loss == loss]
    assert value(metrics, "trainer_loss_first") == 3.0
    assert value(metrics, "trainer_loss_min") == 0.25
    assert value(metrics, "trainer_loss_accumulated") == pytest.approx(sum(finite))
    assert value(metrics, "trainer_loss_intervals_total") == len(finite)
    assert value(metrics, "trainer_loss_nonfinite_total") == 1
    assert value(metrics, "trainer_loss") == 0.5
    assert value(metrics, "trainer_loss_finite") == 1
    metrics.step(loss=torch.tensor(float("inf")), samples=1)   # diverged at the end: trainer_loss holds 0.5
    assert (value(metrics, "trainer_loss"), value(metrics, "trainer_loss_finite")) == (0.5, 0)
    metrics.finish("completed")
    metrics.close()


def saved_job_state() -> dict:
    """A first process's state_dict() after two steps (losses 2.0, 1.0; 4 samples each), an evaluation (0.9,
    0.6) and a checkpoint, as a checkpoint carries it."""
    first = JobMetrics("lib-resume", log_every=1)
    first.start()
    for loss in (2.0, 1.0):
        first.step(loss=loss, samples=4)
    first.eval(loss=0.9, accuracy=0.6)
    with first.checkpoint():
        pass
    saved = json.loads(json.dumps(first.state_dict()))
    first.pause()
    first.close()
    return saved


def test_a_resumed_process_carries_the_jobs_statistics_on():
    second = JobMetrics("lib-resume", log_every=1)
    second.load_state_dict(saved_job_state())
    second.start()
    second.step(loss=1.5, samples=4)
    second.eval(loss=1.1, accuracy=0.5)
    assert value(second, "trainer_loss_first") == 2.0        # the job's first, not the resume's
    assert value(second, "trainer_loss_min") == 1.0
    assert value(second, "trainer_loss_accumulated") == 4.5
    assert value(second, "trainer_steps_total") == 3 and value(second, "trainer_samples_total") == 12
    assert value(second, "trainer_evaluations_total") == 2
    assert value(second, "trainer_eval_loss_min") == 0.9 and value(second, "trainer_eval_accuracy_max_ratio") == 0.6
    history = samples_by_name(second)["trainer_eval_history_index"]
    assert [s.value for s in history] == [2.0]                # numbering continues
    second.finish("completed")
    second.close()


def test_a_resumed_process_that_trains_no_step_still_has_the_jobs_final_loss():
    """Paused (or killed) at its last step and resumed: the new run has nothing left to train. Its trainer_loss
    and result loss were missing (the job list's final loss null, the analytics' not)."""
    second = JobMetrics("lib-resume", log_every=1)
    second.load_state_dict(saved_job_state())
    second.start()
    assert value(second, "trainer_loss") == 1.0 and value(second, "trainer_loss_finite") == 1
    assert second.last_loss == 1.0
    second.finish("completed")
    second.close()
    diverged = JobMetrics("lib-resume-nan", log_every=1)
    diverged.load_state_dict({**saved_job_state(), "last_loss": float("nan")})
    diverged.start()
    assert value(diverged, "trainer_loss_finite") == 0           # still diverged, as its last interval said
    diverged.close()


CARRIED_COUNTERS = ("trainer_steps_total", "trainer_samples_total", "trainer_checkpoints_total",
                    "trainer_loss_accumulated", "trainer_loss_intervals_total", "trainer_evaluations_total",
                    "trainer_phase_seconds_total")


def test_a_resuming_process_publishes_the_jobs_counters_only_once_it_has_them():
    # Scraped during init, a resumed process would show its counters at zero and then jump to the
    # checkpoint's totals: the fleet's phases and throughput would count the whole job again as its growth.
    saved = saved_job_state()
    second = JobMetrics("lib-resume", resuming=True, log_every=1)
    before = samples_by_name(second)
    assert not set(CARRIED_COUNTERS) & set(before)
    assert "trainer_heartbeat_timestamp_seconds" in before and state_of(second) == "queued"
    second.load_state_dict(saved)
    after = samples_by_name(second)
    assert value(second, "trainer_steps_total") == 2 and value(second, "trainer_checkpoints_total") == 1
    compute = {s.labels["phase"]: s.value for s in after["trainer_phase_seconds_total"]}["compute"]
    assert compute >= saved["phases"]["compute"] > 0
    second.start()
    second.step(loss=1.0, samples=4)
    assert value(second, "trainer_steps_total") == 3
    second.finish("completed")
    second.close()


def test_a_resuming_process_without_a_checkpoint_publishes_its_counters_at_start():
    metrics = JobMetrics("lib-nothing-to-resume", resuming=True)
    assert "trainer_steps_total" not in samples_by_name(metrics)
    metrics.start()
    assert value(metrics, "trainer_steps_total") == 0
    metrics.finish("completed")
    metrics.close()


def test_start_waits_for_a_scrape_that_read_the_carried_totals(tmp_path):
    saved = saved_job_state()
    metrics = JobMetrics("lib-resume", publish=Publish(targets_dir=tmp_path, linger_timeout=30), resuming=True)
    scraper = Scraper(metrics.metrics_port)
    assert "trainer_steps_total" not in scraper.scrape()          # scraped during init: no totals yet
    metrics.load_state_dict(saved)
    starter = threading.Thread(target=metrics.start)
    starter.start()
    starter.join(timeout=0.5)
    assert starter.is_alive()            # that scrape did not read the totals: Prometheus would miss them
    assert scraper.scrape()["trainer_steps_total"][0].value == 2
    starter.join(timeout=10)
    assert not starter.is_alive() and metrics.state == "running"
    metrics.finish("completed")
    closer = threading.Thread(target=metrics.close)
    closer.start()
    scraper.scrape()
    closer.join(timeout=10)
    scraper.close()


def test_step_histogram_uses_training_buckets_and_counts_every_step():
    metrics = JobMetrics("lib-2")
    metrics.start()
    for _ in metrics.timed(range(7)):
        time.sleep(0.002)
        metrics.step(samples=1)
    found = samples_by_name(metrics)
    bounds = [float(s.labels["le"]) for s in found["trainer_step_duration_seconds_bucket"]][:-1]
    assert tuple(bounds) == instruments.DURATION_BUCKETS
    assert found["trainer_step_duration_seconds_count"][0].value == 7
    assert found["trainer_data_wait_seconds_count"][0].value == 8      # 7 batches and the end of the pass
    assert found["trainer_step_duration_seconds_sum"][0].value >= 7 * 0.002
    assert found["trainer_step_duration_max_seconds"][0].value >= 0.002
    metrics.finish("completed")
    metrics.close()


def test_memory_stays_flat_over_100000_steps_when_nothing_scrapes():
    metrics = JobMetrics("lib-memory", log_every=10_000_000)     # one endless log interval: losses pile up
    metrics.start()

    def run(steps: int) -> None:
        for _ in metrics.timed(range(steps)):
            metrics.step(loss=torch.tensor(0.5), samples=1)

    run(5_000)
    tracemalloc.start()
    try:
        run(10_000)
        after_warmup = tracemalloc.get_traced_memory()[0]
        run(90_000)
        after_all = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert metrics.steps == 105_000
    # Step times, data waits and unread losses are folded as they come: no growth per step.
    assert after_all - after_warmup < 256 * 1024, (after_warmup, after_all)
    metrics.finish("completed")
    assert samples_by_name(metrics)["trainer_step_duration_seconds_count"][0].value == 105_000
    metrics.close()


def test_exception_marks_failed_with_error_class_and_interrupt_marks_cancelled():
    failing = JobMetrics("lib-3")
    with pytest.raises(ZeroDivisionError):
        with failing:
            1 / 0
    assert failing.state == "failed" and failing.error_type == "ZeroDivisionError"

    interrupted = JobMetrics("lib-4")
    with pytest.raises(KeyboardInterrupt):
        with interrupted:
            raise KeyboardInterrupt
    assert interrupted.state == "cancelled" and interrupted.error_type is None


def test_failure_info_series_names_the_error_class():
    metrics = JobMetrics("lib-5")
    metrics.start()
    metrics.finish("failed", RuntimeError("boom"))
    found = samples_by_name(metrics)
    assert found["trainer_job_failure_info"][0].labels["error_type"] == "RuntimeError"
    assert found["trainer_job_end_timestamp_seconds"][0].value >= found["trainer_job_start_timestamp_seconds"][0].value
    metrics.close()


def test_no_metric_call_raises_whatever_it_is_given():
    metrics = JobMetrics("lib-6", log_every=1)
    metrics.start()
    metrics.step(loss="not a number", samples=1)
    metrics.step(loss=torch.tensor(float("nan")), samples=1)
    assert metrics.steps == 2
    metrics.step(loss=torch.tensor(2.0), samples=1)
    metrics.eval(loss="x", accuracy=object())
    metrics.eval(loss=float("inf"), accuracy=float("nan"))
    metrics.set_learning_rate("fast")
    metrics.set_epoch(None)
    metrics.step(loss=None, samples="many")
    metrics.set_state("exploded")
    metrics.finish("unheard-of")
    found = samples_by_name(metrics)
    # The SDK drops NaN gauges: the divergence is counted instead, and the gauge keeps finite values only.
    assert found["trainer_loss_nonfinite_total"][0].value == 1
    assert found["trainer_loss"][0].value == 2.0
    assert found["trainer_evaluations_total"][0].value == 2   # counted, their non-numbers left out
    assert "trainer_eval_loss" not in found
    metrics.close()


def test_a_bool_is_no_loss_and_no_evaluation_result():
    """step(loss=True) was a loss of 1.0 and eval(accuracy=True) an accuracy of 100 %: a flag passed where a
    measure belongs is left out, as any other non-number. And a value left out on an interval's last step
    skipped the interval's end: the next step's loss joined it."""
    metrics = JobMetrics("lib-6a", log_every=2)
    metrics.start()
    metrics.step(loss=0.25, samples=1)
    metrics.step(loss=True, samples=1)
    metrics.step(loss=np.bool_(True), samples=1)
    metrics.step(loss=0.75, samples=1)
    for flag in (torch.tensor(True), np.array(True)):      # a 0-d tensor or array of bools is a flag too
        metrics.step(loss=flag, samples=1)
        metrics.step(loss=0.75, samples=1)
    metrics.set_learning_rate(0.5)
    metrics.eval(loss=0.5, accuracy=0.5)
    for true, false in ((True, False), (torch.tensor(True), torch.tensor(False)), (np.array(True), np.array(False))):
        metrics.eval(loss=false, accuracy=true)
        metrics.set_learning_rate(true)
    assert metrics.steps == 8
    found = samples_by_name(metrics)
    assert metrics.loss_first == 0.25 and metrics.loss_intervals == 4 and metrics.loss_sum == 0.25 + 3 * 0.75
    assert found["trainer_loss"][0].value == 0.75
    assert found["trainer_eval_accuracy_max_ratio"][0].value == 0.5
    assert found["trainer_eval_loss_min"][0].value == 0.5
    assert found["trainer_learning_rate"][0].value == 0.5
    metrics.close()


def test_the_sample_counter_takes_whole_non_negative_counts_only(caplog):
    """A negative count made the counter go down (a reset to Prometheus) and a NaN stayed in it for good."""
    metrics = JobMetrics("lib-6b", log_every=1)
    metrics.start()
    for odd in (-5, float("nan"), 2.7, True, "many", None):
        metrics.step(loss=1.0, samples=odd)
    for whole in (10, np.int64(3), torch.tensor(4), 8.0, np.float64(2.0)):     # whole floats count too
        metrics.step(loss=1.0, samples=whole)
    assert metrics.steps == 11
    assert samples_by_name(metrics)["trainer_samples_total"][0].value == 27
    assert sum("step() got a value it cannot use" in record.message for record in caplog.records) == 1
    metrics.close()


def test_invalid_job_id_is_rejected():
    for bad in ("", "-x", "a b", "x" * 65, 'a"}', "ünï"):
        with pytest.raises(ValueError, match="invalid job id"):
            JobMetrics(bad)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L40", 90.5e12),                # read as an "L4" (30.3 TFLOP/s): its MFU published 3x too high
    ("NVIDIA T400 4GB", None),              # read as a "T4" (8.1 TFLOP/s, its own is 1.1): 7x too low
    ("NVIDIA GH200 480GB", 67e12),          # an H100's compute, not named "H200"
    ("NVIDIA H100 NVL", 60e12),
    ("NVIDIA L4", 30.3e12),
    ("NVIDIA L40S", 91.6e12),
    ("NVIDIA H100 PCIe", 51e12),
    ("NVIDIA H100 80GB HBM3", 67e12),
    ("NVIDIA A100-SXM4-80GB", 19.5e12),
    ("Tesla V100-SXM2-16GB", 15.7e12),
    ("Tesla V100S-PCIE-32GB", 16.4e12),
    ("Tesla T4", 8.1e12),
])
def test_a_gpus_peak_is_its_own_models_not_one_whose_name_is_part_of_it(monkeypatch, name, peak):
    """The known GPUs were matched as substrings of torch's device name: an L40 took the L4's peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0)) == peak


@pytest.mark.parametrize("name, peak", [
    ("Tesla V100-PCIE-16GB", 14e12),        # read as a V100 SXM2 (15.7 TFLOP/s): its MFU published 11 % too low
    ("Tesla V100-PCIE-32GB", 14e12),
    ("Tesla V100-SXM2-32GB", 15.7e12),
])
def test_a_v100_pcie_has_its_own_peak_not_the_sxm2_ones(monkeypatch, name, peak):
    """A V100 PCIe card (14 TFLOP/s FP32) matched "V100" and took the SXM2 module's 15.7 TFLOP/s."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0)) == peak


@pytest.mark.parametrize("name", ["NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                                  "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H100 PCIe MIG 2g.20gb"])
def test_a_mig_slice_has_no_known_peak(monkeypatch, name):
    """A MIG slice (torch names it after its GPU, then "MIG 1g.5gb") took the whole GPU's peak: a 1g slice has 14
    of an A100's 108 SMs, and its MFU was published about 7x too low. Its peak is unknown: --peak-flops gives it."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0)) is None

@pytest.mark.parametrize("device, peak", [("cuda:1", 3 * 2**30), ("cuda", 2**30), ("cuda-a100", 2**30)])
def test_a_jobs_gpu_memory_peak_is_its_own_gpus_not_the_current_ones(monkeypatch, device, peak):
    """trainer_gpu_memory_peak_bytes was torch.cuda.max_memory_allocated() of the calling thread's current device: a
    job on cuda:1 (`trainmetrics train --device cuda:1`, or a loop's model.to("cuda:1"): neither makes it current)
    published GPU 0's peak. No GPU here: the allocator's peaks are stood in for per device, the current one 0 as in a
    process that never set another. `cuda` alone, or a label torch reads as no device, is the current one."""
    peaks = {0: 2**30, 1: 3 * 2**30}

    def max_memory_allocated(device=None):
        index = device if isinstance(device, int) else None if device is None else torch.device(device).index
        return peaks[0 if index is None else index]

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    metrics = JobMetrics("gpu-peak", JobInfo(model="mlp", device=device),
                         Publish(listen=None, targets_dir=None, job_dir=None), log_every=2)
    try:
        metrics.start()
        for _ in range(2):
            metrics.step(loss=1.0, samples=8)
        assert value(metrics, "trainer_gpu_memory_peak_bytes") == peak
    finally:
        metrics.finish("completed")
        metrics.close()



def test_served_metrics_pass_promtool_check():
    metrics = JobMetrics("lib-7", JobInfo(model="cnn", dataset="digits", upload_seconds=0.1), Publish(),
                         log_every=1, flops_per_sample=1e6, peak_flops=1e12)
    metrics.start()
    for _ in metrics.timed(range(3)):
        metrics.step(loss=torch.tensor(1.0), samples=4)
    with metrics.checkpoint():
        pass
    for _ in range(3):
        metrics.eval(loss=1.0, accuracy=0.5)
    metrics.set_epoch(0)
    metrics.set_learning_rate(0.01)
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.metrics_port}/metrics").read()
    metrics.finish("completed")
    metrics.close()
    check = subprocess.run([find_binary("promtool"), "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", check


def test_every_evaluation_reaches_a_scraper_in_order_however_fast_they_come(tmp_path):
    metrics = JobMetrics("lib-evals", publish=Publish(targets_dir=tmp_path, linger_timeout=30), log_every=1)
    scraper = Scraper(metrics.metrics_port)
    scraper.scrape()
    metrics.start()
    for step in range(1, 21):                      # 20 evaluations between two scrapes
        metrics.step(loss=1.0 / step, samples=1)
        metrics.eval(loss=1.0 / step, accuracy=step / 20)
    seen: dict[int, tuple[float, float]] = {}
    for _ in range(4):                             # 8 slots per scrape: 3 scrapes deliver them all
        found = scraper.scrape()
        indices = {s.labels["slot"]: int(s.value) for s in found["trainer_eval_history_index"]}
        steps = {s.labels["slot"]: s.value for s in found["trainer_eval_history_step"]}
        accuracy = {s.labels["slot"]: s.value for s in found["trainer_eval_history_accuracy_ratio"]}
        for slot, index in indices.items():
            seen[index] = (steps[slot], accuracy[slot])
    assert sorted(seen) == list(range(1, 21))
    assert all(seen[i] == (i, i / 20) for i in seen)
    metrics.finish("completed")
    closer = threading.Thread(target=metrics.close)
    closer.start()
    scraper.scrape()
    closer.join(timeout=20)
    assert not closer.is_alive()
    scraper.close()


def test_the_linger_waits_for_unread_evaluations(tmp_path):
    metrics = JobMetrics("lib-evals-2", publish=Publish(targets_dir=tmp_path, linger_timeout=30), log_every=1)
    scraper = Scraper(metrics.metrics_port)
    scraper.scrape()
    metrics.start()
    for step in range(3 * evaluations.SLOTS):
        metrics.step(samples=1)
        metrics.eval(loss=float(step))
    metrics.finish("completed")
    closer = threading.Thread(target=metrics.close)
    closer.start()
    scrapes = 0
    while closer.is_alive() and scrapes < 10:
        found = scraper.scrape()
        scrapes += 1
        closer.join(timeout=0.3)
    assert not closer.is_alive()
    assert scrapes == 3                           # the first scrape after the end is not enough
    assert max(s.value for s in found["trainer_eval_history_index"]) == 3 * evaluations.SLOTS
    scraper.close()


def test_the_linger_counts_scrapers_only_and_waits_for_each(tmp_path):
    metrics = JobMetrics("lib-8", publish=Publish(targets_dir=tmp_path, linger_timeout=30))
    target = tmp_path / "lib-8.rank0.json"
    assert target.exists()
    first, second, curl = (Scraper(metrics.metrics_port), Scraper(metrics.metrics_port),
                           Scraper(metrics.metrics_port, counting=False))
    first.scrape(), second.scrape()                # an HA pair scrapes the job
    metrics.start()
    metrics.finish("completed")
    closer = threading.Thread(target=metrics.close)
    closer.start()
    for _ in range(5):                             # anything else reading /metrics does not count
        assert curl.scrape()
    first.scrape()
    closer.join(timeout=1.0)
    assert closer.is_alive()                       # the second scraper has not read the end yet
    found = second.scrape()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert [s.labels["state"] for s in found["trainer_job_state"] if s.value == 1] == ["completed"]
    assert not target.exists()
    for scraper in (first, second, curl):
        scraper.close()


def test_linger_is_bounded_when_nobody_scrapes(tmp_path):
    metrics = JobMetrics("lib-9", publish=Publish(targets_dir=tmp_path, linger_timeout=0.3))
    metrics.start()
    metrics.finish("completed")
    began = time.monotonic()
    metrics.close()
    assert 0.3 <= time.monotonic() - began < 5
    assert list(tmp_path.iterdir()) == []


USER_LOOP = textwrap.dedent("""
    import sys, time
    from trainmetrics.trainer.metrics import JobInfo, JobMetrics
    from trainmetrics.trainer.telemetry import Publish

    with JobMetrics("lib-sigterm", JobInfo(model="mlp"),
                    Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=60)) as m:
        print("training", flush=True)
        while True:
            m.step(loss=1.0, samples=1)
            time.sleep(0.001)
""")


def test_sigterm_ends_a_users_loop_cancelled_and_a_second_one_cuts_the_linger_short(tmp_path):
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    process = subprocess.Popen([sys.executable, "-c", USER_LOOP, str(targets), str(jobs)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        scraper = scraper_of_announced_job(targets)
        scraper.scrape()                           # the loop starts once a scraper has seen the job
        assert process.stdout.readline() == "training\n"
        process.terminate()
        time.sleep(0.5)
        assert process.poll() is None              # lingering: the scraper has not read the end
        assert [s.labels["state"] for s in scraper.scrape()["trainer_job_state"] if s.value == 1] == ["cancelled"]
        process.wait(timeout=10)
        scraper.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert process.returncode != 0                 # KeyboardInterrupt propagates out of the user's loop
    assert not list(targets.glob("*")) and not list(jobs.glob("*"))

    # A second signal while it lingers: it stops waiting at once, and still leaves nothing behind.
    process = subprocess.Popen([sys.executable, "-c", USER_LOOP, str(targets), str(jobs)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        scraper = scraper_of_announced_job(targets)
        scraper.scrape()
        scraper.close()
        assert process.stdout.readline() == "training\n"
        process.terminate()
        time.sleep(0.5)
        began = time.monotonic()
        process.terminate()
        process.wait(timeout=10)
        assert time.monotonic() - began < 5
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert not list(targets.glob("*")) and not list(jobs.glob("*"))


def test_scrapers_without_keep_alive_are_forgotten_once_gone():
    # Each scrape on a new connection is a new scraper name: 345,600 a day at 250 ms, kept for ever before.
    from trainmetrics.metrics_http import Scrape
    from trainmetrics.trainer.telemetry import FORGET_SECONDS, ScraperLog

    now = [0.0]
    log = ScraperLog(clock=lambda: now[0])
    for port in range(2000):
        now[0] = port * 0.25
        log.delivered(Scrape(f"127.0.0.1:{port}", now[0]))
    assert len(log._scrapers) <= FORGET_SECONDS / 0.25 + 2
    assert log.active() == {f"127.0.0.1:{port}" for port in range(1991, 2000)}      # the last 2 s
    assert log.any_since(now[0] - 1)


def test_a_scraper_whose_close_a_frozen_job_saw_late_is_still_owed_a_read_on_a_new_connection():
    """A job frozen (a lazy import holding the GIL, a starved process) past MIN_ACTIVE_SECONDS sees its scrapers'
    closes only when it wakes: timed from their last scrapes, both counted as gone at once, and the final linger
    ended on whichever Prometheus came back first; the other never read the end."""
    from trainmetrics.metrics_http import Scrape
    from trainmetrics.trainer.telemetry import MIN_ACTIVE_SECONDS, ScraperLog

    now = [0.0]
    log = ScraperLog(clock=lambda: now[0])
    log.delivered(Scrape("127.0.0.1:1", 0.0))
    now[0] = MIN_ACTIVE_SECONDS + 0.5         # the freeze: the scraper timed its scrape out and hung up meanwhile
    log.asked(Scrape("127.0.0.1:1", now[0]))   # (that scrape's request, read when the job woke, never answered)
    log.closed("127.0.0.1:1")
    now[0] += 0.25
    assert log.active() == {"127.0.0.1:1"}     # owed a read until it can have come back on a new connection
    now[0] += MIN_ACTIVE_SECONDS
    assert log.active() == set()


def test_a_scraper_whose_idle_connection_closed_past_its_window_is_not_owed_a_read_again():
    """A close seen late is a scrape given up by a frozen job's scraper only when the connection carried one: an
    idle connection closed long after its last scrape (our idle timeout, an eviction, its client) was owed a read
    again for MIN_ACTIVE_SECONDS from that close, and the final linger waited for a scraper gone long before."""
    from trainmetrics.metrics_http import DEFAULT_IDLE_TIMEOUT, Scrape
    from trainmetrics.trainer.telemetry import ScraperLog

    now = [0.0]
    log = ScraperLog(clock=lambda: now[0])
    log.delivered(Scrape("127.0.0.1:1", 0.0, timeout=0.2))
    now[0] = DEFAULT_IDLE_TIMEOUT
    log.closed("127.0.0.1:1")
    assert log.active() == set()


def test_the_metrics_server_sleeps_until_a_connection_or_close(monkeypatch):
    # No poll: socketserver's serve_forever woke 10 times a second (~1.6 ms of CPU a second on an idle job).
    import selectors

    from trainmetrics import metrics_http

    timeouts = []

    class Recording(selectors.DefaultSelector):
        def select(self, timeout=None):
            timeouts.append(timeout)
            return super().select(timeout)

    monkeypatch.setattr(metrics_http.selectors, "DefaultSelector", Recording)
    server = metrics_http.MetricsHTTPServer(("127.0.0.1", 0), lambda scrape: b"up 1\n").serve_in_background()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        assert response.read() == b"up 1\n"
    thread = server._thread
    began = time.monotonic()
    server.close()
    assert time.monotonic() - began < 2 and not thread.is_alive()
    assert timeouts and set(timeouts) == {None}


# ----- a user's odd calls (a QA pass found each; every test failed before) ------------------------------------

def test_an_interval_of_infinities_of_both_signs_counts_as_non_finite_and_the_pending_list_stays_bounded():
    metrics = JobMetrics("lib-infinities", log_every=2)
    try:
        metrics.start()
        for loss in (float("inf"), float("-inf"), 1e308, 1e308, 1.0, 3.0):    # inf - inf, an overflow, finite
            metrics.step(loss=loss, samples=1)
        assert value(metrics, "trainer_loss_nonfinite_total") == 2 and value(metrics, "trainer_loss") == 2.0
        endless = JobMetrics("lib-endless", log_every=10**9)
        try:
            endless.start()
            for loss in [float("inf"), float("-inf")] + [0.5] * 2000:
                endless.step(loss=loss, samples=1)
            assert len(endless._losses.floats) < 300 and endless._losses.count == 2002
        finally:
            endless.close()
    finally:
        metrics.close()


def test_negative_losses_are_summed_in_a_gauge():
    metrics = JobMetrics("lib-negative", log_every=1)
    try:
        metrics.start()
        for loss in (2.0, -1.0, -3.0):         # a Gaussian NLL, an ELBO: a counter here would seem to reset
            metrics.step(loss=loss, samples=1)
        families = {family.name: family for family in text_string_to_metric_families(metrics.collect().decode())}
        assert families["trainer_loss_accumulated"].type == "gauge"
        assert value(metrics, "trainer_loss_accumulated") == -2.0
    finally:
        metrics.close()


def test_a_state_that_is_not_one_is_refused_whole():
    metrics = JobMetrics("lib-garbage", log_every=1)
    try:
        for garbage in ({"steps": 10, "step_duration_max": "x"}, {"steps": 10, "loss_min": "abc"},
                        {"steps": -100}, {"steps": 10, "loss_sum": float("nan")}, {"steps": 10, "phases": [1]}):
            metrics.load_state_dict(garbage)
            assert metrics.steps == 0 and metrics._carried_known_at is not None
        metrics.start()
        for _ in range(5):
            metrics.step(loss=1.0, samples=1)
        assert (value(metrics, "trainer_steps_total"), value(metrics, "trainer_loss_intervals_total")) == (5, 5)
    finally:
        metrics.close()


def test_a_state_whose_finite_losses_overflowed_their_sum_is_taken_back_whole():
    """Three finite interval losses of 1.5e308 sum to infinity, and state_dict() wrote loss_sum inf, which
    load_state_dict() refused whole: the job's own checkpoint carried none of its counters (a resumed trainer went
    on from step 0 at the checkpoint's position in the data)."""
    with JobMetrics("lib-overflowed-sum", log_every=1) as first:
        first.start()
        for _ in range(3):
            first.step(loss=1.5e308, samples=4)
        state = first.state_dict()
    assert state["loss_sum"] == float("inf")
    resumed = JobMetrics("lib-overflowed-sum", log_every=1)
    try:
        resumed.load_state_dict(state)
        assert (resumed.steps, resumed.samples, resumed.loss_intervals) == (3, 12, 3)
        assert resumed.loss_sum == float("inf") and resumed.loss_first == 1.5e308
    finally:
        resumed.close()


def test_a_failure_is_said_once_per_job_not_once_per_process(caplog):
    first, second = JobMetrics("lib-first"), JobMetrics("lib-second")
    try:
        for metrics in (first, second):
            metrics.load_state_dict({"steps": "many"})
        failed = [record for record in caplog.records if "load_state_dict failed" in record.getMessage()]
        assert [record.getMessage().split()[1] for record in failed] == ["lib-first:", "lib-second:"]
    finally:
        first.close()
        second.close()


def test_job_info_that_is_not_text_is_refused_in_one_line():
    """JobInfo(model=None) failed in the exposition's escaping: AttributeError, 'NoneType' object has no attribute
    'replace'."""
    for fields in ({"model": None}, {"dataset": 3}, {"owner": b"bytes"}, {"device": None}):
        with pytest.raises(TypeError, match=f"JobInfo.{next(iter(fields))} must be text, not"):
            JobInfo(**fields)
    assert JobInfo(job_name=None, owner=None).owner is None


def test_a_non_finite_learning_rate_keeps_the_last_one():
    metrics = JobMetrics("lib-lr")
    try:
        metrics.set_learning_rate(torch.tensor(0.01))
        metrics.set_learning_rate(float("nan"))
        assert value(metrics, "trainer_learning_rate") == pytest.approx(0.01)
    finally:
        metrics.close()


def test_marked_phases_nest_and_before_training_they_are_not_init_too():
    metrics = JobMetrics("lib-phases")
    try:
        with metrics.phase("eval"):            # an evaluation before the first step
            time.sleep(0.1)
        assert metrics.phases.phase == "init"
        metrics.start()
        with metrics.phase("eval"):
            time.sleep(0.05)
            with metrics.phase("collective"):
                time.sleep(0.05)
            assert metrics.phases.phase == "eval"
            time.sleep(0.1)

        def failing():
            yield 1
            time.sleep(0.05)
            raise OSError("the loader's disk went away")

        with pytest.raises(OSError):
            for _ in metrics.timed(failing()):
                metrics.step(loss=1.0, samples=1)
        assert metrics.phases.phase == "compute"
        totals = metrics.phases.totals()
        age = time.time() - metrics.phases.process_start
    finally:
        metrics.close()
    assert sum(totals.values()) == pytest.approx(age, abs=0.02)
    assert totals["eval"] == pytest.approx(0.25, abs=0.03) and totals["collective"] == pytest.approx(0.05, abs=0.02)
    assert totals["data_wait"] >= 0.05 and totals["compute"] < 0.05


def test_a_scrape_between_the_loops_stores_counts_a_finished_data_wait_once(monkeypatch):
    """A scrape after timed() added a wait to the data-wait sum and before it left the data phase counted the
    wait twice (the sum, and the phase in progress since the wait began), and the total kept it: each only grows.
    Here a scrape is made at that moment, from inside each store of a histogram's sum."""
    jobs, read_at_the_store = [], []

    class ReadOnStore(DurationHistogram):
        __slots__ = ("_totals",)

        @property
        def totals(self):
            return self._totals

        @totals.setter
        def totals(self, value):
            self._totals = value
            if jobs:
                read_at_the_store.append(sum(jobs[0].phases.totals().values()))

    slept = []

    def slow_loader():
        for batch in range(3):
            began = time.perf_counter()
            time.sleep(0.05)
            slept.append(time.perf_counter() - began)
            yield batch

    monkeypatch.setattr(metrics_module, "DurationHistogram", ReadOnStore)
    metrics = JobMetrics("lib-phase-tear")
    jobs.append(metrics)
    try:
        metrics.start()
        for _ in metrics.timed(slow_loader()):
            metrics.step(loss=1.0, samples=1)
        totals = metrics.phases.totals()
        age = time.time() - metrics.phases.process_start
    finally:
        metrics.close()
    assert len(read_at_the_store) >= 4 and max(read_at_the_store) <= age + 1e-3     # a double count: 0.05 s
    assert sum(totals.values()) == pytest.approx(age, abs=0.01)
    assert totals["data_wait"] == pytest.approx(sum(slept), abs=0.01)       # (a busy host sleeps longer)


def test_scrapes_while_phases_change_never_count_more_than_the_process_lived():
    """A scrape between a marked phase's seconds being summed and the phase being left counted them twice, and
    kept them (a 0.5 s checkpoint read as 1 s). Scrapes here run beside checkpoints with the interpreter switching
    threads as often as it can."""
    metrics = JobMetrics("lib-phase-race")
    over, done = [], threading.Event()
    # The age on the monotonic clock the totals are counted by, from one offset: read from time.time(), a wall
    # clock slewed by NTP meanwhile (1.4 ms in a few seconds on a busy VM) read as totals ahead of it, for good.
    epoch = time.time() - time.perf_counter()

    def ahead() -> float:
        """How far the totals are ahead of the process's age. The process's start is read from /proc to the kernel's
        clock tick (10 ms): the first job of a process (its init counted from that start) starts up to a tick
        ahead or behind, so what counts is that it never grows."""
        return sum(metrics.phases.totals().values()) - (epoch + time.perf_counter() - metrics.phases.process_start)

    def scrape():
        while not done.is_set():
            if ahead() > at_start + 1e-3:
                over.append(ahead() - at_start)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scraper = threading.Thread(target=scrape)
    try:
        metrics.start()
        at_start = ahead()
        scraper.start()
        for _ in range(300):
            with metrics.checkpoint():
                time.sleep(0.002)
            with metrics.phase("eval"):
                time.sleep(0.002)
    finally:
        done.set()
        scraper.join()
        sys.setswitchinterval(switch)
        metrics.close()
    assert over == []


def test_phase_and_state_series_show_one_at_1_while_they_change(monkeypatch):
    """The series read the phase (and the state) once for each name: a change between two reads showed two
    phases at 1, or none. Here each read of the phase gives the next one."""
    metrics = JobMetrics("lib-one-phase")
    phases = iter(["compute", "data_wait"] * 20)
    try:
        metrics.start()
        monkeypatch.setattr(type(metrics.phases), "phase", property(lambda self: next(phases)), raising=False)
        at_1 = [sample.labels["phase"] for sample in samples_by_name(metrics)["trainer_phase"] if sample.value == 1]
    finally:
        metrics.close()
    assert len(at_1) == 1


def test_a_data_loader_iterated_in_a_marked_phase_is_that_phases_time():
    """An evaluation's loader iterated with timed() inside phase("eval") set the phase to data wait and compute
    itself: the evaluation's time went to compute and data wait, and the phase read compute during it."""
    metrics = JobMetrics("lib-eval-loader")

    def loader():
        for batch in range(3):
            time.sleep(0.03)
            yield batch

    try:
        started = time.perf_counter()
        metrics.start()
        began = time.perf_counter()
        with metrics.phase("eval"):
            for _ in metrics.timed(loader()):
                assert metrics.phases.phase == "eval"
                time.sleep(0.03)
        took = time.perf_counter() - began          # the sleeps' 0.18 s, and what a busy host adds to them
        assert metrics.phases.phase == "compute"
        totals = metrics.phases.totals()
        whole = time.perf_counter() - started
    finally:
        metrics.close()
    assert totals["eval"] == pytest.approx(took, abs=0.01) and took >= 0.18
    # compute is the time outside the evaluation only (however long a busy host took to get there)
    assert totals["data_wait"] == 0 and metrics.data_waits.count == 0 and totals["compute"] <= whole - took + 0.01


def test_an_unknown_phase_name_is_warned_once_and_counts_as_compute(caplog):
    """phase("evaluation") counted as compute without a word: the goodput ledger showed no eval time."""
    metrics = JobMetrics("lib-typo")
    try:
        metrics.start()
        for _ in range(3):
            with metrics.phase("evaluation"):
                assert metrics.phases.phase == "compute"
        with metrics.phase("eval"):
            pass
    finally:
        metrics.close()
    warned = [record.getMessage() for record in caplog.records if "phase 'evaluation'" in record.getMessage()]
    assert len(warned) == 1 and "its time counts as compute" in warned[0]
    assert not [record for record in caplog.records if "phase 'eval'" in record.getMessage()]


def test_set_epoch_takes_whole_numbers_only(caplog):
    """set_epoch(2.7) was published as epoch 2."""
    import numpy as np

    metrics = JobMetrics("lib-epoch")
    try:
        metrics.set_epoch(np.int64(3))
        metrics.set_epoch(2.7)
        metrics.set_epoch(True)
        assert metrics.epoch == 3
        metrics.set_epoch(4.0)
        assert metrics.epoch == 4
    finally:
        metrics.close()
    warned = [record.getMessage() for record in caplog.records if "set_epoch()" in record.getMessage()]
    assert len(warned) == 1 and "got 2.7 (not a whole number): the epoch stays 3" in warned[0]


def test_a_failed_checkpoint_write_is_not_the_next_steps_time():
    """A loop that caught a failed write and went on timed the write as its next step (peak step time, hangs)."""
    metrics = JobMetrics("lib-failed-ckpt", publish=Publish(listen=None)).start()
    try:
        metrics.step(loss=1.0, samples=1)
        with pytest.raises(OSError):
            with metrics.checkpoint():
                time.sleep(0.5)
                raise OSError("disk full")
        metrics.step(loss=1.0, samples=1)
        assert metrics.checkpoints == 0 and metrics.step_duration_max < 0.4
    finally:
        metrics.close()


def test_an_ended_job_stays_as_it_ended():
    paused = JobMetrics("lib-set-paused")
    try:
        paused.set_state("paused")               # a state set on the way, not an end: pause() still ends the run
        paused.pause()
        assert paused.ended and value(paused, "trainer_job_end_timestamp_seconds") is not None
    finally:
        paused.close()
    metrics = JobMetrics("lib-ended")
    try:
        metrics.start()
        metrics.finish("completed")
        metrics.pause()
        metrics.start()
        metrics.set_state("running")
        assert metrics.state == "completed" and value(metrics, "trainer_job_end_timestamp_seconds") is not None
    finally:
        metrics.close()
    with pytest.raises(SystemExit):
        with JobMetrics("lib-exit") as exiting:
            sys.exit(0)                      # success, by Python's convention
    assert exiting.state == "completed"


def test_an_accuracy_that_is_not_a_ratio_is_left_out_and_a_second_close_does_nothing(caplog):
    metrics = JobMetrics("lib-accuracy")
    metrics.eval(loss=0.5, accuracy=0.9)
    metrics.eval(loss=0.4, accuracy=95)          # 95 %: as the running max it would stay for good
    assert value(metrics, "trainer_eval_accuracy_max_ratio") == 0.9
    metrics.close()
    caplog.clear()
    metrics.close()
    assert not [record for record in caplog.records if record.levelno >= 30]


def test_a_resumed_process_watches_for_spikes_at_once():
    """The detector's running mean was not carried: a resume was blind for its warm-up (10 intervals), so the
    spike a job had paused on went unflagged when its batch came again."""
    first = JobMetrics("lib-spiky", log_every=1)
    first.start()
    for step in range(30):
        first.step(loss=1.0 + 0.01 * (step % 3), samples=1)
    saved = json.loads(json.dumps(first.state_dict()))
    first.pause()
    first.close()
    second = JobMetrics("lib-spiky", log_every=1)
    second.load_state_dict(saved)
    second.start()
    second.step(loss=100.0, samples=1)
    assert second.spikes.spikes == 1
    second.close()
    refused = JobMetrics("lib-spiky-bad", log_every=1)
    refused.load_state_dict({**saved, "loss_spike_detector": {"mean": "x"}, "steps": 7})
    assert refused.steps == 0                                   # refused whole
    refused.close()


def test_a_processs_own_nan_and_spike_counts_start_at_0_whatever_it_carries():
    """TrainerLossNaN and TrainerLossSpike read the process's own counts: the job's, carried over from a
    checkpoint, jump at a resume (down, or up: 3 -> 1 -> 3 at one address, resumed from an older checkpoint and
    then from the newest), which no rule tells from a new one."""
    def own(metrics):
        return (value(metrics, "trainer_process_loss_nonfinite_total"),
                value(metrics, "trainer_process_loss_spikes_total"))

    def jobs(metrics):
        return value(metrics, "trainer_loss_nonfinite_total"), value(metrics, "trainer_loss_spikes_total")

    first = JobMetrics("lib-own", log_every=1)
    first.start()
    assert own(first) == (0, 0)
    for step in range(30):
        first.step(loss=1.0 + 0.01 * (step % 3), samples=1)
    for loss in (float("nan"), 100.0):
        first.step(loss=loss, samples=1)
    assert own(first) == jobs(first) == (1, 1)
    saved = json.loads(json.dumps(first.state_dict()))
    first.pause()
    first.close()
    second = JobMetrics("lib-own", resuming=True, log_every=1)
    assert own(second) == (0, 0)                  # scraped before its checkpoint is read
    second.load_state_dict(saved)
    assert own(second) == (0, 0) and jobs(second) == (1, 1)
    second.start()
    for loss in (1.0, float("inf"), 100.0):
        second.step(loss=loss, samples=1)
    assert own(second) == (1, 1) and jobs(second) == (2, 2)
    second.close()


def test_a_pause_in_the_block_stays_paused_when_the_block_ends():
    """pause() then the end of the `with` block (or an error after it) published `completed` (or `failed`) and
    moved the end: the run ended paused, and a finish() after it changes nothing."""
    for ending in ("normally", "with an error"):
        try:
            with JobMetrics(f"paused-{ending.split()[0]}", publish=Publish(listen=None)) as metrics:
                metrics.step(loss=1.0, samples=4)
                metrics.pause()
                paused_at = metrics.end_time
                if ending == "with an error":
                    raise RuntimeError("after the pause")
        except RuntimeError:
            pass
        # (the block's end closed it: its series are no longer collected; trainer_job_state reads `state`)
        assert (metrics.state, metrics.end_time, metrics.error_type) == ("paused", paused_at, None), ending
        metrics.finish("completed")
        assert metrics.state == "paused"


def test_a_step_after_the_run_ended_is_not_counted_and_one_before_start_is_said(caplog):
    metrics = JobMetrics("outside-run", publish=Publish(listen=None))
    metrics.step(loss=1.0, samples=4)                          # before start(): counted, said once
    metrics.step(loss=1.0, samples=4)
    metrics.start()
    metrics.step(loss=1.0, samples=4)
    metrics.finish("completed")
    ended_phase = [s.labels["phase"] for s in samples_by_name(metrics)["trainer_phase"] if s.value == 1]
    metrics.step(loss=1.0, samples=4)                          # after the end: not counted
    assert (metrics.steps, metrics.samples) == (3, 12)
    assert value(metrics, "trainer_steps_total") == 3
    assert [s.labels["phase"] for s in samples_by_name(metrics)["trainer_phase"] if s.value == 1] == ended_phase
    said = [r.getMessage() for r in caplog.records if "step() while the job is" in r.getMessage()]
    assert len(said) == 1 and "call start() first" in said[0]
    metrics.close()


def test_before_start_the_live_phase_is_init_as_its_time_is():
    """A batch fetched and a step taken before start(): their time is init's (docs/metrics.md), and the live
    phase said so too (it showed compute, then data_wait at the loader's end, while init's total grew)."""
    metrics = JobMetrics("phase-before-start", publish=Publish(listen=None))
    try:
        for _ in metrics.timed([1, 2]):
            assert metrics.phases.phase == "init"
            metrics.step(loss=1.0, samples=4)
            assert metrics.phases.phase == "init"
        assert [s.labels["phase"] for s in samples_by_name(metrics)["trainer_phase"] if s.value == 1] == ["init"]
        assert metrics.phases.totals()["compute"] == 0
        metrics.start()
        for _ in metrics.timed([1]):
            assert metrics.phases.phase == "compute"
            metrics.step(loss=1.0, samples=4)
        assert metrics.phases.phase == "compute"
    finally:
        metrics.close()


STOPPED_WHILE_WAITING = textwrap.dedent("""
    import signal, sys, time
    from trainmetrics.trainer.metrics import JobMetrics
    from trainmetrics.trainer.telemetry import Publish

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with JobMetrics("stopped-waiting", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2],
                                                             linger_timeout=30)) as m:
            print("in the block", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("handler restored" if signal.getsignal(signal.SIGTERM) is previous else "handler left", flush=True)
""")


def test_a_stop_while_waiting_for_the_first_scrape_ends_the_job_and_leaves_nothing(tmp_path):
    """Ctrl-C or SIGTERM while `with JobMetrics(...)` waits for its first scrape: the interrupt left __enter__,
    so the block's end never ran: the target and mapping files stayed (Prometheus scraping a dead port), the
    state stayed queued, and the library's signal handlers stayed installed."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    process = subprocess.Popen([sys.executable, "-c", STOPPED_WHILE_WAITING, str(targets), str(jobs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not list(targets.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        process.terminate()                             # nobody has scraped it: it is still waiting
        port = json.loads(next(targets.glob("*.json")).read_text())[0]["targets"][0].rsplit(":", 1)[1]
        scraper = Scraper(int(port))                    # it lingers for its final state: read it
        deadline = time.monotonic() + 10
        states = []
        while time.monotonic() < deadline and states != ["cancelled"]:
            states = [s.labels["state"] for s in scraper.scrape()["trainer_job_state"] if s.value == 1]
            time.sleep(0.1)
        scraper.close()
        out, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert states == ["cancelled"]
    assert "in the block" not in out and "interrupted" in out and "handler restored" in out
    assert not list(targets.glob("*")) and not list(jobs.glob("*"))


# Announced for its files, which nothing scrapes: no linger (one of 2 s was waited out twice, for a first scrape
# and for the final state's).
FORKED_CHILD = textwrap.dedent("""
    import os, sys, time
    from trainmetrics.trainer.metrics import JobMetrics
    from trainmetrics.trainer.telemetry import Publish

    with JobMetrics("forked", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=0)) as m:
        child = os.fork()
        if child == 0:
            sys.exit(0)                  # the child leaves the block: its copy must not end the parent's job
        os.waitpid(child, 0)
        print("files after the child", *(len([n for n in os.listdir(d) if n.endswith(".json")]) for d in sys.argv[1:]),
              flush=True)
        m.step(loss=1.0, samples=1)
""")


def test_a_forked_child_leaving_the_block_leaves_the_parents_job_alone(tmp_path):
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD, str(targets), str(jobs)], capture_output=True,
                            text=True, timeout=60)
    assert "files after the child 1 1" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0 and not list(targets.glob("*")) and not list(jobs.glob("*"))


def test_a_state_taken_inside_the_checkpoint_block_counts_that_checkpoint():
    """README's pattern, `with m.checkpoint(): save(m.state_dict())`: the state was taken before the write
    counted, so the resumed process published one checkpoint fewer than the job had written (1 -> 0)."""
    first = JobMetrics("ckpt-count", publish=Publish(listen=None)).start()
    first.step(loss=1.0, samples=4)
    with first.checkpoint():
        saved = first.state_dict()
    assert first.checkpoints == 1 and first.state_dict()["checkpoints"] == 1      # counted once, either way
    first.pause()
    first.close()
    resumed = JobMetrics("ckpt-count", publish=Publish(listen=None), resuming=True)
    resumed.load_state_dict(saved)
    resumed.start()
    assert value(resumed, "trainer_checkpoints_total") == 1
    resumed.close()


def test_text_is_no_loss_and_a_run_closed_without_an_end_is_said(caplog):
    """step(loss="2.0") counted a loss of 2.0 (float() reads text); close() of a started run without finish()
    left `running` in Prometheus without a word."""
    metrics = JobMetrics("lib-text", log_every=2, publish=Publish(listen=None)).start()
    metrics.step(loss="2.0", samples=1)
    metrics.step(loss=1.0, samples=1)
    assert metrics.loss == 1.0 and metrics.steps == 2
    metrics.close()
    assert any("without finish() or pause()" in record.getMessage() for record in caplog.records)


def test_a_scrape_during_a_step_never_shows_more_step_times_than_steps():
    """docs/metrics.md: the step-time histogram is read before trainer_steps_total, "so its count never exceeds
    the steps in one scrape". The built-in loop calls step() in the optimizer phase (runner.py), so step() calls
    phases.enter() between counting the step's time and counting the step: a scrape there (another thread, the
    GIL switched at that call) read count = steps + 1."""
    metrics = JobMetrics("torn-step-count", publish=Publish(listen=None, targets_dir=None, job_dir=None))
    metrics.start()
    enter, seen = metrics.phases.enter, []

    def enter_and_scrape(phase, now=None):
        if phase == COMPUTE:        # inside step(), leaving the optimizer phase: a scrape lands here
            found = samples_by_name(metrics)
            seen.append((found["trainer_step_duration_seconds_count"][0].value
                         if "trainer_step_duration_seconds_count" in found else 0.0,
                         found["trainer_steps_total"][0].value))
        enter(phase, now)

    metrics.phases.enter = enter_and_scrape
    for _ in range(3):
        metrics.phases.enter(OPTIMIZER)
        metrics.step(loss=1.0, samples=1)
    metrics.phases.enter = enter
    metrics.finish("completed")
    metrics.close()
    assert len(seen) == 3
    assert all(count <= steps for count, steps in seen), seen


def read_soon(metrics: JobMetrics) -> bool:
    """final_state_read() once the scrape just read has been noted delivered (after its answer was written)."""
    return metrics._publication.scrapers.wait(metrics.final_state_read, 5)


def delivered_soon(metrics: JobMetrics) -> bool:
    """Every active scraper has had a scrape begun after the end delivered (noted after its answer was written)."""
    scrapers = metrics._publication.scrapers
    return scrapers.wait(lambda: all(scrapers.delivered_since(name, metrics._end_monotonic)
                                     for name in scrapers.active()), 5)


@pytest.mark.parametrize("writer", ["loop", "thread"])
def test_a_checkpoint_written_after_the_end_is_counted_in_no_phase_and_lingered_for(writer, tmp_path):
    """docs/metrics.md: a checkpoint written after pause() or finish() (the loop's last save, or an asynchronous
    writer's that ends after the run) is counted and timed, its write in no phase (the job's clock stopped at the
    end). The linger took the final state as read at a scrape before that count: the count went unread by
    Prometheus, which held the job one checkpoint short while the resume from that checkpoint carried it."""
    metrics = JobMetrics("lib-ckpt-after-end", publish=Publish(targets_dir=tmp_path, linger_timeout=30))
    scraper = Scraper(metrics.metrics_port)
    closer = threading.Thread(target=metrics.close)
    try:
        scraper.scrape()
        metrics.start()
        metrics.step(loss=1.0, samples=4)
        release, saved = threading.Event(), []

        def write():
            with metrics.checkpoint():
                release.wait(10)
                time.sleep(0.1)
                saved.append(metrics.state_dict())

        thread = threading.Thread(target=write)
        if writer == "thread":      # begun while the run is on, ended after it
            thread.start()
        metrics.pause()
        at_end = metrics.phases.totals()
        found = scraper.scrape()
        assert found["trainer_checkpoints_total"][0].value == 0
        if writer == "thread":      # the write still open will count into the final state: not read yet
            assert delivered_soon(metrics) and not metrics.final_state_read()
        else:
            assert read_soon(metrics)
        release.set()
        if writer == "thread":
            thread.join()
        else:
            write()
        assert not metrics.final_state_read()       # the count is not read yet
        found = scraper.scrape()
        assert read_soon(metrics)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()
    finally:
        release.set()
        if not closer.is_alive():
            metrics.close()
        scraper.close()
    assert found["trainer_checkpoints_total"][0].value == 1
    assert found["trainer_checkpoint_duration_seconds_count"][0].value == 1
    assert found["trainer_checkpoint_duration_seconds_sum"][0].value >= 0.1
    phases = {s.labels["phase"]: s.value for s in found["trainer_phase_seconds_total"]}
    assert phases == pytest.approx(at_end, abs=1e-6) and phases["checkpoint"] == 0       # in no phase
    assert [s.labels["phase"] for s in found["trainer_phase"] if s.value == 1] == ["paused"]
    assert saved[0]["checkpoints"] == 1 and saved[0]["phases"] == pytest.approx(at_end, abs=1e-6)



def test_the_linger_never_takes_an_after_end_checkpoint_counted_but_not_yet_stamped_as_read(tmp_path, monkeypatch):
    """A checkpoint written after the end is counted, then stamped with its moment (the final state's new end),
    both under the checkpoint lock; final_state_read() read the stamp without the lock. A check in between (the
    linger's) found the old end read by a scrape that had the old count, and the linger ended: the count was
    never read. The check now reads both under the lock: it waits for the stamp and then for a new scrape."""
    metrics = JobMetrics("lib-ckpt-stamp", publish=Publish(targets_dir=tmp_path, linger_timeout=30))
    scraper = Scraper(metrics.metrics_port)
    writer, checks, real_monotonic = threading.current_thread(), [], time.monotonic

    def check_between_count_and_stamp():
        """On the writer's first clock read after the count (its stamp): the linger's check, on its own thread."""
        if threading.current_thread() is writer and metrics.checkpoints == 1 and not checks:
            checker = threading.Thread(target=lambda: checks.append(metrics.final_state_read()))
            checks.append(checker)
            checker.start()
            checker.join(0.5)       # (blocked on the lock now: it answers once the stamp is in)
        return real_monotonic()

    try:
        scraper.scrape()
        metrics.start()
        metrics.step(loss=1.0, samples=4)
        metrics.pause()
        assert scraper.scrape()["trainer_checkpoints_total"][0].value == 0 and read_soon(metrics)
        monkeypatch.setattr(metrics_module.time, "monotonic", check_between_count_and_stamp)
        with metrics.checkpoint():
            pass
        monkeypatch.setattr(metrics_module.time, "monotonic", real_monotonic)
        checks[0].join(5)
        assert checks[1:] == [False]        # the old count's scrape is not the count's
        assert not metrics.final_state_read()
        assert scraper.scrape()["trainer_checkpoints_total"][0].value == 1 and read_soon(metrics)
    finally:
        monkeypatch.setattr(metrics_module.time, "monotonic", real_monotonic)
        metrics.close()
        scraper.close()


def test_a_close_inside_its_own_threads_checkpoint_block_does_not_wait_for_that_block(tmp_path):
    """The linger waits for a checkpoint write still open on another thread (an asynchronous writer's); one open
    on the closing thread cannot end while close() waits, and is not waited for (the linger would sit out its
    whole timeout)."""
    metrics = JobMetrics("lib-ckpt-own", publish=Publish(targets_dir=tmp_path, linger_timeout=30))
    scraper = Scraper(metrics.metrics_port)
    try:
        scraper.scrape()
        metrics.start()
        metrics.step(loss=1.0, samples=4)
        with metrics.checkpoint():
            metrics.finish("completed")
            scraper.scrape()
            assert read_soon(metrics)
            metrics.close()
    finally:
        metrics.close()
        scraper.close()


def test_a_checkpoint_block_ended_on_another_thread_than_it_began_on_is_counted():
    """An asynchronous save may enter checkpoint() where it starts the write and leave it in the callback that
    ends it, on the writer's thread. The block's count of open blocks per thread was a threading.local: its exit
    on the other thread found no count there and raised AttributeError inside the lock, the write never counted
    and the callback failed. Counted now, and no block is left open."""
    # Not announced: no first scrape to wait for (announced, its start waited the 30 s out).
    metrics = JobMetrics("lib-ckpt-split", publish=Publish(listen=None, targets_dir=None, job_dir=None))
    try:
        metrics.start()
        metrics.step(loss=1.0, samples=4)
        block = metrics.checkpoint()
        block.__enter__()
        failed = []

        def done():
            try:
                block.__exit__(None, None, None)
            except Exception as error:
                failed.append(error)

        callback = threading.Thread(target=done)
        callback.start()
        callback.join(5)
        assert failed == [] and metrics.checkpoints == 1 and metrics._checkpoints_writing == 0
    finally:
        metrics.close()


def test_a_scrape_during_a_log_interval_shows_a_loss_sum_and_interval_count_of_the_same_intervals():
    """docs/metrics.md: trainer_loss_accumulated and trainer_loss_intervals_total give "the exact mean loss over any
    window of one process (or the two values at the window's ends)". They were two attributes, read by two families
    and changed by two stores: a log interval that ended between the scrape's read of the sum and its read of the
    count showed the new interval counted without its loss (2.0 over 2 intervals: a mean of 1.0 for losses of 2.0),
    and one between the two stores showed its loss without its count."""
    metrics = JobMetrics("torn-loss-mean", publish=Publish(listen=None, targets_dir=None, job_dir=None), log_every=1)
    metrics.start()
    metrics.step(loss=2.0, samples=1)
    family = next(f for f in metrics._publication.series._families if f.name == instruments.LOSS_SUM.name)
    read_sum, seen = family.read, []

    def read_then_interval_ends():      # the loop ends an interval right after the scrape read the sum
        total = read_sum()
        metrics.step(loss=2.0, samples=1)
        return total

    family.read = read_then_interval_ends
    for _ in range(2):
        found = samples_by_name(metrics)
        seen.append((found["trainer_loss_accumulated"][0].value, found["trainer_loss_intervals_total"][0].value))
    family.read = read_sum
    metrics.finish("completed")
    metrics.close()
    assert all(total == 2.0 * intervals for total, intervals in seen), seen


def test_a_state_the_metrics_refuse_is_one_load_state_dict_takes_nothing_of_and_any_other_is_taken_whole():
    """refusal() is what a resuming trainer asks before it takes a checkpoint's position in the data: a state it
    passed but load_state_dict() refused (or took in part) resumed at that position with none of the counters, and
    one it refused but load_state_dict() took was skipped for nothing. Every value of a real state, and of its
    loss-spike detector and phases, spoiled in turn, at several spike warm-ups (the detector's check depends on it)."""
    import copy

    with JobMetrics("lib-refusal-source", log_every=1) as source:
        source.start()
        for index in range(12):
            source.step(loss=1.0 + index % 3, samples=4)
        source.eval(loss=0.5, accuracy=0.9)
        base = source.state_dict()
    spoils = [-1, 1.5, float("nan"), float("inf"), "x", None, True, [], {}, 10**400, 2**70, [1.0, "x"]]
    states = [base, None, [], "x", 3]
    for where in (None, "loss_spike_detector", "phases"):
        for key in [*(base if where is None else base[where]), "early", "unknown"]:
            for spoil in [*spoils, "left out"]:
                state = copy.deepcopy(base)
                part = state if where is None else state[where]
                if spoil == "left out":
                    part.pop(key, None)
                else:
                    part[key] = spoil
                states.append(state)
    disagreements = []
    for warmup in (3, 40):
        judge = JobMetrics("lib-refusal-judge", diagnostics=Diagnostics(loss_spike_warmup=warmup))
        try:
            for state in states:
                refusal = judge.refusal(state)
                taker = JobMetrics("lib-refusal-taker", diagnostics=Diagnostics(loss_spike_warmup=warmup))
                try:
                    taker.load_state_dict(state)
                    refused = "load_state_dict" in taker.__dict__.get("_failed_calls", set())
                    if (refusal is None) == refused or (refused and (taker.steps, taker.samples) != (0, 0)):
                        disagreements.append((warmup, refusal, refused, repr(state)[:200]))
                finally:
                    taker.close()
        finally:
            judge.close()
    assert disagreements == []
    assert len(states) > 500
