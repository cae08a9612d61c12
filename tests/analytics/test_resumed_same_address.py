"""A job killed and resumed at the killed process's address (a fixed --metrics-listen port): the two processes share
one series per phase, and the resumed one starts from its checkpoint's totals, below where the killed one last
stood. The fleet's goodput and throughput trend and the job's own ledger against what the processes did, on
backfilled history in Prometheus and VictoriaMetrics."""

import math

import pytest

from trainmetrics.analytics import fleet, job

from .conftest import as_openmetrics, asked, backfilled_history
from .test_fleet_goodput_waits import trainer

pytestmark = pytest.mark.slow

RANGE_SECONDS = 600.0
# job_id: (the killed run's start of training and its last scrape, the resumed run's start, its carried compute
# seconds). Each process computes from its start of training, sampled every 10 s (its last scrape: now).
JOBS = {
    # Killed in the range: the series' max less its min was the resumed run's last less 0, without the 100 s the
    # killed run computed past its checkpoint (under the resumed run's last).
    "resumed-in-range": ((-450.0, -300.0), -265.0, 50.0),
    # Started before the range, resumed from an old checkpoint that the resumed run has not computed past yet: the
    # max less the min was the killed run's last less the carried 20 s, counting again its steps before the range.
    "resumed-from-old": ((-1000.0, -400.0), -365.0, 20.0),
}


# Samples each process counts per compute second (its count: the job's, carried in from its checkpoint).
SAMPLES_PER_SECOND = 10.0


def samples(job_id: str, instance: str, started: float, last: float, carried: float) -> list[str]:
    """trainer_samples_total of trainer()'s process at its scrapes: SAMPLES_PER_SECOND per compute second."""
    base = f'job_id="{job_id}",instance="{instance}",job="trainer-jobs",rank="0"'
    times = [started + i * 10.0 for i in range(int((last - started) / 10) + 1)]
    return [f"trainer_samples_total{{{base}}} {SAMPLES_PER_SECOND * (carried + t - started):.3f} {t:.3f}"
            for t in (times if times[-1] == last else [*times, last])]


def history(now: float) -> str:
    lines = []
    for job_id, ((began, killed), resumed, carried) in JOBS.items():
        lines += trainer(job_id, "h:9100", now + began, now + killed, None, now + began - 10, checkpoints=(2, 2))
        lines += trainer(job_id, "h:9100", now + resumed, now, None, now + began - 10, carried=carried,
                         checkpoints=(3, 1))
        lines += samples(job_id, "h:9100", now + began, now + killed, 0.0)
        lines += samples(job_id, "h:9100", now + resumed, now, carried)
    return as_openmetrics(lines)


# Killed 30 s before a multiple of the throughput trend's step and resumed 5 s after it, from a checkpoint 10 s of
# work back, which it did again within that step and went on past the killed run's last count (1,200): 1,100 at
# b + 5, 1,600 at b + 55.
ACROSS = "resumed-across-a-step"
TREND_STEP = 60.0


def across_step(now: float) -> float:
    """The multiple of TREND_STEP that ACROSS's count fell across."""
    return math.floor((now - 200.0) / TREND_STEP) * TREND_STEP


def history_across(now: float) -> str:
    b = across_step(now)
    return as_openmetrics(trainer(ACROSS, "h:9100", b - 150.0, b - 30.0, None, b - 160.0)
                          + trainer(ACROSS, "h:9100", b + 5.0, now, None, b - 160.0, carried=110.0)
                          + samples(ACROSS, "h:9100", b - 150.0, b - 30.0, 0.0)
                          + samples(ACROSS, "h:9100", b + 5.0, now, 110.0))


def history_all(now: float) -> str:
    return history(now).removesuffix("# EOF\n") + history_across(now)


backfilled = backfilled_history(history_all, "same-address")


def computed(job_id: str, now: float, since: float) -> float:
    """The compute seconds the job's processes did after `since`: each one's growth from its first sample after it
    (at its start of training plus 10 s multiples, and its last scrape) to its last."""
    ((began, killed), resumed, _) = JOBS[job_id]
    total = 0.0
    for first, last in ((now + began, now + killed), (now + resumed, now)):
        if last > since:
            total += last - (first if first > since else min(last, first + (math.floor((since - first) / 10) + 1) * 10))
    return total


@pytest.mark.parametrize("job_id", list(JOBS))
def test_the_fleets_and_the_jobs_step_seconds_of_a_job_resumed_at_its_address(backfilled, job_id):
    prometheus, now = backfilled
    summary = asked(prometheus.url, lambda client: fleet.summary(client, RANGE_SECONDS, 60, owner=job_id,
                                                                 recorded=False))
    analytics = asked(prometheus.url, lambda client: job.job_analytics(client, job_id, 3600.0))
    start = summary.evaluated_at - RANGE_SECONDS
    # The fleet's: each process's seconds from its first sample in the range (the killed run's thrown-away steps
    # count as step there: lost is a job's figure); a series that fell is read on a grid that may take its rise
    # across the range's start from the newest sample before it: one sample interval (here 10 s; a trainer's 250 ms).
    assert summary.goodput.seconds["step"] == pytest.approx(computed(job_id, now, start), abs=10.0)
    # The job's: the resumed run's last totals, the job's (carried in, plus its own).
    _, resumed, carried = JOBS[job_id]
    assert analytics.goodput.step_seconds_by_part["compute"] == pytest.approx(carried - resumed, abs=1e-3)


@pytest.mark.parametrize("job_id", list(JOBS))
def test_the_throughput_trend_of_a_job_resumed_at_its_address(backfilled, job_id):
    """The trend's step took a process's highest count in it less its highest in the step before: the resumed
    run's count, below the killed run's last, read a negative step (-85 samples/s) and the points added up to the
    resumed run's last count less the killed run's first in the range (2,600 samples for 3,700, or -200 for 5,700:
    a negative average)."""
    prometheus, now = backfilled
    step = 60.0
    summary = asked(prometheus.url, lambda client: fleet.summary(client, RANGE_SECONDS, step, owner=job_id,
                                                                 recorded=False))
    trend = summary.resource_trends.series["samples_per_second"]
    assert all(value >= 0 for _, value in trend.points), trend.points
    # The grid's points tile (end - range, end]: each process's samples there, from its newest count before it.
    gridded = [t for t, _ in trend.points if t % step == 0]
    end = max(gridded)
    assert len(gridded) == RANGE_SECONDS / step
    ((began, killed), resumed, _) = JOBS[job_id]
    counted = 0.0
    for first, last in ((now + began, now + killed), (now + resumed, now)):
        scrapes = [first + i * 10.0 for i in range(int((last - first) / 10) + 1)]     # as samples() writes them
        times = [t for t in (scrapes if scrapes[-1] == last else [*scrapes, last]) if t <= end]
        before = [t for t in times if t <= end - RANGE_SECONDS]
        if times and times[-1] > end - RANGE_SECONDS:
            counted += SAMPLES_PER_SECOND * (times[-1] - (before[-1] if before else times[0]))
    # A step in which the count fell reads the resumed run from its first count in the step: the killed run's
    # samples in that step before its kill are not counted (at most a step's). (Points: six significant digits.)
    assert counted - SAMPLES_PER_SECOND * step - 0.1 <= trend.average * RANGE_SECONDS <= counted + 0.1


def test_the_throughput_step_a_job_resumed_at_its_address_fell_across_the_start_of(backfilled):
    """The count fell across the step's start (the killed run's last before it, the resumed run's first in it) and the
    resumed run passed the killed run's last in the step: its newest less the newest before was not negative, and
    the step read 400 samples (the newest less the killed run's last) of the 500 counted from the resumed run's
    first count in it, on either backend."""
    prometheus, now = backfilled
    summary = asked(prometheus.url, lambda client: fleet.summary(client, RANGE_SECONDS, TREND_STEP, owner=ACROSS,
                                                                 recorded=False))
    points = dict(summary.resource_trends.series["samples_per_second"].points)
    assert points[across_step(now) + TREND_STEP] * TREND_STEP == pytest.approx(500.0, abs=0.01), points
