"""A job's peak throughput where its samples lie further apart than the peak window: trainer scrapes 15 s apart
(docs/scaling.md allows them), and a stretch with no samples at all (Prometheus down, which writes no stale
markers), on backfilled history in Prometheus and VictoriaMetrics. Each job counts 10 samples a second
throughout: its peak is 10."""

import pytest

from trainmetrics.analytics import job

from .conftest import as_openmetrics, asked, backfilled_history, scraped_job

pytestmark = pytest.mark.slow

INFO = 'job_name="x",model="mlp",dataset="blobs",owner="a",device="cpu"'
DURATION = 600.0        # a peak grid step, and window, of 2.4 s
RATE = 10.0             # samples a second (scraped_job)
# Each job's scrapes, seconds after its start: every 15 s; every second but for a minute without any.
SCRAPES = {"slow-scrapes": [15.0 * i + 0.5 for i in range(40)],
           "prometheus-down": [i + 0.5 for i in range(600) if not 200 <= i < 260]}


def history(now: float) -> str:
    start, lines = now - 1800.0, []
    for job_id, scrapes in SCRAPES.items():
        base = f'job_id="{job_id}",instance="h:1",job="trainer",rank="0"'
        for t in [*scrapes, DURATION + 0.25]:      # the final scrape, just after the end
            lines += scraped_job(base, INFO, start, start + DURATION, start + t)
    return as_openmetrics(lines)


backfilled = backfilled_history(history, "sparse-samples")


@pytest.mark.parametrize("job_id", list(SCRAPES))
def test_a_peak_rate_over_samples_further_apart_than_its_window_is_the_rate_between_them(backfilled, job_id):
    """Each grid point's growth was divided by the window (2.4 s) whatever the time between the two samples it
    took: the 150 samples of a 15 s scrape interval read as 62.5 samples/s, the 600 of the minute without samples
    as 250, and the throughput score was 16 (4) where the job ran at its one rate throughout."""
    prometheus, _ = backfilled
    analytics = asked(prometheus.url, lambda client: job.job_analytics(client, job_id, 3600.0))
    performance = analytics.performance
    assert performance.average_samples_per_second == pytest.approx(RATE)
    assert performance.peak_samples_per_second == pytest.approx(RATE)
    assert analytics.efficiency.throughput_score == pytest.approx(100.0)
