"""A job's /metrics text, written straight from its state (series.py), is what the OpenTelemetry SDK and its
Prometheus exporter write for the same readers: line for line, for a real job's every series and for the awkward
cases (non-finite values, label values that are not text, escaping, counts past a million, a reader that raises)."""

import logging
import math
import urllib.request
from collections import Counter

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainmetrics.trainer import instruments as inst
from trainmetrics.trainer import telemetry
from trainmetrics.trainer.histograms import DurationHistogram
from trainmetrics.trainer.instruments import Instrument
from trainmetrics.trainer.metrics import JobInfo, JobMetrics
from trainmetrics.trainer.series import JobSeries
from trainmetrics.trainer.telemetry import Publish

# Families whose values move between two collections a moment apart (the clock's now, the current phase's time).
MOVING = {inst.HEARTBEAT.name, inst.PHASE_SECONDS.name}


def prometheus_reader(registry: CollectorRegistry) -> PrometheusMetricReader:
    """The SDK's Prometheus reader into `registry`, configured as the trainer configured it before series.py."""
    return PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False,
                                  resource_attribute_filter=lambda key: key in ("job_id", "rank", "run_id"),
                                  registry=registry)


def exporters_text(labels: dict[str, str], families, histograms=()) -> str:
    """What the SDK's Prometheus exporter writes for `families` [(spec, kind, callback)] and `histograms`
    [(spec, bounds, values)]."""
    registry = CollectorRegistry(auto_describe=False)
    reader = prometheus_reader(registry)
    views = [View(instrument_name=spec.name, aggregation=ExplicitBucketHistogramAggregation(boundaries=bounds))
             for spec, bounds, _ in histograms]
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(labels), views=views)
    meter = provider.get_meter("test")
    for spec, kind, callback in families:
        factory = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
        factory(spec.name, callbacks=[callback], unit=spec.unit, description=spec.description)
    for spec, _, values in histograms:
        recorder = meter.create_histogram(spec.name, unit=spec.unit, description=spec.description)
        for value in values:
            recorder.record(value)
    try:
        return generate_latest(registry).decode()
    finally:
        provider.shutdown()


def lines_apart(ours: str, theirs: str) -> tuple[list[str], list[str]]:
    """The lines one of the two texts has more often than the other (order aside: the two order families
    differently)."""
    mine, others = Counter(ours.splitlines()), Counter(theirs.splitlines())
    return sorted((mine - others).elements()), sorted((others - mine).elements())


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_a_real_jobs_every_series_is_the_exporters_line_for_line(monkeypatch, rank, world_size):
    """The job's OTLP push provider given a Prometheus reader: the SDK's exporter writes what the push instruments
    (the same readers) show, next to what /metrics shows. Rank 0 publishes the job's lifecycle too."""
    registry = CollectorRegistry(auto_describe=False)
    reader = prometheus_reader(registry)
    monkeypatch.setattr(telemetry, "otlp_readers", lambda: [reader])
    metrics = JobMetrics("series-1", JobInfo(model="mlp", dataset="toy \"quoted\" \\ set", rank=rank,
                                             world_size=world_size, upload_seconds=1.5, submitted_at=1_700_000_000.25),
                         publish=Publish(listen=None, targets_dir=None, job_dir=None), log_every=2)
    try:
        metrics.start()
        metrics.set_epoch(0)
        metrics.set_learning_rate(0.125)
        with metrics.checkpoint():
            pass
        for batch in metrics.timed([1, 2, 3, 4, 5]):
            metrics.step(loss=2.0 - 0.1 * batch, samples=32)
        metrics.eval(loss=1.25, accuracy=0.5)
        metrics.eval(loss=1.0, accuracy=0.625)
        metrics.step(loss=float("nan"), samples=32)
        metrics.step(loss=float("nan"), samples=32)     # an interval's mean that is NaN: no trainer_loss NaN
        ours = metrics.collect().decode()
        theirs = generate_latest(registry).decode()
    finally:
        metrics.finish("completed")
        metrics.close()
    families = {line.split(" ")[2] for line in ours.splitlines() if line.startswith("# TYPE")}
    assert len(families) >= (41 if rank == 0 else 35), len(families)
    assert lines_apart(without(ours, MOVING), without(theirs, MOVING)) == ([], [])
    assert ('rank="1"' in ours) == (rank == 1) and 'trainer_eval_history_loss{job_id="series-1"' in ours
    assert ('dataset="toy \\"quoted\\" \\\\ set"' in ours) == (rank == 0)
    ours_moving, theirs_moving = moving_samples(ours), moving_samples(theirs)
    assert set(ours_moving) == set(theirs_moving) and len(ours_moving) >= 8
    for key, value in ours_moving.items():
        assert math.isclose(value, theirs_moving[key], abs_tol=5.0), key


def without(text: str, families: set[str]) -> str:
    """`text` without the lines of `families` (a histogram's _bucket, _count and _sum lines included)."""
    def family(line: str) -> str:
        name = line.split(" ")[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]
        return name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")

    return "\n".join(line for line in text.splitlines() if family(line) not in families)


def moving_samples(text: str) -> dict:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if family.name in MOVING or family.name + "_total" in MOVING}


def test_histograms_are_the_exporters_line_for_line():
    labels = {"job_id": "series-2"}
    values = [0.00005, 0.0001, 0.0003, 0.002, 0.002, 0.7, 4.0, 700.0]
    durations = DurationHistogram(inst.DURATION_BUCKETS)
    checkpoints = DurationHistogram(inst.CHECKPOINT_BUCKETS)
    for value in values:
        durations.observe(value)
        checkpoints.observe(value)
    series = JobSeries(labels)
    series.histogram(inst.STEP_DURATION, durations)
    series.histogram(inst.CHECKPOINT_DURATION, checkpoints)
    ours = series.render().decode()
    theirs = exporters_text(labels, [], [(inst.STEP_DURATION, inst.DURATION_BUCKETS, values),
                                         (inst.CHECKPOINT_DURATION, inst.CHECKPOINT_BUCKETS, values)])
    assert lines_apart(ours, theirs) == ([], [])
    assert 'trainer_step_duration_seconds_bucket{job_id="series-2",le="+Inf"} 8.0' in ours


def test_awkward_values_and_labels_are_the_exporters_line_for_line():
    gauge = Instrument("awkward_values", "1", 'help with \\ backslash\nand a newline')
    counter = Instrument("things_total", "1", "A counter.")
    info = Instrument("build_info", "1", "Constant labels.")
    awkward = [("x", float("nan")), ("inf", float("inf")), ('odd "value" \\ with\nnewline ü', 3), ("zero", -0.0),
               ("small", 1e-7), ("big", 12345678901234567)]
    slots = [(1, 2.5), (2, float("-inf")), (3, 999_999), (4, 1_000_000)]
    series = JobSeries({"job_id": "series-3"})
    series.labelled(gauge, "a", lambda: awkward)
    series.labelled(Instrument("slots", "1", "Labels that are not text."), "slot", lambda: slots)
    series.value(counter, lambda: 7, counter=True)
    series.value(info, lambda: 1, labels={"version": "1.2", "quote": '"'})
    series.value(Instrument("nothing_now", "1", "No series."), lambda: None)
    series.value(Instrument("not_a_number", "1", "No series."), lambda: float("nan"))
    series.labelled(Instrument("never_anything", "1", "No series."), "a", lambda: [])
    families = [
        (gauge, "gauge", lambda options: [Observation(value, {"a": key}) for key, value in awkward]),
        (Instrument("slots", "1", "Labels that are not text."), "gauge",
         lambda options: [Observation(value, {"slot": key}) for key, value in slots]),
        (counter, "counter", lambda options: [Observation(7)]),
        (info, "gauge", lambda options: [Observation(1, {"version": "1.2", "quote": '"'})]),
        (Instrument("not_a_number", "1", "No series."), "gauge", lambda options: [Observation(float("nan"))]),
    ]
    for _ in range(2):          # the second render comes from the kept headers and prefixes
        ours = series.render().decode()
        assert lines_apart(ours, exporters_text({"job_id": "series-3"}, families)) == ([], [])
    assert 'slots{job_id="series-3",slot="1"} 2.5' in ours and "nothing_now" not in ours
    assert "never_anything" not in ours and "not_a_number" not in ours


def test_a_job_whose_labels_utf8_cannot_carry_is_still_scraped():
    """A dataset file or an argument whose name is not UTF-8 (Python keeps its bytes as lone surrogates) made
    every scrape of the job answer 500: Prometheus never saw the job, and its end waited out the linger."""
    metrics = JobMetrics("series-odd", JobInfo(model="mlp", dataset="da\udcfft", job_name="n\udce9e"),
                         publish=Publish(targets_dir=None, job_dir=None))
    try:
        metrics.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode("utf-8")
    finally:
        metrics.finish("completed")
        metrics.close()
    info = [line for line in text.splitlines() if line.startswith("trainer_job_info{")]
    assert len(info) == 1 and 'dataset="da\ufffdt"' in info[0] and 'job_name="n\ufffde"' in info[0]


def test_a_reader_that_raises_leaves_its_family_out_says_so_once_and_the_others_stay(caplog):
    def broken():
        raise RuntimeError("a bug in a reader")

    series = JobSeries({"job_id": "series-4"})
    series.value(Instrument("broken", "1", "Raises."), broken)
    series.labelled(Instrument("broken_too", "1", "Raises."), "a", broken)
    series.value(Instrument("fine_total", "1", "Fine."), lambda: 1, counter=True)
    with caplog.at_level(logging.ERROR, logger="trainmetrics.trainer"):
        texts = [series.render().decode() for _ in range(3)]
    assert all('fine_total{job_id="series-4"} 1.0' in text and "broken" not in text for text in texts)
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 2


def test_numbers_are_written_as_prometheus_clients_float_to_go_string_writes_them():
    from prometheus_client.utils import floatToGoString

    from trainmetrics.trainer.series import _number
    for value in (0, 1, -1, 999_999, 1_000_000, -999_999, -1_000_000, 1_234_567, 10**16, 10**17 + 1, True, False,
                  0.0, -0.0, 0.5, 1e6, 1.5e6, 1.7964503369106984e+09, 1e-7, float("inf"), float("-inf"), float("nan")):
        assert _number(value) == floatToGoString(value), value


def test_a_histogram_with_counts_past_a_million_and_its_kept_text_follow_the_counts():
    durations = DurationHistogram(inst.DURATION_BUCKETS)
    series = JobSeries({"job_id": "series-5"})
    series.histogram(inst.STEP_DURATION, durations)
    for _ in range(3):
        durations.observe(0.001)
    first = series.render().decode()
    assert series.render().decode() == first        # unchanged: the kept text
    assert 'trainer_step_duration_seconds_count{job_id="series-5"} 3.0' in first
    durations.counts[0] += 1_500_000                # as 1.5 million steps of under 100 µs would
    text = series.render().decode()
    # Go's (and floatToGoString's) spelling from 1e6 on, as the exporter writes it.
    assert 'trainer_step_duration_seconds_bucket{job_id="series-5",le="0.0001"} 1.5e+06' in text
    assert 'trainer_step_duration_seconds_count{job_id="series-5"} 1.500003e+06' in text


def test_a_scrape_while_the_loop_counts_a_value_writes_the_sum_of_the_values_its_buckets_count():
    """The histogram's buckets and its sum were two stores of the loop, read by a scrape one after the other: a
    scrape between them wrote a _count of one value more than its _sum held (or the other way round). Here a scrape
    is made at every point of each count the value itself can see (the bucket's search, the sum's addition)."""
    durations = DurationHistogram(inst.DURATION_BUCKETS)
    series = JobSeries({"job_id": "series-6"})
    series.histogram(inst.STEP_DURATION, durations)
    scrapes = []

    class Scraped(float):
        """A duration that has the job scraped whenever the histogram compares or adds it."""

        def __gt__(self, other):
            scrapes.append(series.render().decode())
            return float(self) > other

        def __radd__(self, other):
            scrapes.append(series.render().decode())
            return other + float(self)

    values = [0.5, 0.25, 2.0]
    for value in values:
        durations.observe(Scraped(value))
    scrapes.append(series.render().decode())
    consistent = {(count, sum(values[:count])) for count in range(len(values) + 1)}
    for text in scrapes:
        samples = {sample.name: sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if "le" not in sample.labels or sample.labels["le"] == "+Inf"}
        name = inst.STEP_DURATION.name
        assert samples[name + "_bucket"] == samples[name + "_count"]
        assert (samples[name + "_count"], samples[name + "_sum"]) in consistent, text
    assert len(scrapes) > len(values)


def test_a_scrape_while_the_loop_counts_two_values_between_each_of_its_reads_writes_a_pair_it_read_before():
    """After READS tries that each found the loop two values on between the bucket copy and the totals read,
    snapshot() gave up and wrote the last copy's buckets with the later sum: a _sum two values past its _count,
    which the next scrape (the loop at rest) took back, a drop Prometheus reads as a counter reset."""
    durations = DurationHistogram(inst.DURATION_BUCKETS)
    durations.observe(0.5)
    series = JobSeries({"job_id": "series-7"})
    series.histogram(inst.STEP_DURATION, durations)
    name = inst.STEP_DURATION.name

    def read() -> tuple[float, float]:
        samples = {sample.name: sample.value for family in text_string_to_metric_families(series.render().decode())
                   for sample in family.samples}
        return samples[name + "_count"], samples[name + "_sum"]

    assert read() == (1, 0.5)

    class Counted(list):
        """The buckets, the loop counting two values each time a scrape copies them."""

        def __iter__(self):
            copy = list(super().__iter__())
            durations.observe(0.25)
            durations.observe(0.25)
            return iter(copy)

    durations.counts = Counted(durations.counts)
    during = read()
    durations.counts = list(durations.counts)
    after = read()
    count, total = during
    assert total == 0.5 + 0.25 * (count - 1)         # the sum of the values its buckets count
    assert after[0] >= count and after[1] >= total
