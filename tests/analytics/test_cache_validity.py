"""When a settled job's cached analytics may be served (analytics/cache.py): only while the cheap lookup sees the
job's processes as they were (lookup.fingerprint). The store as it was when the job was cached and as it is later
are two backfilled Prometheus servers, asked through one cache."""

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from trainmetrics.analytics.cache import AnalyticsCache, cached_job_analytics, settled_job_analytics
from trainmetrics.analytics.lookup import JobNotFound
from trainmetrics.analytics.prometheus import ClientMetrics, PrometheusClient
from trainmetrics.analytics.shapes import plain
from trainmetrics.contract import ACCOUNTED_PHASES, JOB_STATES
from trainmetrics.reports import NotSettled, ReportArchive

from .conftest import as_openmetrics, backfilled_backend
from .test_fleet_goodput_waits import trainer

pytestmark = pytest.mark.slow

LOOKBACK_SECONDS = 3600.0
JOB = "resumed-killed-in-init"


def killed_in_init(job_id: str, instance: str, spawned: float, last: float) -> list[str]:
    """A resumed process killed (-9) in its init: scraped from its spawn to `last` (its state `queued`, its init
    seconds), never a start of training, never an end."""
    base = f'job_id="{job_id}",instance="{instance}",job="trainer-jobs",rank="0"'
    lines = []
    for t in (spawned + i * 5.0 for i in range(int((last - spawned) / 5) + 1)):
        lines += [f'trainer_job_info{{{base},job_name="{job_id}",model="mlp",dataset="blobs",owner="{job_id}",'
                  f'device="cpu"}} 1 {t:.3f}',
                  f"trainer_process_start_timestamp_seconds{{{base}}} {spawned:.3f} {t:.3f}",
                  f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}"]
        lines += [f'trainer_phase_seconds_total{{{base},phase="{phase}"}} {t - spawned if phase == "init" else 0:.3f} '
                  f"{t:.3f}" for phase in ACCOUNTED_PHASES]
        lines += [f'trainer_job_state{{{base},state="{state}"}} {int(state == "queued")} {t:.3f}'
                  for state in JOB_STATES]
    return lines


async def read(url: str, cache: AnalyticsCache, job_id: str, archive: ReportArchive | None = None):
    """The job's analytics through `cache` (and `archive`'s stored reports), from the Prometheus at `url`."""
    client = PrometheusClient(url)
    try:
        return await cached_job_analytics(client, cache, job_id, LOOKBACK_SECONDS, archive=archive)
    finally:
        await client.aclose()


def test_a_cached_job_whose_resume_was_killed_in_its_init_is_read_afresh(tmp_path):
    """Paused (settled, cached), then resumed and the resumed process killed in its init between two requests:
    no start of training, no end, not scraped now. The lookup finds such a process by its spawn (the `spawns`
    part), but the fingerprint left that part out, so the cache served the job as `paused` for good while a
    fresh read says `vanished`."""
    now = time.time()
    paused = trainer(JOB, "h:1", now - 1500, now - 1400, "paused", None, checkpoints=(2, 2))
    killed = killed_in_init(JOB, "h:2", now - 1000, now - 990)

    cache = AnalyticsCache()
    (tmp_path / "then").mkdir()
    (tmp_path / "later").mkdir()
    with backfilled_backend("prometheus", tmp_path / "then", as_openmetrics(paused)) as then:
        before = asyncio.run(read(then.url, cache, JOB))
    assert before.status == "paused" and len(cache) == 1
    with backfilled_backend("prometheus", tmp_path / "later", as_openmetrics(paused + killed)) as later:
        fresh = asyncio.run(read(later.url, AnalyticsCache(), JOB))
        served = asyncio.run(read(later.url, cache, JOB))
    assert fresh.status == "vanished"
    assert (served.status, served.end_time) == (fresh.status, fresh.end_time)


def test_a_cached_vanished_job_that_came_back_and_vanished_again_is_read_afresh(tmp_path):
    """Vanished (frozen or cut off: settled, cached), then scraped again for 400 s and vanished again between two
    requests: its start, its spawn and its missing end read as before, and the fingerprint leaves heartbeat values
    out, so the cache served the first vanish's end and training time for good while a fresh read says 400 s
    more. A job that did not come back is still served from the cache."""
    now = time.time()
    job = "vanished-came-back"
    first = trainer(job, "h:1", now - 1500, now - 1400, None, None)
    longer = trainer(job, "h:1", now - 1500, now - 1000, None, None)

    cache = AnalyticsCache()
    (tmp_path / "then").mkdir()
    (tmp_path / "later").mkdir()
    with backfilled_backend("prometheus", tmp_path / "then", as_openmetrics(first)) as then:
        before = asyncio.run(read(then.url, cache, job))
        assert asyncio.run(read(then.url, cache, job)) is before       # unchanged: the cached analytics themselves
    assert before.status == "vanished" and len(cache) == 1
    with backfilled_backend("prometheus", tmp_path / "later", as_openmetrics(longer)) as later:
        fresh = asyncio.run(read(later.url, AnalyticsCache(), job))
        served = asyncio.run(read(later.url, cache, job))
    assert fresh.status == "vanished" and fresh.end_time == pytest.approx(before.end_time + 400)
    assert (served.end_time, served.duration.training_seconds) == (fresh.end_time, fresh.duration.training_seconds)


def test_a_job_id_run_again_after_its_report_was_stored_answers_from_prometheus(tmp_path):
    """A job completed and its report was stored; the id then ran again by hand (a standalone run, no resume through
    the job server to drop the report) and retention took the first run. Prometheus holds a run that ended 2,400 s
    after the report's end, but its later start read as "holds less", and the old report hid the newer run."""
    now = time.time()
    job = "reused-id"
    first = trainer(job, "h:1", now - 3000, now - 2900, "completed", None)
    again = trainer(job, "h:2", now - 1000, now - 500, "completed", None)

    (tmp_path / "then").mkdir()
    (tmp_path / "later").mkdir()
    with backfilled_backend("prometheus", tmp_path / "then", as_openmetrics(first)) as then:
        report = plain(asyncio.run(read(then.url, AnalyticsCache(), job)))

    async def load(job_id: str):
        return (job, report) if job_id == job else None

    with backfilled_backend("prometheus", tmp_path / "later", as_openmetrics(again)) as later:
        served = asyncio.run(read(later.url, AnalyticsCache(), job, ReportArchive(load=load)))
    assert served.source == "prometheus"
    assert (served.start_time, served.end_time) == pytest.approx((now - 1000, now - 500), abs=0.01)



def other_rank(job_id: str, instance: str, rank: int, started: float, last: float) -> list[str]:
    """A rank other than 0 of a torchrun job, scraped at 10 s from `started` to `last`: its heartbeat and the samples
    it counts (100 a second). Rank 0 alone publishes the job's start, state and end."""
    base = f'job_id="{job_id}",instance="{instance}",job="trainer-jobs",rank="{rank}"'
    lines = []
    for t in (started + i * 10.0 for i in range(int((last - started) / 10) + 1)):
        lines += [f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}",
                  f"trainer_samples_total{{{base}}} {100.0 * (t - started):.3f} {t:.3f}"]
    return lines


def test_a_job_whose_rank_0_ended_while_another_rank_is_still_scraped_is_neither_cached_nor_stored(tmp_path):
    """Rank 0 completed and is no longer scraped, but rank 1 still is (its final scrape, with its last counts, may
    not have reached the store). Only rank 0's processes counted as live, so the job read as settled: its analytics
    were cached, and its report stored for good, with rank 1's count as it stood. Once no rank is scraped it is."""
    now = time.time()
    job = "rank-1-still-scraped"
    rank0 = trainer(job, "h:1", now - 1500, now - 600, "completed", None)

    async def report(url: str, cache: AnalyticsCache):
        client = PrometheusClient(url)
        try:
            return await settled_job_analytics(client, cache, job, LOOKBACK_SECONDS)
        finally:
            await client.aclose()

    cache = AnalyticsCache()
    (tmp_path / "then").mkdir()
    (tmp_path / "later").mkdir()
    scraped = as_openmetrics(rank0 + other_rank(job, "h:2", 1, now - 1500, now - 10))
    with backfilled_backend("prometheus", tmp_path / "then", scraped) as then:
        assert asyncio.run(read(then.url, cache, job)).status == "completed"
        assert len(cache) == 0
        with pytest.raises(NotSettled):
            asyncio.run(report(then.url, cache))
    gone = as_openmetrics(rank0 + other_rank(job, "h:2", 1, now - 1500, now - 590))
    with backfilled_backend("prometheus", tmp_path / "later", gone) as later:
        assert asyncio.run(read(later.url, cache, job)).status == "completed"
    assert len(cache) == 1


async def read_together(url: str, readers: list[str | None], job_id: str,
                        first_gives_up: float | None = None) -> tuple[list, float]:
    """The job's analytics read at once by one request per owner scope in `readers` (None: everyone), through one
    client and one cache as the service's requests are (each its answer or its error; the first's TimeoutError
    where it gives up after `first_gives_up` seconds), and the requests they cost Prometheus."""
    registry = CollectorRegistry()
    client, cache = PrometheusClient(url, metrics=ClientMetrics(registry)), AnalyticsCache()
    reads = [cached_job_analytics(client, cache, job_id, LOOKBACK_SECONDS, owner) for owner in readers]
    if first_gives_up is not None:
        reads[0] = asyncio.wait_for(reads[0], first_gives_up)
    try:
        answers = await asyncio.gather(*reads, return_exceptions=True)
    finally:
        await client.aclose()
    assert cache.computing == {}
    return answers, registry.get_sample_value("analytics_prometheus_requests_total", {"outcome": "success"})


def test_requests_at_once_for_one_job_share_its_computation_within_an_owner_scope(tmp_path):
    """Eight requests at once for a finished job not cached yet (a dashboard's viewers opening it): each computed it,
    eight times one request's queries, queued behind --max-concurrency. They share one computation now; a request
    of another owner scope at the same time has its own, and is told what an unknown job would be. The request that
    started the computation giving up (its deadline) leaves it to the others."""
    now = time.time()
    job = "read-at-once"
    with backfilled_backend("prometheus", tmp_path, as_openmetrics(trainer(job, "h:1", now - 900, now - 300,
                                                                           "completed", None))) as prometheus:
        (alone,), cost = asyncio.run(read_together(prometheus.url, [job], job))
        answers, together = asyncio.run(read_together(prometheus.url, [job] * 8 + ["someone-else"], job))
        left, _ = asyncio.run(read_together(prometheus.url, [job] * 2, job, first_gives_up=0.005))
    assert alone.status == "completed" and cost >= 3
    assert together <= cost + 3, f"8 requests of one owner and 1 of another cost {together}, one alone {cost}"
    assert [plain(answer) for answer in answers[:8]] == [plain(answers[0])] * 8
    assert (answers[0].status, answers[0].end_time) == (alone.status, alone.end_time)
    assert isinstance(answers[8], JobNotFound)
    assert isinstance(left[0], TimeoutError) and left[1].status == "completed", left
