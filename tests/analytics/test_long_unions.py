"""Many parts in one request (results.query_parts): within the query length a backend takes."""

import asyncio

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.analytics.results import query_parts
from trainmetrics.prometheus_process import VictoriaMetricsServer


def test_a_union_too_long_for_one_victoria_metrics_query_is_answered_part_by_part(tmp_path):
    """VictoriaMetrics refuses a query over 16 KiB: a comparison of ten jobs (~17 KB of lookups) and the job
    list with a hundred vanished jobs (one last-seen part each) answered 502 there."""
    parts = {f"seen_{index}": f'max_over_time(trainer_heartbeat_timestamp_seconds{{job_id="{"j" * 60}{index:04d}"}}'
                              f"[1h]) or vector({index})" for index in range(300)}
    assert len(q.union(parts)) > 3 * 16384 and len(q.unions(parts)) > 4
    assert all(len(expr.encode()) <= q.MAX_UNION_BYTES for expr in q.unions(parts))
    victoria = VictoriaMetricsServer(tmp_path).start()

    async def ask():
        client = PrometheusClient(victoria.url)
        try:
            return await query_parts(client, parts, None)
        finally:
            await client.aclose()

    try:
        found = asyncio.run(ask())
    finally:
        victoria.stop()
    assert {name: [float(sample["value"][1]) for sample in samples] for name, samples in found.items()} == \
        {f"seen_{index}": [float(index)] for index in range(300)}


def test_unions_keep_every_part_once_in_order_and_a_long_part_alone():
    parts = {"a": "x" * 50, "b": "y" * 500, "c": "z" * 50, "d": "w" * 50}
    batches = q.unions(parts, limit=300)
    assert batches == [q.union({"a": parts["a"]}), q.union({"b": parts["b"]}),
                       q.union({"c": parts["c"], "d": parts["d"]})]
    assert q.unions(parts) == [q.union(parts)] and q.unions({}) == []
