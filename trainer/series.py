"""The job's /metrics text, read straight from the job's state.

Every trainer series is declared once (instruments.py) and read by a function of the job's state (metrics.py):
/metrics calls the readers and writes the text the OpenTelemetry SDK's Prometheus exporter wrote for the same
instruments (tests/trainer/test_series.py holds the two side by side, line for line); an OTLP push, when
configured, goes through the SDK, the readers wrapped as its observable instruments' callbacks (metrics.py).

Why not the SDK's way to /metrics: Prometheus scrapes a job every 250 ms from the process that trains, and the
SDK's collection into data points, its exporter's translation into prometheus_client families and their text took
1.2-2 ms of the job's CPU a scrape, about half of all the instrumentation cost a CPU-bound job at 4 Hz
(bench/README.md). Here each family's header and each series' `name{labels} ` are made once, and a scrape formats
the values (~0.25 ms of CPU a scrape).

What the exporter does, done here too: a non-finite value is left out (the SDK ignores it); a label value that is
not text is written as JSON (`1`); every series carries the job's labels (job_id, and rank in a multi-rank job).
A reader that raises shows no series of its family, logged once (not every scrape).
"""

import json
import logging
import math
import threading

from prometheus_client.utils import floatToGoString

from trainmetrics.exposition import family_header, sample_prefix
from trainmetrics.trainer.histograms import DurationHistogram
from trainmetrics.trainer.instruments import Instrument

log = logging.getLogger("trainmetrics.trainer")

# Kept `name{labels} ` prefixes per family; past this many the family's cache starts again (a family has at most
# a few dozen series: the phases, the states, the evaluation slots).
MAX_PREFIXES = 1_000


def _number(value) -> str:
    """floatToGoString(value), whole numbers the Go way without its cost: counts are most of a scrape's values
    (a histogram's buckets), and from 1e6 on Go writes them with an exponent, as floatToGoString does."""
    if value.__class__ is int and -1_000_000 < value < 1_000_000:
        return f"{value}.0"
    return floatToGoString(value)


def _label_value(value) -> str:
    # The exporter's rule for attribute values: text as it is, anything else as JSON.
    return value if isinstance(value, str) else json.dumps(value, default=str)


class _Value:
    """An instrument of one series, read as a number (or None: no series); its labels the job's and, for an info
    series, constant ones of its own."""

    __slots__ = ("name", "read", "head", "failed")

    def __init__(self, spec: Instrument, kind: str, read, labels: dict[str, str]):
        self.name = spec.name
        self.read = read
        self.head = family_header(spec.name, kind, spec.description) + sample_prefix(spec.name, labels)
        self.failed = False

    def render(self, output: list[str]) -> None:
        try:
            value = self.read()
            if value is None or not math.isfinite(value):
                return
            output.append(f"{self.head}{_number(value)}\n")
        except Exception:
            _failed_once(self)


class _Labelled:
    """An instrument of a series per value of one label (the job's state, its phase, an evaluation's slot), read as
    [(label value, number)]."""

    __slots__ = ("name", "label", "read", "header", "labels", "prefixes", "failed")

    def __init__(self, spec: Instrument, kind: str, label: str, read, labels: dict[str, str]):
        self.name = spec.name
        self.label = label
        self.read = read
        self.header = family_header(spec.name, kind, spec.description)
        self.labels = labels
        self.prefixes: dict = {}
        self.failed = False

    def render(self, output: list[str]) -> None:
        try:
            pairs = [(key, value) for key, value in self.read() if math.isfinite(value)]
        except Exception:
            _failed_once(self)
            return
        if not pairs:
            return
        output.append(self.header)
        prefixes = self.prefixes
        for key, value in pairs:
            prefix = prefixes.get(key)
            if prefix is None:
                if len(prefixes) >= MAX_PREFIXES:
                    prefixes.clear()
                labels = {**self.labels, self.label: _label_value(key)}
                prefix = prefixes[key] = sample_prefix(self.name, labels)
            output.append(f"{prefix}{_number(value)}\n")


def _failed_once(family) -> None:
    if not family.failed:
        family.failed = True
        log.exception("reading %s failed (its series are left out of the scrape; said once)", family.name)


class _Histogram:
    """A DurationHistogram's series: buckets (cumulative, `le` as the exporter spells it), count and sum; the text
    kept while they stay the same (a checkpoint histogram between checkpoints, a data wait that never waits)."""

    __slots__ = ("name", "histogram", "header", "bucket_prefixes", "count_prefix", "sum_prefix", "_last")

    def __init__(self, spec: Instrument, histogram: DurationHistogram, labels: dict[str, str]):
        self.name = spec.name
        self.histogram = histogram
        self.header = family_header(spec.name, "histogram", spec.description)
        bounds = [repr(float(bound)) for bound in histogram.bounds] + ["+Inf"]
        self.bucket_prefixes = [sample_prefix(spec.name + "_bucket", {**labels, "le": bound}) for bound in bounds]
        self.count_prefix = sample_prefix(spec.name + "_count", labels)
        self.sum_prefix = sample_prefix(spec.name + "_sum", labels)
        self._last: tuple[list[int], float, str] | None = None

    def render(self, output: list[str]) -> None:
        counts, total = self.histogram.snapshot()      # the sum of the values the buckets count
        last = self._last
        if last is not None and last[0] == counts and last[1] == total:
            output.append(last[2])
            return
        lines = [self.header]
        cumulative = 0
        for prefix, count in zip(self.bucket_prefixes, counts):
            cumulative += count
            lines.append(f"{prefix}{_number(cumulative)}\n")
        lines.append(f"{self.count_prefix}{_number(cumulative)}\n")
        lines.append(f"{self.sum_prefix}{_number(total)}\n")
        text = "".join(lines)
        self._last = (counts, total, text)
        output.append(text)


class JobSeries:
    """A job's series and their text. Histograms are read first: a scrape reads the step-time histogram before the
    step counter, so its count never exceeds the steps (read after, the loop went on stepping in between: 467,806
    against 467,124 in one scrape)."""

    def __init__(self, labels: dict[str, str]):
        self.labels = dict(labels)
        self._histograms: list[_Histogram] = []
        self._families: list[_Value | _Labelled] = []
        self._lock = threading.Lock()        # families are added while a scrape may be rendering

    def value(self, spec: Instrument, read, counter: bool = False, labels: dict[str, str] | None = None) -> None:
        """Show `read() -> number or None` as one series (a counter's `spec.name` ends with _total), with `labels`
        of its own besides the job's."""
        self._add(_Value(spec, "counter" if counter else "gauge", read, {**self.labels, **(labels or {})}))

    def labelled(self, spec: Instrument, label: str, read, counter: bool = False) -> None:
        """Show `read() -> [(label value, number)]` as a series per label value."""
        self._add(_Labelled(spec, "counter" if counter else "gauge", label, read, self.labels))

    def histogram(self, spec: Instrument, histogram: DurationHistogram) -> None:
        """Show `histogram` (filled by the job) as a histogram."""
        with self._lock:
            self._histograms = [*self._histograms, _Histogram(spec, histogram, self.labels)]

    def _add(self, family: "_Value | _Labelled") -> None:
        with self._lock:
            self._families = [*self._families, family]

    def render(self) -> bytes:
        """The text format of every series now."""
        output: list[str] = []
        for histogram in self._histograms:
            histogram.render(output)
        for family in self._families:
            family.render(output)
        return "".join(output).encode("utf-8")
