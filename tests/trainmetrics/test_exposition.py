"""TextExposition writes what prometheus_client's generate_latest writes, byte for byte, scrape after scrape."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily, StateSetMetricFamily,
                                    SummaryMetricFamily, UnknownMetricFamily)

from trainmetrics.exposition import TextExposition


class Families:
    """A collector whose values change between collections, with every family type and awkward names,
    label values and help texts."""

    def __init__(self):
        self.value = 0.0

    def collect(self):
        self.value += 1.25
        v = self.value
        gauge = GaugeMetricFamily("trainer_loss", 'help with \\ backslash\nand "quotes"', labels=["job_id", "rank"])
        gauge.add_metric(["job-1", "0"], v)
        gauge.add_metric(['odd "value" \\ with\nnewline ü', "1"], float("nan"))
        gauge.add_metric(["job-2", "0"], float("inf"), timestamp=1_700_000_000.5)
        yield gauge
        counter = CounterMetricFamily("trainer_steps", "Steps.", labels=["job_id"], created=123.0)
        counter.add_metric(["job-1"], v * 1000)
        yield counter
        histogram = HistogramMetricFamily("trainer_step_duration_seconds", "Durations.", labels=["job_id"])
        histogram.add_metric(["job-1"], [("0.001", 1), ("0.01", 3 + v), ("+Inf", 5 + v)], sum_value=0.5 + v)
        yield histogram
        summary = SummaryMetricFamily("rpc_seconds", "A summary.", count_value=4, sum_value=v)
        yield summary
        yield InfoMetricFamily("build", "Build.", value={"version": "1.2", "commit": "abc"})
        yield StateSetMetricFamily("mode", "Mode.", value={"train": True, "eval": False})
        gauge_histogram = GaugeHistogramMetricFamily("queue", "Queue.", buckets=[("1.0", 2), ("+Inf", 3)],
                                                     gsum_value=v)
        yield gauge_histogram
        yield UnknownMetricFamily("mystery", "Unknown.", value=-v)
        unlabelled = GaugeMetricFamily("name.with.dots", "Not a legacy name.", value=1e-7)
        yield unlabelled
        yield GaugeMetricFamily("empty_family", "No samples at all.", labels=["a"])


def test_the_text_is_generate_latests_byte_for_byte_scrape_after_scrape():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ours.register(Families())
    theirs.register(Families())
    exposition = TextExposition()
    for _ in range(3):          # the second and third renders come from the kept headers and prefixes
        expected = generate_latest(theirs)
        assert exposition.render(ours) == expected
    assert b'odd \\"value\\" \\\\ with\\nnewline' in expected and b"name_with_dots" in expected


def test_a_label_value_utf8_cannot_carry_is_written_with_a_replacement_character():
    """A byte of a file name that is not UTF-8 reaches Python as a lone surrogate (a mount point, a dataset's
    name): encoding the text raised, and every scrape of the endpoint answered 500."""
    registry = CollectorRegistry()

    class Odd:
        def collect(self):
            gauge = GaugeMetricFamily("disk_free", "Free bytes.", labels=["mountpoint"])
            gauge.add_metric(["/mnt/da\udcfft"], 1.0)
            gauge.add_metric(["/mnt/\ud800 and ü"], 2.0)
            yield gauge

    registry.register(Odd())
    text = TextExposition().render(registry).decode("utf-8")
    assert 'disk_free{mountpoint="/mnt/da\ufffdt"} 1.0' in text
    assert 'disk_free{mountpoint="/mnt/\ufffd and ü"} 2.0' in text


def test_kept_prefixes_are_bounded_and_still_right_after_the_cache_starts_again():
    class ChangingLabels:
        def __init__(self):
            self.n = 0

        def collect(self):
            family = GaugeMetricFamily("trainer_eval_history_loss", "Loss.", labels=["slot"])
            for _ in range(3):
                self.n += 1
                family.add_metric([str(self.n)], self.n)
            yield family

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ours.register(ChangingLabels())
    theirs.register(ChangingLabels())
    exposition = TextExposition(max_prefixes=5)
    for _ in range(10):
        assert exposition.render(ours) == generate_latest(theirs)
        assert len(exposition._prefixes) <= 5


def test_a_collector_that_fails_is_named_in_the_error_as_generate_latest_does():
    class Bad:
        def collect(self):
            family = GaugeMetricFamily("bad", "Bad.", labels=["a"])
            family.add_metric([1], 1.0)      # a label value that is not a string
            yield family

    registry = CollectorRegistry()
    registry.register(Bad())
    try:
        TextExposition().render(registry)
    except Exception as error:          # noqa: BLE001 - the same class generate_latest raises
        assert any(getattr(arg, "name", None) == "bad" for arg in error.args)
    else:
        raise AssertionError("a label value that is not a string must fail as it does in generate_latest")
