"""The fleet: one row per job seen over a range (the job list), the summary with the hosts' resource trends,
and the comparison of a few jobs. A job's status, times and throughput are told as its own analytics tell
them (lookup.py): every process and rank, runs and the pauses between them."""

import asyncio
import time
from collections import Counter

from trainmetrics.analytics import queries as q
from trainmetrics.analytics import goodput, scoring, shapes
from trainmetrics.analytics.cache import AnalyticsCache, cached_jobs_analytics
from trainmetrics.analytics.job import NO_GPU_ENERGY
from trainmetrics.analytics.lookup import (ENDED, Process, Timeline, find_jobs, hold_missed_scrapes,
                                          hold_while_a_rank_runs, in_order, job_status, killed_run, speakers,
                                          timeline_of)
from trainmetrics.analytics.prometheus import PrometheusClient, partial_answers
from trainmetrics.analytics.results import number, process_of, query_parts, ratio, rounded, rows, scalar
from trainmetrics.command import DEFAULT_LOOKBACK_DAYS
from trainmetrics.contract import FINAL_STATES, validate_job_id

METADATA = ("job_name", "model", "dataset", "owner", "device")
# How far back a resumed job's earlier runs are looked for (the service's --lookback, as its own analytics do).
DEFAULT_LOOKBACK = DEFAULT_LOOKBACK_DAYS * 86400.0


async def recorded_split(client: PrometheusClient, range_seconds: float, now: float,
                         enabled: bool = True) -> float | None:
    """Where the fleet's recorded part begins (queries.recorded_split); None: raw series only."""
    if not enabled:
        return None
    gap = scalar(await client.query(q.recorded_gap(range_seconds, now), now))
    return q.recorded_split(range_seconds, now, gap)


async def fleet(client: PrometheusClient, range_seconds: float, now: float, split: float | None = None,
                details: bool = True, owner: str | None = None,
                lookback: float = DEFAULT_LOOKBACK) -> list[shapes.JobRow]:
    """One row per job seen in the last range_seconds: metadata, status, times, samples, throughput.

    split (recorded_split): read the recorded per-process series there, raw ones before and after it.
    details=False: leave metadata and final loss out (None) for add_details to fill in for a few rows.
    lookback: how far back a resumed job's earlier runs are found (_whole_resumed)."""
    return (await _fleet(client, range_seconds, now, split, details, owner, lookback))[0]


async def _fleet(client: PrometheusClient, range_seconds: float, now: float, split: float | None,
                 details: bool, owner: str | None = None, lookback: float = DEFAULT_LOOKBACK
                 ) -> tuple[list[shapes.JobRow], dict[str, list[str]], dict[tuple[str, str], Process],
                            dict[str, Timeline]]:
    """The fleet's rows, each job's processes (results.process_of; those that speak for it first:
    lookup.speakers), every process by (job id, process), and each row's runs (lookup.Timeline: its
    training_seconds are its whole runs', before the range too; a resumed job's runs before the range too:
    _whole_resumed)."""
    state_expr = q.fleet_state(range_seconds, now, split)
    state_parts = state_expr if isinstance(state_expr, dict) else {"raw": state_expr}

    async def nothing() -> list:
        return []

    async def each_state() -> dict[str, list[dict]]:
        """The state parts as separate requests: together they were the fleet's longest one."""
        results = await asyncio.gather(*(client.query(expr, now) for expr in state_parts.values()))
        return dict(zip(state_parts, results))

    starts, ends, states, infos, samples, losses, live, resuming = await asyncio.gather(
        client.query(q.fleet_start(range_seconds, now, split), now),
        client.query(q.fleet_end(range_seconds, now, split), now),
        each_state(),
        client.query(q.fleet_info(range_seconds, now, split), now) if details else nothing(),
        client.query(q.fleet_samples(range_seconds, now, split), now),
        client.query(q.fleet_loss(range_seconds, now, split), now) if details else nothing(),
        client.query(q.fleet_live(), now),
        client.query(q.fleet_resuming(range_seconds, now), now))
    processes: dict[tuple[str, str], Process] = {}

    def process(labels: dict) -> Process:
        return process_keyed((labels.get("job_id", ""), process_of(labels)))

    def process_keyed(key: tuple[str, str]) -> Process:
        return processes.setdefault(key, Process(key[1]))

    def rank0(result: list[dict]) -> list[tuple[dict, float | None]]:
        """The lifecycle series are rank 0's (the job's, not a rank's): as the job lookup reads them."""
        return [(labels, value) for labels, value in rows(result) if labels.get("rank", "0") == "0"]

    for labels, value in rank0(starts):
        process(labels).start = value
    for labels, value in rank0(ends):
        process(labels).end = value
    # A process's state: the raw recent one, else its recorded state seen last, else the raw older one.
    chosen: dict[tuple[str, str], tuple[int, float, str | None]] = {}
    for rank, part in enumerate(("raw", "recent", "recorded", "older")):
        for labels, value in rank0(states.get(part, [])):
            key = (labels.get("job_id", ""), process_of(labels))
            best = chosen.get(key)
            if best is None or (best[0] == rank and (value or 0.0) >= best[1]):
                chosen[key] = (rank, value or 0.0, labels.get("state"))
    for key, (_, _, state) in chosen.items():
        process_keyed(key).state = state
    for labels, value in rows(resuming):
        proc = processes.get((labels.get("job_id", ""), process_of(labels)))
        if proc is not None:
            proc.resuming = bool(value)
    scraped_now = {(labels.get("job_id", ""), process_of(labels)) for labels, _ in rows(live)}
    for key, proc in processes.items():
        proc.live = key in scraped_now
    await _add_last_seen(client, processes, range_seconds, now)
    hold_missed_scrapes(processes.values(), now)
    # Each process's metadata (rank 0's), and every owner a job's processes name: as the job's own analytics, a
    # job is an owner's only when all of them say so, and its metadata are its newest process's.
    info_by_process = {(labels.get("job_id"), process_of(labels)): labels for labels, _ in rows(infos)
                       if labels.get("rank", "0") == "0"}
    owners_by_job: dict[str, set[str]] = {}
    for (job_id, _), labels in info_by_process.items():
        owners_by_job.setdefault(job_id, set()).add(labels.get("owner", ""))
    samples_by_job = {labels.get("job_id"): value for labels, value in rows(samples)}
    loss_by_process = last_losses(losses)
    by_job: dict[str, list[Process]] = {}
    for (job_id, _), proc in processes.items():
        by_job.setdefault(job_id, []).append(proc)
    table, speaking, timelines = [], {}, {}
    # (Not by the job server's entry of a job: scraped while the job waits to resume, it held a killed run live.)
    jobs_scraped_now = {key[0] for key in scraped_now if key not in processes or processes[key].trainer}
    for job_id, procs in sorted(by_job.items()):
        procs = in_order(procs)
        latest = procs[-1]
        hold_while_a_rank_runs(latest, job_id in jobs_scraped_now)
        status = job_status(procs)
        # A killed run's end and loss are the job's; the server that noticed the death gives only its state.
        latest = killed_run(procs) or latest
        # Who speaks for the job's metadata and final loss: its trainer processes, the killed run or else the newest
        # first, then the job server's entry (of a job it cancelled while paused: a state, an end, a name and an
        # owner only): lookup.speakers.
        speaking[job_id] = [p.key for p in speakers([p for p in procs if p is not latest] + [latest])]
        timeline = timeline_of(procs, now)
        starts_known = [p.start for p in procs if p.start is not None]
        total = samples_by_job.get(job_id)
        info = next((info_by_process[(job_id, key)] for key in speaking[job_id] if (job_id, key) in info_by_process),
                    {})
        if owner is not None and owners_by_job.get(job_id) != {owner}:
            continue
        timelines[job_id] = timeline
        table.append(shapes.JobRow(
            job_id=job_id, **{key: info.get(key) for key in METADATA}, status=status,
            start_time=min(starts_known) if starts_known else None,
            end_time=latest.stop(now) if status in ENDED else None,
            **_times(timeline, total), total_samples=int(total) if total is not None else None,
            final_loss=final_loss(loss_by_process, job_id, speaking[job_id])))
    await _whole_resumed(client, table, processes, timelines, lookback, now)
    return table, speaking, processes, timelines


def _times(timeline: Timeline, samples: float | None) -> dict[str, float | None]:
    """A row's times and throughput from the job's runs and samples, as its own analytics give them."""
    return dict(duration_seconds=rounded(timeline.total_seconds), paused_seconds=rounded(timeline.paused_seconds),
                training_seconds=rounded(timeline.training_seconds),
                average_samples_per_second=rounded(ratio(samples, timeline.training_seconds)))


async def _whole_resumed(client: PrometheusClient, table: list[shapes.JobRow],
                         processes: dict[tuple[str, str], Process], timelines: dict[str, Timeline], lookback: float,
                         now: float) -> None:
    """Tell the rows of the jobs resumed from runs before the range as their own analytics do. The range holds only
    their later runs, while a resumed process carries the job's sample count on: their rows' times were those runs'
    alone, their throughput overstated by the earlier runs' samples (23 hours before the range and a minute in it
    topped the summary's ranking). Such a job's earliest process in the range took its checkpoint count over from a
    run (Process.resumed: how the job lookup notices a run it did not find); those jobs are found as the job's own
    analytics find them (lookup.find_jobs over the lookback), each step one request for all of them, and their rows
    take the whole job's runs (the summary cuts its training seconds to the range: Timeline.training_seconds_within)."""
    earliest: dict[str, Process] = {}
    for (job_id, _), proc in processes.items():
        if job_id in timelines and proc.start is not None and (
                job_id not in earliest or proc.start < earliest[job_id].start):
            earliest[job_id] = proc
    # (not a trainer's job id: nothing of it enters a query)
    stops = [(job_id, proc.stop(now)) for job_id, proc in earliest.items() if _trainer_job_id(job_id)]
    stops = [(job_id, stop) for job_id, stop in stops if stop is not None]
    if not stops:
        return
    found = await query_parts(client, q.fleet_checkpoints(stops, now), now)
    for index, (job_id, _) in enumerate(stops):
        proc = earliest[job_id]
        for part, attribute in (("counted", "checkpoints"), ("written", "written")):
            for labels, value in rows(found[f"{part}_{index}"]):
                if labels.get("rank", "0") == "0" and process_of(labels) == proc.key:
                    setattr(proc, attribute, value)
    resumed = [job_id for job_id, _ in stops if earliest[job_id].resumed]
    if not resumed:
        return
    by_id = {row.job_id: row for row in table}
    for job_id, facts in zip(resumed, await find_jobs(client, resumed, lookback, now, strict=False)):
        if facts is None:
            continue
        row, timelines[job_id] = by_id[job_id], facts.timeline
        row.start_time = facts.start
        for key, value in _times(facts.timeline, row.total_samples).items():
            setattr(row, key, value)


def last_losses(answer: list[dict]) -> dict[tuple[str, str], float | None]:
    """Each rank-0 process's last loss (queries.fleet_loss) by (job id, process): None where it was not finite."""
    return {(labels.get("job_id"), process_of(labels)): None if labels.get("nonfinite") else value
            for labels, value in rows(answer) if labels.get("rank", "0") == "0"}


def final_loss(losses: dict[tuple[str, str], float | None], job_id: str, keys: list[str]) -> float | None:
    """The job's final loss, as its own analytics tell it: its newest process's that logged one (a run that failed
    in its restore logged none), None when that last one was not finite."""
    return next((losses[(job_id, key)] for key in keys if (job_id, key) in losses), None)


async def _add_last_seen(client: PrometheusClient, processes: dict[tuple[str, str], Process], range_seconds: float,
                         now: float) -> None:
    """When each process that stopped without an end (and is not scraped now), or never started training, was
    last seen, in one request for their jobs."""
    # A process killed in its init (its state queued for good), or still in it, or one that ended there (failed in
    # its restore: an end, no start), is a trainer's: its heartbeat tells it from the job server's entry (a state,
    # an end, a name and an owner), which lookup.speakers puts last. Taken for the server's, the failed process
    # let the run before it name the job in the job list, not in the job's own analytics.
    # Which one an ended process is matters only beside another of its job (speakers, in_order): alone, it is
    # every job the server cancelled in the queue over the range, each a part of the query.
    processes_of = Counter(job_id for job_id, _ in processes)
    job_ids = []
    for (job_id, _), proc in processes.items():
        # (a process in its init, live or killed there, is a trainer's all the same: a resumed job's newest)
        # (not a trainer's job id: nothing of it enters a query)
        if job_id not in job_ids and _trainer_job_id(job_id) and (
                (proc.start is None and (proc.end is None or processes_of[job_id] > 1))
                or (proc.end is None and not proc.live)):
            job_ids.append(job_id)
    if not job_ids:
        return
    found = await query_parts(client, q.fleet_last_seen(job_ids, range_seconds, now), now)
    for index, job_id in enumerate(job_ids):
        for labels, value in rows(found[f"seen_{index}"]):
            proc = processes.get((job_id, process_of(labels)))
            if proc is not None and labels.get("rank", "0") == "0":
                proc.last_seen = value


async def add_details(client: PrometheusClient, chosen: list[shapes.JobRow], speaking: dict[str, list[str]],
                      range_seconds: float, now: float, split: float | None) -> None:
    """Fill in the metadata and final loss of chosen rows of fleet(details=False), in one request. A row whose job
    id is no trainer's (a foreign series' job_id label) keeps none: as in _add_last_seen, nothing of it enters a
    query (quote_job_id refuses it: the whole summary answered 500)."""
    chosen = [row for row in chosen if _trainer_job_id(row.job_id)]
    if not chosen:
        return
    found = await query_parts(client, q.fleet_details([row.job_id for row in chosen], range_seconds, now, split), now)
    for index, row in enumerate(chosen):
        infos = [labels for labels, _ in rows(found[f"info_{index}"]) if labels.get("rank", "0") == "0"]
        by_process = {process_of(labels): labels for labels in infos}
        key = next((k for k in speaking.get(row.job_id, []) if k in by_process), None)
        info = by_process.get(key) or (infos or [{}])[0]
        for key in METADATA:
            setattr(row, key, info.get(key))
        row.final_loss = final_loss(last_losses(found[f"loss_{index}"]), row.job_id,
                                    speaking.get(row.job_id, []))


def _trainer_job_id(job_id: str) -> bool:
    """Whether a job id read from Prometheus is one a trainer may have (contract.validate_job_id)."""
    try:
        validate_job_id(job_id)
    except ValueError:
        return False
    return True


async def job_list(client: PrometheusClient, range_seconds: float, now: float, split: float | None,
                   status: str | None = None, owner: str | None = None, since: float | None = None,
                   until: float | None = None, lookback: float = DEFAULT_LOOKBACK) -> list[shapes.JobRow]:
    """The job list: fleet()'s rows over the range that match every given filter (filter_jobs)."""
    table, _, _, timelines = await _fleet(client, range_seconds, now, split, details=True, owner=owner,
                                          lookback=lookback)
    return filter_jobs(table, timelines, status, owner, since, until, now)


def filter_jobs(table: list[shapes.JobRow], timelines: dict[str, Timeline], status: str | None, owner: str | None,
                since: float | None, until: float | None, now: float) -> list[shapes.JobRow]:
    """Jobs matching every given filter; since/until keep jobs that ran at some time in [since, until]: a run of
    theirs (timelines, by job id) overlaps it."""
    kept = []
    for row in table:
        if status is not None and row.status != status:
            continue
        if owner is not None and row.owner != owner:
            continue
        if (since is not None or until is not None) and not _ran_within(row, timelines.get(row.job_id), since,
                                                                        until, now):
            continue
        kept.append(row)
    return kept


def _ran_within(row: shapes.JobRow, timeline: Timeline | None, since: float | None, until: float | None,
                now: float) -> bool:
    """Whether the job ran at some time in [since, until] (either bound open when None): by its runs, since its first
    start and last end (or now) enclose its pauses too, and kept a job paused, or waiting to resume, throughout the
    span. A zero-length run is a stop before any step (a failed restore, the server's cancel of a paused job)."""
    runs = [(start, stop) for start, stop in (timeline.runs if timeline else ()) if stop > start]
    if not runs:
        # A job that never ran (queued, cancelled in the queue) ran at no time. One whose stop is unknown (a trainer
        # from before the heartbeat, vanished) ran from its start to its end, or now.
        if row.start_time is None:
            return False
        runs = [(row.start_time, row.end_time if row.end_time is not None else now)]
    return any((since is None or stop >= since) and (until is None or start <= until) for start, stop in runs)


async def resource_trends(client: PrometheusClient, range_seconds: float, step: float, now: float,
                          recorded: bool, owner: str | None = None, split: float | None = None
                          ) -> dict[str, shapes.Trend]:
    """Each trend's points (on multiples of the step, then one at now), average and peak: a range query per
    trend (a fleet's trends are the summary's costliest queries: one each spreads them over Prometheus'
    cores) and one instant query at now for all of them. The point at now reads the step before now, which
    overlaps the last grid point's: the average is over the grid, whose steps tile the range, the peak over
    every point. With an owner, the job trends count that owner's jobs only: those the summary's rows count as
    the owner's (every process of the job in the range names the owner; split: where the rows read recorded
    series)."""
    parts = {name: q.trend(name, step, recorded, owner, range_seconds, now, split) for name in q.TRENDS}
    start, end, step_literal = q.trend_grid(range_seconds, step, now)
    latest, *series = await asyncio.gather(
        query_parts(client, parts, now), *(client.query_range(expr, start, end, step_literal) for expr in parts.values()))
    trends = {}
    for name, result in zip(parts, series):
        points = [(float(t), number(v)) for t, v in result[0].get("values", [])] if result else []
        gridded = [v for _, v in points if v is not None]
        if now > end and latest[name]:
            points.append((round(now, 3), number(latest[name][0]["value"][1])))
        numbers = [v for _, v in points if v is not None]
        averaged = gridded or numbers
        trends[name] = shapes.Trend(average=rounded(sum(averaged) / len(averaged)) if averaged else None,
                                    peak=rounded(max(numbers)) if numbers else None,
                                    points=[(t, rounded(v)) for t, v in points])
    return trends


async def summary(client: PrometheusClient, range_seconds: float, step: float, owner: str | None = None,
                  recorded: bool = True, lookback: float = DEFAULT_LOOKBACK) -> shapes.Summary:
    """The fleet summary over the last range_seconds (one owner's jobs when given), with the hosts'
    resource trends at `step` resolution. recorded: read the analytics recording rules' series where they
    cover the range; lookback: how far back a resumed job's earlier runs are found (_whole_resumed)."""
    with partial_answers() as partial:
        body = await _summary(client, range_seconds, step, owner, recorded, lookback)
    body.partial = bool(partial)
    return body


async def _summary(client: PrometheusClient, range_seconds: float, step: float, owner: str | None,
                   recorded: bool, lookback: float) -> shapes.Summary:
    now = time.time()
    split = await recorded_split(client, range_seconds, now, recorded)
    # Trends from recorded series only where they cover the whole range and each point spans several.
    recorded_trends = (split is not None and split <= now - range_seconds + q.RULE_WINDOW_SECONDS
                       and step >= q.RECORDED_TREND_MIN_STEP_SECONDS)
    # Metadata and final losses only where shown (the top 5), unless the owner filter needs everyone's.
    (table, speaking, processes, timelines), trends, ledger = await asyncio.gather(
        _fleet(client, range_seconds, now, split, details=owner is not None, owner=owner, lookback=lookback),
        resource_trends(client, range_seconds, step, now, recorded_trends, owner, split),
        query_parts(client, q.fleet_goodput(range_seconds, now), now))
    by_status = {status: 0 for status in shapes.STATES}
    for row in table:
        by_status[row.status] = by_status.get(row.status, 0) + 1
    finished = [row.duration_seconds for row in table
                if row.status in FINAL_STATES and row.duration_seconds is not None]
    throughputs = [row.average_samples_per_second for row in table if row.average_samples_per_second is not None]
    top = sorted((row for row in table if row.average_samples_per_second is not None),
                 key=lambda row: (-row.average_samples_per_second, row.job_id))[:5]
    if owner is None:
        await add_details(client, top, speaking, range_seconds, now, split)
    # Within the range, as the goodput beside it: a job that began before the range counts from its start.
    in_range = [timeline.training_seconds_within(now - range_seconds, now) for timeline in timelines.values()]
    trained_in_range = [seconds for seconds in in_range if seconds is not None]
    return shapes.Summary(
        range_seconds=range_seconds, evaluated_at=round(now, 3), total_jobs=len(table), jobs_by_status=by_status,
        average_duration_seconds=rounded(sum(finished) / len(finished)) if finished else None,
        total_training_seconds=rounded(sum(trained_in_range)) if trained_in_range else 0.0,
        average_throughput_samples_per_sec=rounded(sum(throughputs) / len(throughputs)) if throughputs else None,
        top_performing_jobs=[shapes.TopJob(**{key: getattr(row, key) for key in shapes.columns(shapes.TopJob)})
                             for row in top],
        resource_trends=shapes.ResourceTrends(step_seconds=step, series=trends, recorded_series=sorted(
            q.RECORDED_TRENDS) if recorded_trends else []),
        goodput=goodput.fleet(ledger, processes, {row.job_id for row in table}, now - range_seconds, now),
        partial=False)


def comparison_row(analytics: shapes.JobAnalytics) -> shapes.CompareRow:
    """One job's side-by-side row."""
    duration, performance, resources = analytics.duration, analytics.performance, analytics.resource_utilization
    return shapes.CompareRow(
        job_id=analytics.job_id, job_name=analytics.job_name, task=analytics.task, status=analytics.status,
        duration_seconds=duration.total_seconds, paused_seconds=duration.paused_seconds,
        training_seconds=duration.training_seconds, throughput=performance.average_samples_per_second,
        peak_throughput=performance.peak_samples_per_second, total_samples=performance.total_samples,
        final_loss=analytics.losses.final, best_loss=analytics.losses.best,
        gpu_utilization=resources.average_gpu_utilization_percent,
        average_cpu_percent=resources.average_cpu_percent, peak_memory_mb=resources.peak_memory_mb,
        overall_score=analytics.efficiency.overall_score, total_joules=analytics.energy.total_joules,
        samples_per_joule=analytics.energy.samples_per_joule, goodput_ratio=analytics.goodput.goodput_ratio,
        efficiency_complete=scoring.efficiency_complete(analytics.efficiency.gpu_utilization_score,
                                                        analytics.efficiency.throughput_score, analytics.device),
        energy_complete=energy_complete(analytics),
        goodput_complete=goodput.complete(analytics.goodput),
        partial=analytics.partial)


def energy_complete(analytics: shapes.JobAnalytics) -> bool:
    """Every source the job used was counted on every host: no figure missing, or only the GPU one of a job
    that ran on the CPU. A job whose GPU energy went uncounted would otherwise win on its CPU share alone."""
    reason = analytics.energy.unavailable_reason
    return analytics.energy.total_joules is not None and (reason is None or (
        reason == NO_GPU_ENERGY and analytics.device == "cpu"))


async def compare(client: PrometheusClient, cache: AnalyticsCache, job_ids: list[str], lookback: float,
                  owner: str | None = None, archive=None) -> shapes.Comparison:
    """Side-by-side rows and the winner per category, ties stated (stored reports where Prometheus lacks a
    job); partial where any job's analytics are."""
    analytics = await cached_jobs_analytics(client, cache, job_ids, lookback, owner, archive)
    table = [comparison_row(a) for a in analytics]
    winner, ties, reasons = scoring.winners([shapes.plain(row) for row in table])
    return shapes.Comparison(jobs=table, winner=shapes.Winner(**winner), ties=ties, no_winner_reasons=reasons,
                             partial=any(row.partial for row in table))
