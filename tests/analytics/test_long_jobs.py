"""Jobs longer than an hour, on backfilled history (promtool) in a real Prometheus: their peak grid's step is longer
than the 15 s a final scrape may come after the end, so the grid's last point can fall before it."""

import math
import time

import pytest

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.app import Settings

from .conftest import as_openmetrics, backfilled_prometheus, running, scraped_evaluations, scraped_job, serve

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
    with running(backfilled_prometheus(tmp_path, history(end))) as prometheus, \
            serve(Settings(prometheus_url=prometheus.url)) as client:
        response = client.get("/api/training/long-1/analytics")
        assert response.status_code == 200, response.text
        body = response.json()
    assert (body["status"], body["end_time"]) == ("completed", end)
    assert [e["loss"] for e in body["evaluations"]] == [FIRST_EVAL_LOSS, LAST_EVAL_LOSS]
    assert body["losses"]["final_eval_loss"] == LAST_EVAL_LOSS


def test_a_long_run_whose_first_part_retention_removed_answers_from_its_stored_report(tmp_path):
    """Retention removes a store's oldest blocks first: of a one-hour run, its first 25 minutes. Its start, end and
    evaluations (each of the last eight in its slot till the end) read as they were, so the analytics took what
    was left for the whole run and answered it from Prometheus: its peak throughput, run in those minutes, fell
    from 100 samples/s to the average standing in for it (25), its scores to null. Its stored report answers."""
    import asyncio

    import httpx

    from trainmetrics.analytics import shapes
    from trainmetrics.analytics.cache import AnalyticsCache, settled_job_analytics
    from trainmetrics.analytics.prometheus import PrometheusClient
    from trainmetrics.reports import ReportArchive

    base = 'job_id="cut-1",instance="h:1",job="trainer",rank="0"'
    end = round(time.time() - 1200)
    start = end - 3600.0
    lines = []
    for t in [start + 10.0 * i for i in range(361)] + [end + 0.25]:
        trained = min(t, end) - start          # 100 samples/s for its first 10 minutes, then 10
        lines += [line for line in scraped_job(base, INFO, start, end, t) if not line.startswith("trainer_samples")]
        lines.append(f"trainer_samples_total{{{base}}} {int(100 * min(trained, 600) + 10 * max(0, trained - 600))} "
                     f"{t:.3f}")
        shown = [(k, start + 1200.0 * k - 1.0, 1.0 / k) for k in (1, 2, 3) if t >= start + 1200.0 * k - 1.0]
        lines += scraped_evaluations(base, t, shown, 100)
    prometheus = backfilled_prometheus(tmp_path, as_openmetrics(lines))
    prometheus.extra_args = ["--web.enable-admin-api"]
    with running(prometheus):
        async def stored_report() -> dict:         # what the job server stores once the job settled
            client = PrometheusClient(prometheus.url)
            try:
                return shapes.plain(await settled_job_analytics(client, AnalyticsCache(), "cut-1", 86400))
            finally:
                await client.aclose()

        stored = asyncio.run(stored_report())
        assert stored["performance"]["peak_samples_per_second"] == 100      # the premise: read whole
        removed = httpx.post(f"{prometheus.url}/api/v1/admin/tsdb/delete_series",
                             params={"match[]": '{job_id="cut-1"}', "start": str(start - 60), "end": str(start + 1500)})
        assert removed.status_code == 204, removed.text

        async def load(job_id: str):
            return ("a", stored) if job_id == "cut-1" else None

        with serve(Settings(prometheus_url=prometheus.url, archive=ReportArchive(load=load))) as client:
            body = client.get("/api/training/cut-1/analytics").json()
    assert body["source"] == "stored"
    assert {**body, "source": None} == {**stored, "source": None}
