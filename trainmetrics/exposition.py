"""The Prometheus text exposition of a prometheus_client registry, byte for byte what
`prometheus_client.generate_latest` writes, for a third of its cost.

A job is scraped every 250 ms from the process that trains, so every scrape's CPU is taken from training.
prometheus_client spends most of its text on work that gives the same answer every scrape: validating and
escaping each metric and label name, sorting and quoting each sample's labels (~6 µs a sample line). Here
each family's header and each sample's `name{labels} ` prefix are made by prometheus_client's own escaping
functions the first time they are seen and kept; a scrape then only formats the values. The kept prefixes
are bounded (series whose label values keep changing cannot grow them without end).

One difference: a label value holding a lone surrogate (a byte of a file name or an argument that is not UTF-8,
as Python decodes it: a dataset's file name) is written with U+FFFD in its place, where
generate_latest raises and every scrape of the endpoint failed.
"""

import re

from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString

# prometheus_client's default for the text format: names that are not legacy-valid get underscores.
ESCAPING = openmetrics.UNDERSCORES
# Kept sample prefixes; past this many the cache starts again (a registry normally has a few hundred series).
MAX_PREFIXES = 10_000
# Samples that OpenMetrics gives a family of their own and the text format moves into a gauge at its end.
OPENMETRICS_SUFFIXES = ("_created", "_gsum", "_gcount")
# OpenMetrics types as the text format spells them (the names of info and counter families change too).
TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
# What UTF-8 cannot carry: a surrogate code point on its own.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def family_header(name: str, kind: str, documentation: str) -> str:
    """A family's `# HELP` and `# TYPE` lines, escaped as generate_latest writes them."""
    escaped = openmetrics.escape_metric_name(name, ESCAPING)
    help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {escaped} {help_text}\n# TYPE {escaped} {kind}\n"


def sample_prefix(name: str, labels: dict[str, str]) -> str:
    """`name{labels} `, escaped and ordered as generate_latest writes them."""
    label_text = ",".join(
        '{}="{}"'.format(openmetrics.escape_label_name(key, ESCAPING),
                         openmetrics._escape(LONE_SURROGATE.sub("\ufffd", value), openmetrics.ALLOWUTF8, False))
        for key, value in sorted(labels.items()))
    escaped = openmetrics.escape_metric_name(name, ESCAPING)
    return f"{escaped}{{{label_text}}} " if label_text else f"{escaped} "


class TextExposition:
    """Renders registries as generate_latest does. One instance per registry; not for concurrent use."""

    def __init__(self, max_prefixes: int = MAX_PREFIXES):
        self.max_prefixes = max_prefixes
        self._headers: dict[tuple[str, str, str, str], str] = {}
        self._prefixes: dict[tuple, str] = {}

    def render(self, registry) -> bytes:
        """The text format of everything `registry` collects now."""
        output: list[str] = []
        for metric in registry.collect():
            name, kind = metric.name, metric.type
            try:
                output.append(self._header(name, kind, metric.documentation, ""))
                moved: dict[str, list[str]] = {}
                moved_names = {name + suffix: suffix for suffix in OPENMETRICS_SUFFIXES}
                for sample in metric.samples:
                    suffix = moved_names.get(sample.name)
                    if suffix is None:
                        output.append(self._line(sample))
                    else:
                        moved.setdefault(suffix, []).append(self._line(sample))
            except Exception as exception:      # as generate_latest does: say which family it was
                exception.args = (exception.args or ("",)) + (metric,)
                raise
            for suffix, lines in sorted(moved.items()):
                output.append(self._header(name, "gauge", metric.documentation, suffix))
                output.extend(lines)
        return "".join(output).encode("utf-8")

    def _header(self, name: str, kind: str, documentation: str, suffix: str) -> str:
        key = (name, kind, documentation, suffix)
        header = self._headers.get(key)
        if header is None:
            if suffix:
                shown, shown_type = name + suffix, "gauge"
            else:
                shown = name + "_total" if kind == "counter" else name + "_info" if kind == "info" else name
                shown_type = TEXT_TYPES.get(kind, kind)
            header = family_header(shown, shown_type, documentation)
            if len(self._headers) < self.max_prefixes:
                self._headers[key] = header
        return header

    def _line(self, sample) -> str:
        labels = sample.labels
        key = (sample.name, *labels.items()) if labels else sample.name
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = sample_prefix(sample.name, labels)
            if len(self._prefixes) >= self.max_prefixes:
                self._prefixes.clear()
            self._prefixes[key] = prefix
        if sample.timestamp is None:
            return f"{prefix}{floatToGoString(sample.value)}\n"
        return f"{prefix}{floatToGoString(sample.value)} {int(float(sample.timestamp) * 1000):d}\n"
