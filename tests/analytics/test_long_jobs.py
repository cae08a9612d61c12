"""Jobs longer than an hour, on backfilled history (promtool) in a real Prometheus: their peak grid's step is longer
than the 15 s a final scrape may come after the end, so the grid's last point can fall before it."""

import math
import time

import pytest

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.app import Settings

from .conftest import as_openmetrics, backfilled_prometheus, scraped_evaluations, scraped_job, serve

pytestmark = pytest.mark.slow

BASE = 'job_id="long-1",instance="h:1",job="trainer",rank="0"'
INFO = 'job_name="long",model="mlp",dataset="blobs",owner="a",device="cpu"'
DURATION = 7205.0           # two hours of training
FIRST_EVAL_LOSS, LAST_EVAL_LOSS = 0.75, 0.3125


def history(end: float) -> str:
    """A two-hour job scraped every 10 s, and once more (its final scrape) 0.25 s after its end: its first
    evaluation an hour in, its second (the epoch's end) a second before the end, so only the final scrape shows
    it."""
    start = end - DURATION
    scrapes = [start + 10.0 * i for i in range(int(DURATION // 10) + 1)] + [end + 0.25]
    lines = []
    for t in scrapes:
        lines += scraped_job(BASE, INFO, start, end, t)
        shown = [(1, start + 3600.0, FIRST_EVAL_LOSS)] if t >= start + 3600 else []
        if t > end:
            shown.append((2, end - 1.0, LAST_EVAL_LOSS))
        lines += scraped_evaluations(BASE, t, shown, 1000)
        lines += [f"trainer_evaluations_total{{{BASE}}} {len(shown)} {t:.3f}"]
        if shown:
            lines += [f"trainer_eval_loss{{{BASE}}} {shown[-1][2]} {t:.3f}"]
    return as_openmetrics(lines)


def test_a_long_jobs_last_evaluation_shown_only_in_its_final_scrape_is_listed(tmp_path):
    # An end whose grid (step = (end + 15 - start) / 250, in whole ms) has its last point 5 s before the end: the
    # final scrape, 0.25 s after the end, lies between that point and end + 15.
    step_ms = math.ceil((DURATION + q.FINAL_SCRAPE_GRACE_SECONDS) * 1000 / q.PEAK_GRID_POINTS)
    end_ms = (round(time.time() * 1000) - 1_800_000) // step_ms * step_ms + 5_000
    end = end_ms / 1000
    _, last, _ = q.peak_grid(DURATION + q.FINAL_SCRAPE_GRACE_SECONDS, end + q.FINAL_SCRAPE_GRACE_SECONDS)
    assert last == end - 5.0            # the premise
    prometheus = backfilled_prometheus(tmp_path, history(end))
    prometheus.start(timeout=60)
    try:
        with serve(Settings(prometheus_url=prometheus.url)) as client:
            response = client.get("/api/training/long-1/analytics")
            assert response.status_code == 200, response.text
            body = response.json()
    finally:
        prometheus.stop()
    assert (body["status"], body["end_time"]) == ("completed", end)
    assert [e["loss"] for e in body["evaluations"]] == [FIRST_EVAL_LOSS, LAST_EVAL_LOSS]
    assert body["losses"]["final_eval_loss"] == LAST_EVAL_LOSS
