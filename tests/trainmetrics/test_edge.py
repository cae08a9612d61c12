"""The shared HTTP edge (trainmetrics/edge.py): what its /metrics serves."""

import asyncio

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from trainmetrics.edge import Component, build_app


async def served_metrics(registry: CollectorRegistry) -> str:
    transport = httpx.ASGITransport(app=build_app([Component(name="test", routes=[], registry=registry)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        return (await client.get("/metrics")).text


def test_metrics_serves_no_created_series_and_leaves_the_registry_as_it_was():
    registry = CollectorRegistry()
    Counter("edge_test_requests", "requests", ["route"], registry=registry).labels("/a").inc()
    Histogram("edge_test_duration_seconds", "durations", registry=registry).observe(0.1)
    Summary("edge_test_sizes_bytes", "sizes", registry=registry).observe(3)
    Gauge("edge_test_created", "a gauge whose own name ends in _created", registry=registry).set(5)
    text = asyncio.run(served_metrics(registry))
    assert 'edge_test_requests_total{route="/a"} 1.0' in text
    assert "edge_test_duration_seconds_count 1.0" in text and "edge_test_sizes_bytes_sum 3.0" in text
    assert "edge_test_created 5.0" in text
    assert not [line for line in text.splitlines() if "_created" in line and "edge_test_created" not in line], text
    # Only the edge's answer changes: the registry (and every other one of the process) still has them.
    assert b'edge_test_requests_created{route="/a"}' in generate_latest(registry)
