"""A job's own analytics while it waits, and after the job server ended a wait: its status as the job API says it
and a ledger to its wall clock from submission, on history of the series the job server (jobserver/app.py
WaitingJobsCollector) and its trainers publish in each state, in Prometheus and VictoriaMetrics; the fleet's ledger
and job list tell each job as its own analytics do."""

import asyncio
import time

import pytest

from trainmetrics.analytics import fleet, job
from trainmetrics.analytics.cache import AnalyticsCache, cached_job_analytics
from trainmetrics.analytics.prometheus import PrometheusClient

from .conftest import as_openmetrics, asked, backfilled_history
from .test_fleet_goodput_waits import server, trainer

pytestmark = pytest.mark.slow

LOOKBACK_SECONDS = 3600.0
RANGE_SECONDS = 1200.0


def history(now: float) -> str:
    lines = []
    # Failed (its own state, end and error), resumed (POST .../resume): queued to resume, waiting for a slot now.
    lines += trainer("failed-queued", "h:1", now - 475, now - 300, "failed", now - 500, checkpoints=(2, 2))
    lines.append(f'trainer_job_failure_info{{job_id="failed-queued",instance="h:1",job="trainer-jobs",rank="0",'
                 f'error_type="ValueError"}} 1 {now - 300:.3f}')
    lines += server("failed-queued", [(now - 200, now, "resuming", None)], now - 500)
    # Paused, resumed: queued to resume now.
    lines += trainer("paused-queued", "h:2", now - 475, now - 300, "paused", now - 500, checkpoints=(2, 2))
    lines += server("paused-queued", [(now - 295, now - 210, "paused", None), (now - 200, now, "resuming", None)],
                    now - 500)
    # Killed (the server's `failed` with its end: the notice of the death), resumed, then cancelled while it waited:
    # the server's end of that wait (it says the job waited to resume).
    lines += trainer("killed-cancelled", "h:3", now - 475, now - 300, None, now - 500, checkpoints=(2, 2))
    lines += server("killed-cancelled", [(now - 299, now - 250, "failed", now - 299),
                                         (now - 240, now - 160, "resuming", None),
                                         (now - 150, now, "cancelled", now - 150, True)], now - 500)
    # Paused, resumed, its resumed run killed: the notice of that death, after a wait to resume before the run.
    lines += trainer("killed-after-wait", "h:4", now - 900, now - 800, "paused", now - 1000, checkpoints=(2, 2))
    lines += server("killed-after-wait", [(now - 795, now - 700, "paused", None),
                                          (now - 690, now - 410, "resuming", None)], now - 1000)
    lines += trainer("killed-after-wait", "h:5", now - 395, now - 350, None, now - 1000, carried=100.0,
                     checkpoints=(4, 2))
    lines += server("killed-after-wait", [(now - 349, now, "failed", now - 349)], now - 1000)
    # Paused, and paused still: the server's `paused` since.
    lines += trainer("paused-now", "h:6", now - 475, now - 300, "paused", now - 500, checkpoints=(2, 2))
    lines += server("paused-now", [(now - 295, now, "paused", None)], now - 500)
    # Paused at its stop checkpoint (snapshot at now - 291) while Prometheus was down (last scraped at now - 300,
    # running), resumed from that checkpoint: the resumed run carried 189 s in, 9 s past the paused one's last scrape.
    lines += trainer("unscraped-pause", "h:7", now - 475, now - 300, None, now - 500, checkpoints=(2, 2))
    lines += trainer("unscraped-pause", "h:8", now - 250, now - 100, "completed", now - 500, carried=189.0,
                     checkpoints=(3, 1))
    # Never ran: in the queue since its submission.
    lines += server("never-ran", [(now - 100, now, "queued", None)], now - 100)
    return as_openmetrics(lines)


backfilled = backfilled_history(history, "job-goodput-waits")


def analytics(backend, job_id: str):
    return asked(backend.url, lambda client: job.job_analytics(client, job_id, LOOKBACK_SECONDS))


def fleet_of(backend, job_id: str):
    """The summary over the last RANGE_SECONDS of the one job `job_id` (its owner's), and its row in the job list."""
    async def run():
        client = PrometheusClient(backend.url)
        try:
            summary = await fleet.summary(client, RANGE_SECONDS, 60, owner=job_id, recorded=False)
            rows = await fleet.fleet(client, RANGE_SECONDS, time.time())
            return summary, next(row for row in rows if row.job_id == job_id)
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("job_id", ["failed-queued", "paused-queued"])
def test_a_job_queued_to_resume_is_queued_as_the_job_api_says(backfilled, job_id):
    """Its run failed (or paused) and it was resumed: the job server says `queued`. The run, its newest process,
    spoke for the job (`failed`, with the failure's error type; `paused`), the server's waiting state sorting before
    it. The job list says the same."""
    backend, now = backfilled
    report = analytics(backend, job_id)
    assert (report.status, report.error_type, report.end_time) == ("queued", None, None)
    assert fleet_of(backend, job_id)[1].status == "queued"


def test_a_killed_job_resumed_and_cancelled_while_it_waited_ends_at_the_cancel_paused_to_it(backfilled):
    """The server's end of its wait was taken for the notice of the killed run's death: the job ended at the kill,
    and the wait from there to the cancel was in no phase (failed with its own state, the same wait is paused)."""
    backend, now = backfilled
    report = analytics(backend, "killed-cancelled")
    goodput = report.goodput
    assert report.status == "cancelled" and report.end_time == pytest.approx(now - 150, abs=1e-3)
    assert goodput.wall_clock_seconds == pytest.approx(350.0, abs=1e-3)
    assert (goodput.seconds["queued"], goodput.seconds["paused"]) == (20.0, pytest.approx(150.0, abs=1e-3))
    assert goodput.unaccounted_seconds == pytest.approx(0.0, abs=1e-3)
    summary, row = fleet_of(backend, "killed-cancelled")
    assert {phase: summary.goodput.seconds[phase] for phase in ("queued", "paused")} == \
        pytest.approx({phase: goodput.seconds[phase] for phase in ("queued", "paused")}, abs=1e-3)
    assert (row.status, row.end_time) == ("cancelled", pytest.approx(report.end_time, abs=1e-3))


def test_a_killed_runs_notice_after_a_wait_to_resume_is_still_the_notice(backfilled):
    """The job waited to resume before the killed run: the notice of its death (the server's 0 there) is no end of
    a wait. The job ends with the run, at its last scrape."""
    backend, now = backfilled
    report = analytics(backend, "killed-after-wait")
    assert report.status == "failed" and report.end_time == pytest.approx(now - 350, abs=1e-3)
    assert report.goodput.wall_clock_seconds == pytest.approx(650.0, abs=1e-3)
    assert report.goodput.seconds["paused"] == pytest.approx(400.0, abs=1e-3)     # the pause, to the resumed run


def test_a_run_whose_end_prometheus_missed_lived_to_the_checkpoint_its_successor_carried_in(backfilled):
    """Its last 9 s, to the snapshot its successor resumed from, were unscraped: they were in the successor's
    carried totals and paused too, the phases 9 s past the wall clock, read as a host clock set back (the wall clock
    taken for the phases' sum, 409 s)."""
    backend, now = backfilled
    goodput = analytics(backend, "unscraped-pause").goodput
    assert goodput.unavailable_reason is None and goodput.wall_clock_seconds == pytest.approx(400.0, abs=1e-3)
    assert goodput.seconds["paused"] == pytest.approx(36.0, abs=1e-3) and goodput.seconds["lost"] == 0
    assert goodput.unaccounted_seconds == pytest.approx(0.0, abs=1e-3)


def test_a_job_that_never_ran_is_queued_from_its_submission_to_now(backfilled):
    """No ledger: "a trainer before the ledger", for a job whose trainer never started. The fleet counts the same
    wait as queued."""
    backend, now = backfilled
    report = analytics(backend, "never-ran")
    goodput = report.goodput
    assert report.status == "queued" and goodput.unavailable_reason is None
    assert goodput.wall_clock_seconds == pytest.approx(report.evaluated_at - (now - 100), abs=0.01)
    assert goodput.seconds["queued"] == goodput.wall_clock_seconds and goodput.goodput_ratio == 0
    assert goodput.unaccounted_seconds == 0
    summary, _ = fleet_of(backend, "never-ran")
    assert summary.goodput.seconds["queued"] == pytest.approx(goodput.seconds["queued"], abs=1.0)


@pytest.mark.parametrize("job_id", ["failed-queued", "paused-queued", "paused-now"])
def test_a_waiting_job_is_paused_to_now_in_its_own_ledger_as_in_the_fleets(backfilled, job_id):
    """Its ledger runs to now, the wait since its run's end paused, as the fleet's does for the same job (it stopped
    at the run's end: a job paused a day had a day less wall clock in its own report than in the fleet's)."""
    backend, now = backfilled
    report = analytics(backend, job_id)
    goodput = report.goodput
    assert goodput.wall_clock_seconds == pytest.approx(report.evaluated_at - (now - 500), abs=0.01)
    assert goodput.seconds["paused"] == pytest.approx(report.evaluated_at - (now - 300), abs=0.01)
    assert goodput.unaccounted_seconds == pytest.approx(0.0, abs=0.01)
    summary, _ = fleet_of(backend, job_id)
    assert summary.goodput.seconds["paused"] == pytest.approx(goodput.seconds["paused"], abs=1.0)


def test_a_waiting_jobs_analytics_are_not_cached_as_settled(backfilled):
    """Its ledger grows to now: served from the cache, a paused job's wall clock stood at the first read's."""
    backend, _ = backfilled

    async def twice():
        client, cache = PrometheusClient(backend.url), AnalyticsCache()
        try:
            first = await cached_job_analytics(client, cache, "paused-now", LOOKBACK_SECONDS)
            await asyncio.sleep(0.3)
            return first, await cached_job_analytics(client, cache, "paused-now", LOOKBACK_SECONDS), len(cache)
        finally:
            await client.aclose()

    first, second, cached = asyncio.run(twice())
    grown = second.goodput.wall_clock_seconds - first.goodput.wall_clock_seconds
    assert cached == 0 and grown > 0.2
    assert grown == pytest.approx(second.evaluated_at - first.evaluated_at, abs=0.01)
