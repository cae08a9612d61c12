"""A job's average CPU over short runs: a job paused and resumed whose runs each last a few of the exporter's
scrapes, its process-tree CPU counter growing at a known rate, on backfilled history in Prometheus and
VictoriaMetrics."""

import pytest

from trainmetrics.analytics import job
from trainmetrics.analytics.queries import SCRAPE_INTERVAL_SECONDS

from .conftest import as_openmetrics, asked, backfilled_history
from .test_fleet_goodput_waits import trainer

pytestmark = pytest.mark.slow

JOB = "short-runs"
CORES = 1.5             # the job's process tree uses 1.5 cores from its process's start to its end: the truth
# Each run: its start of training and its stop (seconds before now), the phase of the exporter's scrapes after
# the start. The second run is shorter than two scrapes: one scrape falls in it.
RUNS = [(-60.0, -58.0, 0.2), (-30.0, -29.6, 0.2)]


def exporter_cpu(started: float, stopped: float, phase: float) -> list[str]:
    """The exporter's counter of one process's tree, scraped every SCRAPE_INTERVAL_SECONDS from the process' start
    (5 s before its start of training, as trainer() says) to its stop: CORES CPU seconds a second since then."""
    base = f'job_id="{JOB}",instance="exporter:9105",job="exporter"'
    first = started - 5.0 + phase
    times = [first + i * SCRAPE_INTERVAL_SECONDS for i in range(int((stopped - first) / SCRAPE_INTERVAL_SECONDS) + 1)]
    return [f"process_cpu_time_seconds_total{{{base}}} {CORES * (t - started + 5.0):.6f} {t:.3f}" for t in times]


def history(now: float) -> str:
    (start_1, stop_1, phase_1), (start_2, stop_2, phase_2) = RUNS
    return as_openmetrics(trainer(JOB, "h:9100", now + start_1, now + stop_1, "paused", None)
                          + trainer(JOB, "h:9101", now + start_2, now + stop_2, "completed", None)
                          + exporter_cpu(now + start_1, now + stop_1, phase_1)
                          + exporter_cpu(now + start_2, now + stop_2, phase_2))


backfilled = backfilled_history(history, "short-runs-cpu")


def test_the_average_cpu_of_short_runs_is_the_cores_the_job_used(backfilled):
    """Each run counted its counter's growth from its first scrape in the run only: the time before that scrape was
    lost, a run with one scrape in it counted 0 CPU seconds, and the job's average (73 % of the 150 % it used, or 0
    where every run had one scrape) stood below its peak. Each run now counts from its counter's value at its
    start: off by less than one scrape interval of CPU time per run."""
    prometheus, _ = backfilled
    analytics = asked(prometheus.url, lambda client: job.job_analytics(client, JOB, 3600.0))
    training = sum(stop - start for start, stop, _ in RUNS)
    assert analytics.duration.training_seconds == pytest.approx(training, abs=1e-3)
    tolerance = 100 * CORES * len(RUNS) * SCRAPE_INTERVAL_SECONDS / training
    assert analytics.resource_utilization.average_cpu_percent == pytest.approx(100 * CORES, abs=tolerance)
