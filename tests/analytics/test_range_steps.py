"""A range query's step as each real backend reads it: the analytics' grids (the peak grid, a job's window over its
250 points: 1473 ms for one of 368.25 s) are whole milliseconds, and every point answered is checked to be on them."""

import asyncio

import pytest

from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer

from .conftest import running

pytestmark = pytest.mark.slow

# Steps a truncated float misreads by a millisecond: VictoriaMetrics 1.79 "1473ms" and "2002ms" (1472, 2001),
# both backends 1.001 s (1000 ms).
STEPS = {"1473ms": 1473, "2002ms": 2002, 1.001: 1001}
POINTS = 250    # (over VictoriaMetrics' 50, from which it moves a range's start to a multiple of the step it read)
BACKENDS = {"prometheus": PrometheusServer, "victoria": VictoriaMetricsServer}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request, tmp_path_factory):
    with running(BACKENDS[request.param](tmp_path_factory.mktemp(request.param))) as server:
        yield server


def answered_grid(url: str, step: float | str, step_ms: int) -> list[int]:
    """The times (ms) of a range query's points for `vector(1)`, over POINTS points on multiples of the step."""
    async def ask() -> list[dict]:
        client = PrometheusClient(url)
        try:
            return await client.query_range("vector(1)", start_ms / 1000, end_ms / 1000, step)
        finally:
            await client.aclose()

    end_ms = 1_700_000_000_000 // step_ms * step_ms
    start_ms = end_ms - (POINTS - 1) * step_ms
    [series] = asyncio.run(ask())
    return [round(float(at) * 1000) - start_ms for at, _ in series["values"]]


@pytest.mark.parametrize("step", list(STEPS), ids=[str(step) for step in STEPS])
def test_a_range_query_is_answered_on_the_millisecond_grid_its_step_names(backend, step):
    """VictoriaMetrics read a step of "1473ms" as 1472 ms (seconds * 1000, truncated) and answered every point on
    that grid, moved to a multiple of it: the job analytics of a job whose window gave that peak step failed
    ("a point at ..., off the grid asked"), on any VictoriaMetrics. A step of 1.001 s read as 1000 ms on both."""
    step_ms = STEPS[step]
    assert answered_grid(backend.url, step, step_ms) == [k * step_ms for k in range(POINTS)]
