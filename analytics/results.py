"""Reading PromQL results: numbers, one-sample results, labelled rows, several expressions in one request,
and the unit conversions the reports share."""

import asyncio
import math

from trainmetrics.analytics import queries as q
from trainmetrics.analytics import scoring
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.contract import RUN_LABEL

MIB = 1024 * 1024


def number(text) -> float | None:
    """A sample's value; None when not finite (VictoriaMetrics returns stale markers as NaN samples)."""
    value = float(text)
    return value if math.isfinite(value) else None


def scalar(result: list[dict]) -> float | None:
    """The value of a one-sample result; None when empty or not finite."""
    return number(result[0]["value"][1]) if result else None


def rows(result: list[dict]) -> list[tuple[dict, float | None]]:
    """(labels, value) per sample."""
    return [(sample["metric"], number(sample["value"][1])) for sample in result]


def process_of(labels: dict) -> str:
    """Which process a job's series is from: its address and the process's own id (contract.RUN_LABEL). A series
    without the id (the job server's; a trainer from before it) is its address's."""
    instance, run = labels.get("instance", ""), labels.get(RUN_LABEL)
    return f"{instance} {RUN_LABEL}={run}" if run else instance


async def query_parts(client: PrometheusClient, parts: dict[str, str], at: float) -> dict[str, list[dict]]:
    """Run several expressions in one request (queries.union; in a few side by side when one would be too long:
    queries.unions) and split the answer by part."""
    grouped: dict[str, list[dict]] = {name: [] for name in parts}
    answers = await asyncio.gather(*(client.query(expr, at) for expr in q.unions(parts)))
    for sample in (sample for answer in answers for sample in answer):
        name = sample["metric"].pop(q.PART_LABEL, None)
        if name in grouped:
            grouped[name].append(sample)
    return grouped


async def query_parts_many(client: PrometheusClient, many: list[dict[str, str]], at: float) -> list[dict[str, list[dict]]]:
    """query_parts for several part sets (one per job) in one request: fewer, larger requests cost the HTTP
    client and Prometheus less per expression than one request per job."""
    merged = {f"{name}__{index}": expr for index, parts in enumerate(many) for name, expr in parts.items()}
    if not merged:
        return [{} for _ in many]
    found = await query_parts(client, merged, at)
    return [{name: found[f"{name}__{index}"] for name in parts} for index, parts in enumerate(many)]


def mib(value: float | None) -> float | None:
    """Bytes in MiB."""
    return None if value is None else value / MIB


def percent(ratio: float | None) -> float | None:
    """A ratio in percent."""
    return None if ratio is None else 100.0 * ratio


def minus(a: float | None, b: float | None) -> float | None:
    """a - b, None when either is unknown."""
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is unknown or b is not positive."""
    return None if a is None or b is None or b <= 0 else a / b


def rounded(value: float | None) -> float | None:
    """A figure as reported: six significant digits (scoring.rounded)."""
    return scoring.rounded(value)
