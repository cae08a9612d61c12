"""The fleet read from the analytics recording rules' series equals the fleet read from raw series.

History is backfilled with promtool (raw samples, then deploy/prometheus/rules/analytics.rules.yml over them
from 100 minutes ago only), so one range is covered by the recorded series throughout and a longer one has a
gap at its start that the raw older part must fill."""

import asyncio
import math
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest

from trainmetrics.analytics import fleet, job, shapes
from trainmetrics.analytics import queries as q
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.prometheus_process import PrometheusServer, find_binary

from .conftest import as_openmetrics, backfilled_prometheus, running, take_blocks

pytestmark = pytest.mark.slow

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "analytics.rules.yml"
STATES = ("queued", "running", "paused", "completed", "failed", "cancelled")
RULES_SINCE = 100 * 60


def process_lines(job_id: str, instance: str, start: float, end: float, final: str | None, owner: str,
                  rank: str = "0", samples_from: int = 0, checkpoints_from: int = 0) -> list[str]:
    """One process's series at 10 s: final None = killed (no end timestamp, its last state running). A resumed
    process takes samples_from and checkpoints_from over from its checkpoint."""
    base = f'job_id="{job_id}",instance="{instance}",job="trainer",rank="{rank}"'
    times = [start + i * 10.0 for i in range(int((end - start) / 10) + 1)]
    lines = []
    for t in times:
        progress = t - start
        last = final is not None and t == times[-1]
        lines += [f'trainer_job_info{{{base},job_name="{job_id}",model="mlp",dataset="blobs",owner="{owner}",'
                  f'device="cpu"}} 1 {t:.3f}',
                  f"trainer_job_start_timestamp_seconds{{{base}}} {start:.3f} {t:.3f}",
                  f"trainer_samples_total{{{base}}} {samples_from + int(50 * progress)} {t:.3f}",
                  f"trainer_checkpoints_total{{{base}}} {checkpoints_from} {t:.3f}",
                  f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}",
                  f"trainer_loss{{{base}}} {2.0 / (1 + progress / 60):.6f} {t:.3f}"]
        lines += [f'trainer_job_state{{{base},state="{state}"}} '
                  f'{int(state == (final if last else "running"))} {t:.3f}' for state in STATES]
        if last:
            lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {end:.3f} {t:.3f}")
    return lines


def history(now: float) -> str:
    lines = []
    for index in range(24):     # one job starting every 7.5 minutes over the last 3 hours
        start = now - 3 * 3600 + index * 450 + 3
        final = ("completed", "failed", "cancelled", None)[index % 4]
        lines += process_lines(f"job-{index:02d}", f"h:{index}", start, start + 300 + 20 * index, final,
                               ("alice", "bob")[index % 2])
    # Resumed: a cancelled process, then one on another instance that continues the count and completes.
    lines += process_lines("resumed", "h:100", now - 5400, now - 4800, "cancelled", "carol")
    lines += process_lines("resumed", "h:101", now - 4500, now - 3900, "completed", "carol", samples_from=30000)
    # Killed (no end) and resumed from its checkpoint on another instance: one job from the first start.
    lines += process_lines("crashed", "h:110", now - 5000, now - 4700, None, "carol")
    lines += process_lines("crashed", "h:111", now - 4600, now - 4000, "completed", "carol", samples_from=15000,
                           checkpoints_from=3)
    # Two ranks, each killed 100 s of work past its checkpoint (at 10,000 samples) and resumed from it on
    # another instance, 60 s before it ends: 13,000 samples a rank, not the killed processes' 15,000. (Before
    # the 1-hour ranges: the trends' test counts samples by each series' last value.)
    for rank in ("0", "1"):
        lines += process_lines("thrown", f"h:12{rank}", now - 4400, now - 4100, None, "carol", rank=rank)
        lines += process_lines("thrown", f"h:13{rank}", now - 4050, now - 3990, "completed", "carol", rank=rank,
                               samples_from=10000, checkpoints_from=2)
    # Paused before these ranges and resumed: the job server says queued (from its first submission) and resuming
    # while it waits for a slot, until the job is cancelled at `now`.
    server = 'job_id="resuming",instance="server:8000",job="server"'
    for t in (now - 1500 + i * 10.0 for i in range(151)):
        state_now = "cancelled" if t == now else "queued"
        lines += [f'trainer_job_state{{{server},state="{state}"}} {int(state == state_now)} {t:.3f}'
                  for state in STATES]
        lines.append(f"trainer_job_submitted_timestamp_seconds{{{server}}} {now - 9000:.3f} {t:.3f}")
        lines.append(f"trainer_job_resuming{{{server}}} {int(t < now)} {t:.3f}")
    lines.append(f"trainer_job_end_timestamp_seconds{{{server}}} {now:.3f} {now:.3f}")
    # Two ranks.
    for rank in ("0", "1"):
        lines += process_lines("ranks", f"h:20{rank}", now - 2400, now - 1800, "completed", "alice", rank=rank)
    # The exporter's CPU counter of a job's process tree: one series per job, starting again from 0 with a
    # resumed job's new process.
    def exporter_cpu(job_id: str, spans: list[tuple[float, float]], per_second: float) -> list[str]:
        return [f'process_cpu_time_seconds_total{{job_id="{job_id}",instance="exporter:9105",job="exporter"}} '
                f"{per_second * (t - start):.3f} {t:.3f}"
                for start, end in spans for t in (start + i * 10.0 for i in range(int((end - start) / 10) + 1))]

    lines += exporter_cpu("resumed", [(now - 5400, now - 4800), (now - 4500, now - 3900)], 2.0)
    lines += exporter_cpu("ranks", [(now - 2400, now - 1800)], 1.0)
    # Samples on both sides of the start of a 1-hour range read 11 minutes after `now`.
    lines += process_lines("straddle", "h:300", now + 660 - 3700, now + 660 - 3500, "completed", "bob")
    return as_openmetrics(lines)


def backfill_rules(prometheus: PrometheusServer, start: float, end: float, output: Path) -> subprocess.CompletedProcess:
    """The analytics rules evaluated by promtool over [start, end] (whole seconds) through Prometheus' API, their
    blocks written to output."""
    return subprocess.run([find_binary("promtool"), "tsdb", "create-blocks-from", "rules", "--url", prometheus.url,
                           "--start", f"{start:.0f}", "--end", f"{end:.0f}", "--output-dir", str(output), str(RULES)],
                          check=True, capture_output=True, text=True)


@contextmanager
def recorded_prometheus(work: Path, history: str, record: Callable[[PrometheusServer, Path], None]):
    """A started Prometheus holding `history` and the blocks `record(prometheus, output)` wrote to output while it
    held the history alone (backfill_rules'), stopped after. No live rule evaluation: the recorded series end with
    the backfill, and the recent raw part after it."""
    prometheus = backfilled_prometheus(work, history)
    with running(prometheus):
        record(prometheus, work / "rule-blocks")
    take_blocks(prometheus, work / "rule-blocks")
    with running(prometheus):
        yield prometheus


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    now = time.time() - 660     # the history ends 11 minutes before the fixture starts the service

    def record(prometheus: PrometheusServer, output: Path) -> None:
        # The rules evaluated over the history through Prometheus' API. Once in a full parallel run the answer was
        # empty (no block written, the history there): asked again, and what promtool said is kept if it stays so.
        for _ in range(3):
            said = backfill_rules(prometheus, now - RULES_SINCE, time.time(), output)
            if output.is_dir() and any(output.iterdir()):
                return
            time.sleep(2)
        raise AssertionError(f"no recorded blocks: {said.stdout[-2000:]} {said.stderr[-2000:]} "
                             f"{prometheus.query('count(count_over_time(trainer_samples_total[4h]))')}")

    with recorded_prometheus(tmp_path_factory.mktemp("recorded"), history(now), record) as prometheus:
        yield prometheus


def both_ways(prometheus: PrometheusServer, range_seconds: float):
    async def run():
        client = PrometheusClient(prometheus.url)
        try:
            now = time.time()
            split = await fleet.recorded_split(client, range_seconds, now)
            recorded = await fleet.fleet(client, range_seconds, now, split)
            raw = await fleet.fleet(client, range_seconds, now, None)
            return now, split, recorded, raw
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_covered_range_reads_recorded_series_and_agrees_with_raw(backfilled):
    now, split, recorded, raw = both_ways(backfilled, 3600)
    assert split == pytest.approx(now - 3600 + q.RULE_WINDOW_SECONDS, abs=1e-3)    # covered throughout
    assert recorded == raw
    by_id = {row.job_id: row for row in raw}
    assert "straddle" in by_id and "resumed" not in by_id and len(raw) >= 8
    assert by_id["ranks"].total_samples == 2 * 50 * 600 and by_id["ranks"].status == "completed"


def test_a_range_reaching_before_the_rules_reads_raw_series_there(backfilled):
    now, split, recorded, raw = both_ways(backfilled, 3 * 3600)
    # The last minute without a heartbeat: the one before the backfill's first evaluation (seconds of test
    # time later than the history's `now`).
    assert now - 660 - RULES_SINCE - 120 < split < now - 660 - RULES_SINCE + 60
    assert recorded == raw
    by_id = {row.job_id: row for row in raw}
    assert len(raw) == 23 + 6      # job-00 ended before the range
    resumed = by_id["resumed"]
    assert by_id["thrown"].total_samples == 2 * 13000 and by_id["thrown"].status == "completed"
    assert resumed.status == "completed" and resumed.total_samples == 30000 + 50 * 600
    assert (resumed.duration_seconds, resumed.paused_seconds, resumed.training_seconds) == (1500, 300, 1200)
    assert resumed.average_samples_per_second == pytest.approx(resumed.total_samples / 1200, rel=1e-5)
    # Killed: no end, no longer scraped, its heartbeat's last value its end.
    killed = by_id["job-03"]
    assert killed.status == "vanished" and killed.end_time == pytest.approx(killed.start_time + 300 + 60, abs=1e-3)
    assert by_id["crashed"].status == "completed" and by_id["crashed"].paused_seconds == pytest.approx(100, abs=1e-3)
    assert {row.status for row in raw} >= {"completed", "failed", "cancelled", "vanished"}


def test_a_job_waiting_to_resume_waits_paused_in_the_fleets_goodput(backfilled):
    """A resumed job waiting for a slot is `queued` from its first submission: the fleet counted its wait in a
    range starting after its resume as queued. The job server's trainer_job_resuming says it ran before."""
    from trainmetrics.analytics.results import query_parts

    async def run():
        client = PrometheusClient(backfilled.url)
        try:
            now = time.time()
            summary = shapes.plain(await fleet.summary(client, 3600, 600))["goodput"]
            return now, await query_parts(client, q.fleet_goodput(3600, now), now), summary
        finally:
            await client.aclose()

    now, found, summary = asyncio.run(run())
    assert "resuming" in {series["metric"]["job_id"] for series in found["paused"]}
    # Waiting from before the range (which starts 11 minutes after the history's now, less an hour) to its cancel.
    assert summary["seconds"]["queued"] == 0
    assert summary["seconds"]["paused"] == pytest.approx(3600 - 660, abs=5)


def test_summary_agrees_apart_from_its_trends(backfilled):
    async def run():
        client = PrometheusClient(backfilled.url)
        try:
            return [shapes.plain(await fleet.summary(client, 3 * 3600, 600, recorded=recorded))
                    for recorded in (True, False)]
        finally:
            await client.aclose()

    recorded, raw = asyncio.run(run())
    # The training time within the range: a job that ran across the range's start loses what the range moved on by
    # between the two summaries.
    moved = raw["evaluated_at"] - recorded["evaluated_at"]
    assert recorded.pop("total_training_seconds") == pytest.approx(raw.pop("total_training_seconds"), abs=moved + 0.1)
    for body in (recorded, raw):
        del body["evaluated_at"]
        trends = body.pop("resource_trends")["series"]
        assert trends["running_jobs"]["peak"] >= 1 and trends["samples_per_second"]["peak"] > 0
    assert recorded == raw
    assert raw["jobs_by_status"]["vanished"] == 6 and raw["jobs_by_status"]["running"] == 0


def running_samples(history: Path) -> dict[str, list[float]]:
    """From the backfilled history itself: per job id, the times of its samples whose state was running, and the
    ends of its trainers' runs (a run shorter than a scrape is never scraped running)."""
    times: dict[str, list[float]] = {}
    for line in history.read_text().splitlines():
        if line.startswith("#"):
            continue
        labels, value, at = line.rsplit(" ", 2)
        job_id = labels.split('job_id="')[1].split('"')[0] if 'job_id="' in labels else None
        if line.startswith("trainer_job_state{") and 'state="running"' in line and value == "1":
            times.setdefault(job_id, []).append(float(at))
        elif line.startswith("trainer_job_end_timestamp_seconds{") and 'job="trainer"' in labels:
            times.setdefault(job_id, []).append(float(value))
    return times


def test_running_jobs_counts_jobs_not_their_processes(backfilled):
    """The trend counted processes: a job killed and resumed within one step (two processes running in it),
    or a job whose every rank publishes a state, counted twice. Each point must be the jobs with a running
    sample in the step it covers, or a run that ended in it, as the history says."""
    async def run():
        client = PrometheusClient(backfilled.url)
        try:
            return shapes.plain(await fleet.summary(client, 3 * 3600, 600, recorded=False))
        finally:
            await client.aclose()

    points = asyncio.run(run())["resource_trends"]["series"]["running_jobs"]["points"]
    running = running_samples(backfilled.workdir.parent / "history.om")
    expected = [[at, sum(any(at - 600 <= t <= at for t in times) for times in running.values())]
                for at, _ in points]
    assert points == expected
    assert max(count for _, count in points) >= 2


def test_trends_from_recorded_series_approximate_the_raw_ones(backfilled):
    async def run():
        client = PrometheusClient(backfilled.url)
        try:
            return [shapes.plain(await fleet.summary(client, 3600, 300, recorded=recorded))["resource_trends"]
                    for recorded in (True, False)]
        finally:
            await client.aclose()

    recorded, raw = asyncio.run(run())
    # The answer says which trends are approximations (it said nothing).
    assert (recorded["recorded_series"], raw["recorded_series"]) == (["running_jobs", "samples_per_second"], [])
    recorded, raw = recorded["series"], raw["series"]
    # Recorded: a process stays "running" up to a rule window after its last sample, and throughput counts
    # per-minute recordings: close to the raw trends, not equal.
    assert recorded["running_jobs"]["peak"] == pytest.approx(raw["running_jobs"]["peak"], abs=2)
    assert recorded["samples_per_second"]["points"] != raw["samples_per_second"]["points"]    # really recorded
    # Throughput windows tile the grid: its points times the step add up to every count's growth from the
    # grid's first window start to its last point (the last point, at the call's time, overlaps the grid),
    # to the points' six significant digits.
    grid = raw["samples_per_second"]["points"][:-1]
    first, last = grid[0][0] - 300, grid[-1][0]

    def counted(at: float) -> float:
        result = backfilled.query(f"sum(last_over_time(trainer_samples_total[4h] @ {at:.3f}))")
        return float(result[0]["value"][1]) if result else 0.0

    grown = counted(last) - counted(first)
    assert grown > 0
    assert sum(value for _, value in grid) * 300 == pytest.approx(grown, rel=1e-5)
    recorded_grid = [value for t, value in recorded["samples_per_second"]["points"] if first < t <= last]
    # A process's recorded count is its raw count at the last recording, up to the next one late (a rule interval;
    # longer across a missed one, as promtool's backfill misses one at a 2-hour block boundary where the group's
    # offset falls in a minute's last second). So the recorded span counts a process from its first recording
    # when it started after the one before `first` (its samples before that go into no window), or from that
    # recording (its samples up to `first` too), and up to the one before `last`. Those times, at 50 samples/s
    # (process_lines), a sample either side of an edge, bound the difference. (Twice a rule interval of the peak
    # throughput was allowed, for the ends only; in a checkout missing the boundary's evaluation the trend also
    # lost the samples counted across it, and read 272,500 of 309,000.)
    recordings = [float(t) for t, _ in backfilled.query(f"{q.HEARTBEAT}[4h]", last + 300)[0]["values"]]
    before_first, before_last = (max(t for t in recordings if t <= edge) for edge in (first, last))

    def by_process(expr: str) -> dict[str, float]:
        return {repr(sorted((k, v) for k, v in sample["metric"].items() if k != "__name__")): float(sample["value"][1])
                for sample in backfilled.query(expr, last)}

    starts = by_process("last_over_time(trainer_job_start_timestamp_seconds[4h])")
    ends = by_process("max_over_time(trainer_heartbeat_timestamp_seconds[4h])")      # its last sample's time
    lost = gained = 0.0
    for process, start in starts.items():
        if ends[process] <= first or start > last:
            continue
        if start <= before_first:
            gained += 50 * (first - before_first + 10)
        else:
            counted_from = max(start, first)
            lost += 50 * (min(t for t in recordings if t >= counted_from) - counted_from + 10)
        if ends[process] > before_last:
            lost += 50 * (last - before_last + 10)
    assert 0 < lost and -lost <= sum(recorded_grid) * 300 - grown <= gained


@pytest.fixture(scope="module")
def missed_evaluation(tmp_path_factory):
    """One process counting 50 samples/s for 100 minutes, and the rules backfilled over it but for the evaluation
    before the trends' grid point `hole` (as a restart or a slow evaluation leaves live rules; the coverage check
    accepts a gap of up to 4 minutes). All inside one 2-hour block of the past: promtool backfills each block
    apart, and drops an evaluation at their boundary where the group's offset is in the last second of a minute.
    Yields the Prometheus, the time to read the trends at and `hole`."""
    block = math.floor(time.time() / 7200) * 7200 - 7200
    hole = block + 4200      # a multiple of the 300 s step, inside the hour to block + 6000

    def record(prometheus: PrometheusServer, output: Path) -> None:
        # (hole - 61, hole): longer than an interval, so an evaluation falls in it whatever the group's offset.
        backfill_rules(prometheus, block + 300, hole - 61, output)
        backfill_rules(prometheus, hole, block + 6900, output)

    history = as_openmetrics(process_lines("steady", "h:1", block + 600, block + 6600, "completed", "alice"))
    with recorded_prometheus(tmp_path_factory.mktemp("missed"), history, record) as prometheus:
        yield prometheus, block + 6150, hole


def test_a_missed_rule_evaluation_delays_the_recorded_throughput_and_loses_none(missed_evaluation):
    """The recorded throughput read each window's count before it from the recording one interval before the
    window: across a missed evaluation none was there, the count before it was the window's first recording,
    and the samples between the recordings around the gap went into no window (a 2-hour boundary of promtool's
    backfill, in a checkout whose rules' offset fell in a minute's last second: 24,000 of the 1-hour trends'
    309,000, and test_trends_from_recorded_series_approximate_the_raw_ones failed)."""
    prometheus, at, hole = missed_evaluation

    async def run():
        client = PrometheusClient(prometheus.url)
        try:
            split = await fleet.recorded_split(client, 3600, at)
            return split, [shapes.plain((await fleet.resource_trends(client, 3600, 300, at, recorded))
                                        ["samples_per_second"])["points"] for recorded in (True, False)]
        finally:
            await client.aclose()

    split, (recorded, raw) = asyncio.run(run())
    # The summary reads these trends from the recordings: the gap is within the coverage check's 4 minutes.
    assert split == pytest.approx(at - 3600 + q.RULE_WINDOW_SECONDS, abs=1e-3)
    seen = [float(t) for t, _ in prometheus.query(f"{q.HEARTBEAT}[10m]", hole + 300)[0]["values"]]
    assert max(b - a for a, b in zip(seen, seen[1:])) > 1.5 * q.RULE_INTERVAL_SECONDS
    # Its grid's windows tile the hour of one steady process: 50 samples/s throughout, some of it a window late.
    assert [t for t, _ in recorded] == [t for t, _ in raw] and len(raw) == 13
    assert all(value == 50 for _, value in raw)
    assert sum(value for _, value in recorded[:-1]) * 300 == 50 * 3600


def test_job_totals_from_each_process_last_minute_equal_the_whole_window(backfilled, monkeypatch):
    """Counters and last values read from the minute before each process's final scrape (a resumed job's
    two processes, a crashed and resumed one, two ranks, jobs of 5 to 13 minutes, killed ones) equal those read
    from every sample of the job."""
    job_totals, read = q.job_totals, {"whole": False, "by_process": [], "whole_window": []}

    def totals(job_id, window, final, finals=None):
        read["by_process" if finals and not read["whole"] else "whole_window"].append(job_id)
        return job_totals(job_id, window, final, None if read["whole"] else finals)

    monkeypatch.setattr(q, "job_totals", totals)
    job_ids = [f"job-{index:02d}" for index in range(24)] + ["resumed", "crashed", "ranks", "straddle", "thrown"]

    async def run(whole: bool):
        read["whole"] = whole
        client = PrometheusClient(backfilled.url)
        try:
            answers = {job_id: shapes.plain(await job.job_analytics(client, job_id, 6 * 3600)) for job_id in job_ids}
        finally:
            await client.aclose()
        for body in answers.values():
            del body["evaluated_at"]
        return answers

    from_last_minutes = asyncio.run(run(False))
    assert sorted(read["by_process"]) == sorted(job_ids) and read["whole_window"] == []
    from_whole = asyncio.run(run(True))
    assert from_last_minutes == from_whole
    assert from_whole["resumed"]["performance"]["total_samples"] == 30000 + 50 * 600
    assert from_whole["ranks"]["performance"]["total_samples"] == 2 * 50 * 600
    assert from_whole["thrown"]["performance"]["total_samples"] == 2 * 13000
    assert from_whole["job-05"]["losses"]["final"] == pytest.approx(2.0 / (1 + 400 / 60), abs=1e-6)
    # CPU seconds per span the job's processes ran, over the time they ran: the resumed job's counter
    # started again with its second process (2 x 600 s at 2 CPU-s/s), the two ranks' spans overlap (600 s
    # at 1 CPU-s/s, once).
    resumed, ranks = from_whole["resumed"], from_whole["ranks"]
    assert resumed["duration"] == {"total_seconds": 1500, "total_minutes": 25, "paused_seconds": 300,
                                   "total_hours": pytest.approx(1500 / 3600), "training_seconds": 1200,
                                   "upload_seconds": None}
    assert resumed["resource_utilization"]["average_cpu_percent"] == pytest.approx(200, rel=1e-6)
    assert ranks["resource_utilization"]["average_cpu_percent"] == pytest.approx(100, rel=1e-6)
    # Killed, then resumed from its checkpoint: the lookup finds the run that never ended through the one that
    # took its checkpoint count over; the job starts with it, and the time between is a pause.
    crashed = from_whole["crashed"]
    assert crashed["status"] == "completed" and crashed["performance"]["total_samples"] == 15000 + 50 * 600
    assert crashed["end_time"] - crashed["start_time"] == pytest.approx(1000, abs=1e-3)
    assert crashed["duration"]["paused_seconds"] == pytest.approx(100, abs=1e-3)
    killed = from_whole["job-03"]
    assert killed["status"] == "vanished" and killed["end_time"] - killed["start_time"] == pytest.approx(360, abs=1e-3)


def test_summary_top_jobs_details_equal_the_full_job_table(backfilled):
    """The summary reads metadata and final losses for its top 5 only (or for everyone under an owner
    filter): the same values as the full job table's rows."""
    keys = shapes.columns(shapes.TopJob)

    async def run():
        client = PrometheusClient(backfilled.url)
        try:
            summary = shapes.plain(await fleet.summary(client, 3 * 3600, 600))
            owned = shapes.plain(await fleet.summary(client, 3 * 3600, 600, owner="bob"))
            now = time.time()
            table = await fleet.fleet(client, 3 * 3600, now, await fleet.recorded_split(client, 3 * 3600, now))
            return summary, owned, shapes.plain(table)
        finally:
            await client.aclose()

    summary, owned, table = asyncio.run(run())
    rows = {row["job_id"]: {key: row[key] for key in keys} for row in table}
    for body in (summary, owned):
        top = body["top_performing_jobs"]
        assert len(top) == 5 and all(row["final_loss"] is not None and row["job_name"] for row in top)
        for row in top:
            assert row == rows[row["job_id"]]
    assert {row["owner"] for row in owned["top_performing_jobs"]} == {"bob"}


# An owner no job has, in characters a PromQL string needs escaped (Prometheus' lexer refuses U+FFFD written out).
NOBODY = 'nöbody "\ufffd\U0001f600" \\ \n'


@pytest.mark.parametrize("range_seconds, recorded", [(90 * 60, True), (3 * 3600, False)])
def test_an_owners_job_trends_count_that_owners_jobs_only(backfilled, range_seconds, recorded):
    """The summary under an owner filter (forced for a token's owner) counted every owner's running jobs and
    throughput in its trends. Each owner's points now add up to the whole fleet's, point by point."""
    owners = ("alice", "bob", "carol")

    async def run():
        client = PrometheusClient(backfilled.url)
        try:
            return [shapes.plain(await fleet.summary(client, range_seconds, 600, owner=owner))["resource_trends"]
                    for owner in (None, *owners, NOBODY)]
        finally:
            await client.aclose()

    whole, *each, nobody = asyncio.run(run())
    for name in ("running_jobs", "samples_per_second"):
        def gridded(trends):      # the points on the step's multiples (the last one, at now, moves between calls)
            return {t: v for t, v in trends["series"][name]["points"] if t % 600 == 0}

        points = gridded(whole)
        assert len(points) >= 8 and any(points.values()), points
        shares = [gridded(trends) for trends in each]
        for t, value in points.items():
            # (the figures are rounded to 6 significant digits)
            assert sum(share.get(t) or 0 for share in shares) == pytest.approx(value or 0, rel=1e-5), (name, t)
        assert all(max(share.values()) < max(points.values()) for share in shares), name
        assert not any(gridded(nobody).values()), name
    # The hosts' trends are not the owner's to filter.
    host = "host_cpu_utilization_ratio"
    assert [p for p in each[0]["series"][host]["points"] if p[0] % 600 == 0] == \
        [p for p in whole["series"][host]["points"] if p[0] % 600 == 0]
