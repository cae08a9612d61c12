"""Jobs resumed at the address of the run before them (a fixed --metrics-listen port: each run its own `run_id` label)
in a range the fleet reads from the analytics recording rules' series: the job list and the summary as the runs
were, and as the raw series tell them. History backfilled with promtool and the rules evaluated over it up to a
minute before its end (runs of the last minute are in the raw recent part only), in Prometheus, and the same
samples, recordings too, in VictoriaMetrics (as a Prometheus evaluating the rules remote-writes them)."""

import asyncio
import time

import pytest

from trainmetrics.analytics import fleet, shapes
from trainmetrics.analytics import queries as q
from trainmetrics.analytics.prometheus import PrometheusClient

from .conftest import as_openmetrics, backfilled_backend, same_answer
from .test_fleet_goodput_waits import trainer
from .test_recorded_fleet import backfill_rules, recorded_prometheus

pytestmark = pytest.mark.slow

RANGE_SECONDS = 3600.0
RULES_SINCE = 5400.0       # the rules ran from 90 minutes before the history's end...
RULES_UNTIL = 60.0         # ...to a minute before it (the coverage check allows 4 minutes without one)
SAMPLES_PER_SECOND = 50.0
# job_id: its runs at one address, each (run, start of training, last scrape, final state or None: killed, or
# running at the history's end; compute seconds carried from its checkpoint, (checkpoints counted, written)),
# times from the history's end.
JOBS = {
    # Killed and resumed, both runs recorded: the resumed one completed.
    "killed-recorded": [("a", -3000.0, -2700.0, None, 0.0, (2, 2)),
                        ("b", -2600.0, -2000.0, "completed", 200.0, (3, 1))],
    # Paused and resumed, both runs recorded, the resumed one running now (raw too, in the recent part).
    "paused-recorded": [("a", -3000.0, -2700.0, "paused", 0.0, (1, 1)),
                        ("b", -2600.0, 0.0, None, 300.0, (2, 1))],
    # The run before recorded, the resumed run after the rules' last recording (raw only).
    "killed-raw": [("a", -1500.0, -700.0, None, 0.0, (2, 2)),
                   ("b", -40.0, -10.0, "completed", 600.0, (3, 1))],
    "paused-raw": [("a", -1500.0, -700.0, "paused", 0.0, (1, 1)),
                   ("b", -40.0, 0.0, None, 800.0, (2, 1))],
}
ADDRESS = {job_id: f"h:{index}" for index, job_id in enumerate(JOBS)}


def scrapes(now: float, started: float, last: float) -> list[float]:
    """When a run was scraped: every 10 s from its start of training, and last (as trainer() writes it)."""
    return sorted({now + started + i * 10.0 for i in range(int((last - started) / 10) + 1)} | {now + last})


def history(now: float) -> str:
    lines = []
    for job_id, runs in JOBS.items():
        submitted = now + runs[0][1] - 10.0
        for run, started, last, final, carried, checkpoints in runs:
            started, last = now + started, now + last
            own = trainer(job_id, ADDRESS[job_id], started, last, final, submitted, carried, checkpoints)
            base = f'job_id="{job_id}",instance="{ADDRESS[job_id]}",job="trainer-jobs",rank="0"'
            for t in scrapes(0.0, started, last):
                computed = carried + t - started
                own += [f"trainer_samples_total{{{base}}} {SAMPLES_PER_SECOND * computed:.3f} {t:.3f}",
                        f"trainer_loss{{{base}}} {2.0 / (1 + computed / 60):.6f} {t:.3f}",
                        f"trainer_loss_finite{{{base}}} 1 {t:.3f}"]
            address = f'instance="{ADDRESS[job_id]}"'
            lines += [line.replace(address, f'{address},run_id="{run}"') for line in own]
    return as_openmetrics(lines)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    """The Prometheus, and the history's end."""
    now = time.time()

    def record(prometheus, output) -> None:
        backfill_rules(prometheus, now - RULES_SINCE, now - RULES_UNTIL, output)

    with recorded_prometheus(tmp_path_factory.mktemp("recorded-same-address"), history(now), record) as prometheus:
        yield prometheus, now


@pytest.fixture(scope="module")
def victoria(backfilled, tmp_path_factory):
    """A VictoriaMetrics holding the Prometheus' raw samples and its recordings, and the history's end."""
    prometheus, now = backfilled
    recorded = prometheus.query(f'{{__name__=~"job_process:.+|{q.HEARTBEAT}"}}[3h]', now)
    lines = [f"{series['metric']['__name__']}{{{labels}}} {value} {float(t):.3f}"
             for series in recorded
             for labels in [",".join(f'{k}="{v}"' for k, v in series["metric"].items() if k != "__name__")]
             for t, value in series["values"]]
    history = next(prometheus.workdir.parent.glob("history.om")).read_text().removesuffix("# EOF\n")
    with backfilled_backend("victoria", tmp_path_factory.mktemp("recorded-same-address-vm"),
                            history + as_openmetrics(lines)) as server:
        yield server, now


@pytest.fixture(params=["prometheus", "victoria"])
def backend(request):
    return request.getfixturevalue("backfilled" if request.param == "prometheus" else "victoria")


def expected_row(job_id: str, written: float, now: float) -> dict:
    """The job list's row of a job as its runs were (the killed run stops at its last scrape, a running one now)."""
    runs = JOBS[job_id]
    spans = [(written + started, now if final is None and last == 0.0 else written + last)
             for _, started, last, final, _, _ in runs]
    _, started, last, final, carried, _ = runs[-1]
    computed = carried + last - started
    return dict(status=final or "running", start_time=spans[0][0], end_time=spans[-1][1] if final else None,
                duration_seconds=spans[-1][1] - spans[0][0],
                training_seconds=sum(stop - start for start, stop in spans),
                paused_seconds=spans[1][0] - spans[0][1], total_samples=int(SAMPLES_PER_SECOND * computed),
                final_loss=float(f"{2.0 / (1 + computed / 60):.6f}"))


def approximately(expected: dict, **tolerance) -> dict:
    """expected, its figures compared within tolerance (pytest.approx)."""
    return {key: pytest.approx(value, **tolerance) if isinstance(value, float) else value
            for key, value in expected.items()}


def both_ways(server, range_seconds: float, now: float) -> tuple[float | None, list[dict], list[dict]]:
    """Where the recorded part of the range begins, and the job list read with it and from raw series only."""
    async def run():
        client = PrometheusClient(server.url)
        try:
            split = await fleet.recorded_split(client, range_seconds, now)
            return split, *[shapes.plain(await fleet.fleet(client, range_seconds, now, at)) for at in (split, None)]
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_the_job_list_of_jobs_resumed_at_their_address_from_the_recordings(backend):
    server, written = backend
    now = written + 30.0
    split, recorded, raw = both_ways(server, RANGE_SECONDS, now)
    assert split == pytest.approx(now - RANGE_SECONDS + q.RULE_WINDOW_SECONDS, abs=1e-3)     # recorded throughout
    # Every run recorded but the last minute's, raw only.
    recorded_runs = {(labels["job_id"], labels["run_id"]) for labels in
                     (series["metric"] for series in server.query(f"last_over_time({q.RECORDED['start']}[2h])", now))}
    assert recorded_runs == {(job_id, run) for job_id, runs in JOBS.items() for run, *_ in runs} - \
        {("killed-raw", "b"), ("paused-raw", "b")}
    same_answer(recorded, raw)
    rows = {row["job_id"]: row for row in recorded}
    assert set(rows) == set(JOBS)
    for job_id in JOBS:
        expected = expected_row(job_id, written, now)
        # (VictoriaMetrics keeps a unix time stored as a value to 10 microseconds)
        assert {key: rows[job_id][key] for key in expected} == approximately(expected, abs=1e-3), job_id


def test_recordings_and_raw_series_agree_at_every_moment(backend):
    """Read at moments along the history, over ranges within the rules' time or reaching before it (an older raw
    part): the runs before a resume read from the recordings, the raw older part or the recent one, the resumed runs
    from the recent part, the recordings, or both."""
    server, written = backend
    for range_seconds in (1800.0, 7200.0):
        for now in (written + 30.0 - k * 199.0 for k in range(16)):
            split, recorded, raw = both_ways(server, range_seconds, now)
            assert split is not None and split < now - q.RECENT_SECONDS, (range_seconds, now - written)
            same_answer(recorded, raw, f"{range_seconds} s at {now - written:+.0f} s")


def test_the_summary_of_jobs_resumed_at_their_address_from_the_recordings(backfilled):
    """Statuses, top jobs and goodput as the runs were, from the recordings (their trends too) and from raw series;
    the throughput trend counts each run's own samples."""
    prometheus, written = backfilled

    async def run():
        client = PrometheusClient(prometheus.url)
        try:
            assert await fleet.recorded_split(client, RANGE_SECONDS, time.time()) is not None, "set up too slowly"
            return [shapes.plain(await fleet.summary(client, RANGE_SECONDS, 300, recorded=recorded))
                    for recorded in (True, False)]
        finally:
            await client.aclose()

    runs = [run for job in JOBS.values() for run in job]
    trends = []
    # Each as the runs were at its own time (the running jobs' durations grow).
    for body in asyncio.run(run()):
        now = body["evaluated_at"]
        assert body["jobs_by_status"] == {**{state: 0 for state in shapes.STATES}, "completed": 2, "running": 2}
        top = {row["job_id"]: row for row in body["top_performing_jobs"]}
        assert set(top) == set(JOBS)
        for job_id, row in top.items():
            expected = expected_row(job_id, written, now)
            expected["average_samples_per_second"] = expected["total_samples"] / expected["training_seconds"]
            # (six significant digits)
            assert {key: row[key] for key in expected if key in row} == \
                approximately({key: value for key, value in expected.items() if key in row}, rel=1e-5), job_id
        # The goodput: each run computed from its start of training to its last scrape; each job queued 5 s (its
        # submission to its first process's start), paused from its first run's stop to the resumed process's start.
        seconds = body["goodput"]["seconds"]
        assert seconds["step"] == pytest.approx(sum(last - started for _, started, last, *_ in runs), abs=1e-3)
        assert seconds["queued"] == pytest.approx(5.0 * len(JOBS), abs=1e-3)
        assert seconds["paused"] == pytest.approx(sum(b[1] - 5.0 - a[2] for a, b in JOBS.values()), abs=1e-3)
        trends.append([(t, value) for t, value in body["resource_trends"]["series"]["samples_per_second"]["points"]
                       if t % 300 == 0])
    recorded, raw = trends
    # The raw trend's grid tiles the range up to its last multiple of the step: every run's samples there, from its
    # first scrape. The recorded one counts a run from its first recording (one a rule interval after its start, at
    # most: 50 s of samples here) to its last (its samples after it, up to the grid's end, go uncounted). Neither
    # counts the samples a resumed run carried in from its checkpoint.
    end = raw[-1][0]
    last_recording = max(float(t) for t, _ in prometheus.query(f"{q.HEARTBEAT}[1h]", written)[0]["values"])
    counted = uncounted = 0.0
    for _, started, last, *_ in runs:
        first = written + started
        if first > end:
            continue
        newest = max(t for t in scrapes(written, started, last) if t <= end)
        counted += SAMPLES_PER_SECOND * (newest - first)
        uncounted += SAMPLES_PER_SECOND * (min(60.0, newest - first) + max(0.0, newest - max(first, last_recording)))
    assert sum(value for _, value in raw) * 300 == pytest.approx(counted, rel=1e-5)
    assert recorded != raw
    assert counted - uncounted <= sum(value for _, value in recorded) * 300 <= counted + 1
