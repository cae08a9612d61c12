"""What the endpoints answer, built from PromQL results: one job's analytics, the fleet summary, the job
list and the comparison. Queries come from queries.py only; scores from scoring.py."""

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from analytics import queries as q
from analytics import scoring
from analytics.prometheus import PrometheusClient

MIB = 1024 * 1024
STATUSES = q.JOB_STATES


class JobNotFound(LookupError):
    """No series of this job id within the lookback window."""

    def __init__(self, job_id: str):
        super().__init__(f"no training job {job_id!r} in Prometheus")
        self.job_id = job_id


# ----- reading PromQL results ---------------------------------------------------------------------------

def _number(text) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def scalar(result: list[dict]) -> float | None:
    """The value of a one-sample result; None when empty or not finite."""
    return _number(result[0]["value"][1]) if result else None


def rows(result: list[dict]) -> list[tuple[dict, float | None]]:
    """(labels, value) per sample."""
    return [(sample["metric"], _number(sample["value"][1])) for sample in result]


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def _percent(ratio: float | None) -> float | None:
    return None if ratio is None else 100.0 * ratio


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _r(value: float | None) -> float | None:
    return scoring.rounded(value)


# ----- one job ------------------------------------------------------------------------------------------

@dataclass
class Process:
    """One process of a job as Prometheus saw it (a resumed job has several)."""

    instance: str
    start: float | None = None
    end: float | None = None
    state: str | None = None


@dataclass
class JobFacts:
    """Where and when a job ran: found by id over the lookback window."""

    job_id: str
    info: dict
    status: str
    start: float | None
    end: float | None
    latest_instance: str | None
    error_type: str | None
    upload_seconds: float | None
    live: bool
    # Each process's final instant (end plus linger, or now while it runs); None when one is unknown.
    finals: list[float] | None = None
    # The disjoint spans (start, end-or-now) in which the job's processes ran (ranks overlap, a resumed job's
    # processes follow each other); None when a process's start or end is unknown.
    segments: list[tuple[float, float]] | None = None

    @property
    def settled(self) -> bool:
        """Finished and no longer scraped: its analytics cannot change."""
        return self.status in q.FINAL_STATES and self.end is not None and not self.live


async def query_parts(client: PrometheusClient, parts: dict[str, str], at: float) -> dict[str, list[dict]]:
    """Run several expressions in one request (queries.union) and split the answer by part."""
    grouped: dict[str, list[dict]] = {name: [] for name in parts}
    for sample in await client.query(q.union(parts), at):
        name = sample["metric"].pop(q.PART_LABEL, None)
        if name in grouped:
            grouped[name].append(sample)
    return grouped


async def query_parts_many(client: PrometheusClient, many: list[dict[str, str]], at: float) -> list[dict[str, list[dict]]]:
    """query_parts for several part sets (one per job) in one request: fewer, larger requests cost the HTTP
    client and Prometheus less per expression than one request per job."""
    merged = {f"{name}__{index}": expr for index, parts in enumerate(many) for name, expr in parts.items()}
    if not merged:
        return [{} for _ in many]
    found = await query_parts(client, merged, at)
    return [{name: found[f"{name}__{index}"] for name in parts} for index, parts in enumerate(many)]


class _Lookup:
    """One job's processes as the lookup queries find them (find_jobs runs each step for all jobs at once)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.processes: dict[str, Process] = {}
        self.info, self.failure, self.upload = [], [], []
        self.live = False
        self.ended: list[Process] = []

    def process(self, labels: dict) -> Process:
        instance = labels.get("instance", "")
        return self.processes.setdefault(instance, Process(instance))

    def absorb(self, parts: dict[str, list[dict]], suffix: str = "", instance: str | None = None) -> None:
        def mine(name: str) -> list[tuple[dict, float | None]]:
            return [(labels, value) for labels, value in rows(parts.get(name + suffix, []))
                    if instance is None or labels.get("instance", "") == instance]

        for labels, value in mine("start"):
            self.process(labels).start = value
        for labels, _ in mine("state"):
            self.process(labels).state = labels.get("state")
        self.info.extend(labels for labels, _ in mine("info"))
        self.failure.extend(labels for labels, _ in mine("failure"))
        self.upload.extend(value for _, value in mine("upload") if value is not None)

    def absorb_ends(self, parts: dict[str, list[dict]]) -> None:
        for labels, value in rows(parts["end"]):
            self.process(labels).end = value

    def recent(self, found: dict[str, list[dict]]) -> dict[str, str] | None:
        """Take job_recent's answer; the job_ended parts for processes that ended longer ago than the
        staleness window (read just before their final scrape), None when there are none."""
        self.absorb(found)
        self.absorb_ends(found)
        self.live = bool(scalar(found["live"]))
        self.ended = [p for p in self.processes.values() if p.start is None and p.end is not None][-8:]
        return q.job_ended(self.job_id, [p.end for p in self.ended]) if self.ended else None

    def older(self, found: dict[str, list[dict]]) -> None:
        for index, proc in enumerate(self.ended):
            self.absorb(found, f"_{index}", proc.instance)

    def facts(self, now: float) -> JobFacts:
        processes = self.processes
        if not any(p.start is not None or p.state is not None for p in processes.values()) and not self.info:
            raise JobNotFound(self.job_id)
        # The newest process speaks for the job: a resumed job's earlier process ended "cancelled".
        latest = max(processes.values(), key=lambda p: (p.start is not None, p.start or 0.0), default=None)
        status = (latest.state if latest else None) or "unknown"
        known_starts = [p.start for p in processes.values() if p.start is not None]
        finals = []
        for proc in processes.values():
            if proc.end is not None:
                finals.append(min(now, proc.end + q.FINAL_SCRAPE_GRACE_SECONDS))
            elif self.live and proc is latest:
                finals.append(now)
            else:   # paused, killed or not yet ended: where its last samples lie is unknown
                finals = None
                break
        segments = None
        if finals is not None and all(p.start is not None for p in processes.values()):
            spans = sorted((p.start, p.end if p.end is not None else now) for p in processes.values())
            segments = []
            for start, stop in spans:
                if segments and start <= segments[-1][1]:
                    segments[-1] = (segments[-1][0], max(segments[-1][1], stop))
                else:
                    segments.append((start, stop))
        labels = dict(self.info[0]) if self.info else {}
        for internal in ("__name__", "instance", "job", "job_id", "rank"):
            labels.pop(internal, None)
        return JobFacts(job_id=self.job_id, info=labels, status=status,
                        start=min(known_starts) if known_starts else None,
                        end=latest.end if latest and status in q.FINAL_STATES else None,
                        latest_instance=latest.instance if latest else None,
                        error_type=self.failure[0].get("error_type") if self.failure else None,
                        upload_seconds=max(self.upload) if self.upload else None, live=self.live, finals=finals,
                        segments=segments)


async def find_jobs(client: PrometheusClient, job_ids: list[str], lookback: float, now: float) -> list[JobFacts]:
    """Each job's processes, state and timestamps, every step one request for all the jobs; JobNotFound
    (for the first in order) when Prometheus holds nothing of a job."""
    lookups = [_Lookup(job_id) for job_id in job_ids]
    found = await query_parts_many(client, [q.job_recent(job_id, lookback, now) for job_id in job_ids], now)
    ended = [(lookup, lookup.recent(parts)) for lookup, parts in zip(lookups, found)]
    ended = [(lookup, parts) for lookup, parts in ended if parts]
    if ended:
        for (lookup, _), parts in zip(ended, await query_parts_many(client, [p for _, p in ended], now)):
            lookup.older(parts)
    # Never reported an end and no longer scraped: the costly full lookup.
    lost = [lookup for lookup in lookups if not lookup.processes]
    if lost:
        full = await query_parts_many(client, [q.job_lookup_full(lookup.job_id, lookback, now) for lookup in lost], now)
        for lookup, parts in zip(lost, full):
            lookup.absorb(parts)
            lookup.absorb_ends(parts)
    return [lookup.facts(now) for lookup in lookups]


async def first_loss(client: PrometheusClient, job_id: str, start: float, window: float) -> float | None:
    """The first trainer_loss sample Prometheus holds for the job: its first minute, else its whole window."""
    for seconds in dict.fromkeys((min(q.FIRST_LOSS_SECONDS, window), window)):
        series = await client.query(q.first_losses(job_id, seconds), start + seconds)
        firsts = [s["values"][0] for s in series if s.get("values")]
        if firsts:
            return _number(min(firsts, key=lambda point: point[0])[1])
    return None


async def job_analytics(client: PrometheusClient, job_id: str, lookback: float) -> dict:
    """The analytics of one job (the /api/training/{job_id}/analytics body)."""
    return (await jobs_analytics(client, [job_id], lookback))[0][0]


@dataclass
class _Window:
    """Where a job's figures are read: rates and peaks over (start, end], cumulative and last values up to
    the final scrape after the end (the linger), never past now."""

    end: float
    window: float
    final_time: float
    final_window: float

    @classmethod
    def of(cls, facts: JobFacts, now: float) -> "_Window":
        end = facts.end if facts.end is not None else now
        final_time = min(now, end + q.FINAL_SCRAPE_GRACE_SECONDS) if facts.end is not None else now
        return cls(end, max(end - facts.start, 1e-3), final_time, max(final_time - facts.start, 1e-3))


async def jobs_analytics(client: PrometheusClient, job_ids: list[str], lookback: float) -> list[tuple[dict, JobFacts]]:
    """The analytics of several jobs, in order, with each job's facts.

    Requests: the lookup (one, or two when some process ended long ago, for all the jobs), every instant
    expression of every job (each carries its `@`; one request), then per job one range query of its peak
    grid and one of its first loss. Fewer requests would lose Prometheus' cores to one query; more cost the
    HTTP client more than they gain on a small host."""
    now = time.time()
    all_facts = await find_jobs(client, job_ids, lookback, now)
    started = [(facts, _Window.of(facts, now)) for facts in all_facts if facts.start is not None]   # not queued

    async def instant() -> list[dict[str, list[dict]]]:
        def parts(facts: JobFacts, w: _Window) -> dict[str, str]:
            return {**q.job_totals(facts.job_id, w.final_window, w.final_time, facts.finals),
                    **q.job_rates(facts.job_id, w.window, w.end, facts.segments),
                    **q.host(w.window, facts.start, w.end)}

        found = await query_parts_many(client, [parts(facts, w) for facts, w in started], now)
        # Counters and last values come from each process's last minute; where that held no samples (scrapes
        # failed through it) read the whole window.
        again = [i for i, (facts, _) in enumerate(started) if facts.finals and not found[i]["samples"]]
        if again:
            whole = await query_parts_many(client, [q.job_totals(started[i][0].job_id, started[i][1].final_window,
                                                                 started[i][1].final_time) for i in again], now)
            for i, parts in zip(again, whole):
                found[i].update(parts)
        return found

    instants, *per_job = await asyncio.gather(
        instant(),
        *(peaks(client, {**q.job_peaks(facts.job_id, w.window, gpus=facts.info.get("device") != "cpu"),
                         **q.host_peaks(w.window)}, w.window, w.end) for facts, w in started),
        *(first_loss(client, facts.job_id, facts.start, w.final_window) for facts, w in started))
    peak_results, initial_losses = per_job[:len(started)], per_job[len(started):]
    answers = {facts.job_id: (_assemble(facts, now, {**found, **peak}, initial, window=w.window), facts)
               for (facts, w), found, peak, initial in zip(started, instants, peak_results, initial_losses)}
    return [answers.get(facts.job_id) or (_assemble(facts, now, {}, None), facts) for facts in all_facts]


async def peaks(client: PrometheusClient, expressions: dict[str, str], window: float, end: float) -> dict:
    """<name>_peak, <name>_peak_at and <name>_mean for each label-free expression: its maximum over the peak
    grid of (end - window, end], the first grid time that reached it, and its mean over the grid (what
    avg_over_time over the subquery grid gives), from one range query of all of them."""
    start, last, step = q.peak_grid(window, end)
    grouped: dict[str, list] = {name: [] for name in expressions}
    for series in await client.query_range(q.union(expressions), start, last, step):
        name = series["metric"].get(q.PART_LABEL)
        if name in grouped:
            grouped[name].extend(series.get("values", []))
    results = {}
    for name, points in grouped.items():
        results[f"{name}_peak"], results[f"{name}_peak_at"], results[f"{name}_mean"] = [], [], []
        # A 250-point grid per expression: one float() per value, no per-point tuples.
        values = [float(v) for _, v in points]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            peak = max(finite)
            when = min(float(t) for (t, _), v in zip(points, values) if v == peak)
            results[f"{name}_peak"] = [{"metric": {}, "value": [end, repr(peak)]}]
            results[f"{name}_peak_at"] = [{"metric": {}, "value": [end, repr(when)]}]
            results[f"{name}_mean"] = [{"metric": {}, "value": [end, repr(sum(finite) / len(finite))]}]
    return results


def _final_loss(facts: JobFacts, result: list[dict]) -> float | None:
    values = rows(result)
    own = [value for labels, value in values if labels.get("instance") == facts.latest_instance
           and labels.get("rank", "0") == "0"]
    candidates = own or [value for _, value in values]
    candidates = [value for value in candidates if value is not None]
    return min(candidates) if candidates else None


def _assemble(facts: JobFacts, now: float, results: dict, initial_loss: float | None,
              window: float | None = None) -> dict:
    def value(name: str) -> float | None:
        return scalar(results.get(name, []))

    total_seconds = window or 0.0
    samples = value("samples")
    average_sps = samples / total_seconds if samples is not None and total_seconds > 0 else None
    peak_sps = value("samples_per_second_peak")
    if peak_sps is not None and average_sps is not None and peak_sps < average_sps:
        # Some window must reach the whole run's average; a lower observed peak means Prometheus saw only
        # part of the run (a job scraped late or briefly), so the average is the better lower bound.
        peak_sps = average_sps
    cpu_seconds = value("cpu_seconds")
    average_gpu = _percent(value("gpu_utilization_avg_mean"))
    gpu_memory_peak = value("trainer_gpu_memory_peak")
    if gpu_memory_peak is None:
        gpu_memory_peak = value("gpu_memory_peak")
    final_loss = _final_loss(facts, results.get("loss_last", []))
    best_loss = value("loss_best")
    reduction = (100.0 * (initial_loss - final_loss) / initial_loss
                 if initial_loss and final_loss is not None else None)
    host_cpu_average, host_cpu_baseline = _percent(value("host_cpu_average")), _percent(value("host_cpu_baseline"))
    host_memory_average = _mib(value("host_memory_average"))
    host_memory_baseline = _mib(value("host_memory_baseline"))
    return {
        "job_id": facts.job_id,
        "job_name": facts.info.get("job_name"),
        "model": facts.info.get("model"),
        "dataset": facts.info.get("dataset"),
        "owner": facts.info.get("owner"),
        "device": facts.info.get("device"),
        "status": facts.status,
        "error_type": facts.error_type,
        "start_time": facts.start,
        "end_time": facts.end,
        "evaluated_at": round(now, 3),
        "duration": {
            "total_seconds": _r(total_seconds),
            "total_minutes": _r(total_seconds / 60),
            "total_hours": _r(total_seconds / 3600),
            "upload_seconds": _r(facts.upload_seconds),
        },
        "performance": {
            "total_samples": int(samples) if samples is not None else None,
            "total_steps": int(value("steps")) if value("steps") is not None else None,
            "average_samples_per_second": _r(average_sps),
            "peak_samples_per_second": _r(peak_sps),
            "peak_samples_per_second_at": value("samples_per_second_peak_at"),
            "average_step_seconds": _r(value("step_seconds")),
        },
        "resource_utilization": {
            "average_gpu_utilization_percent": _r(average_gpu),
            "peak_gpu_utilization_percent": _r(_percent(value("gpu_utilization_peak"))),
            "peak_gpu_utilization_at": value("gpu_utilization_peak_at"),
            "peak_gpu_memory_mb": _r(_mib(gpu_memory_peak)),
            "average_gpu_temperature_celsius": _r(value("gpu_temperature_mean")),
            "average_cpu_percent": _r(100.0 * cpu_seconds / total_seconds
                                      if cpu_seconds is not None and total_seconds > 0 else None),
            "peak_cpu_percent": _r(_percent(value("job_cpu_peak"))),
            "peak_cpu_at": value("job_cpu_peak_at"),
            "peak_memory_mb": _r(_mib(value("job_rss_peak"))),
            "peak_memory_at": value("job_rss_peak_at"),
            "host": {
                "cpu": {
                    "baseline_percent": _r(host_cpu_baseline),
                    "average_percent": _r(host_cpu_average),
                    "increase_percent": _r(_minus(host_cpu_average, host_cpu_baseline)),
                    "peak_percent": _r(_percent(value("host_cpu_peak"))),
                    "peak_at": value("host_cpu_peak_at"),
                },
                "memory": {
                    "baseline_mb": _r(host_memory_baseline),
                    "average_mb": _r(host_memory_average),
                    "increase_mb": _r(_minus(host_memory_average, host_memory_baseline)),
                    "peak_mb": _r(_mib(value("host_memory_peak"))),
                    "peak_at": value("host_memory_peak_at"),
                    "limit_mb": _r(_mib(value("host_memory_limit"))),
                },
            },
        },
        "checkpoints": {"count": int(value("checkpoints")) if value("checkpoints") is not None else None},
        "losses": {
            "initial": initial_loss,
            "final": final_loss,
            "best": best_loss,
            "reduction_percent": _r(reduction),
            "final_eval_accuracy": value("accuracy"),
        },
        "efficiency": scoring.efficiency(average_gpu, average_sps, peak_sps),
    }


class AnalyticsCache:
    """Finished jobs' analytics, bounded (least recently used out). Only settled jobs enter: final state
    and no longer scraped, so nothing about them can change. Running jobs are never cached."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, job_id: str) -> dict | None:
        """The cached analytics, or None."""
        entry = self._entries.get(job_id)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(job_id)
        self.hits += 1
        return entry

    def put(self, job_id: str, analytics: dict) -> None:
        """Keep analytics (the caller checked that the job is settled)."""
        if self.max_entries <= 0:
            return
        self._entries[job_id] = analytics
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


async def cached_jobs_analytics(client: PrometheusClient, cache: AnalyticsCache, job_ids: list[str],
                                lookback: float) -> list[dict]:
    """jobs_analytics through the cache: the jobs not cached are read together."""
    cached = {job_id: cache.get(job_id) for job_id in dict.fromkeys(job_ids)}
    missing = [job_id for job_id, analytics in cached.items() if analytics is None]
    for analytics, facts in await jobs_analytics(client, missing, lookback) if missing else []:
        cached[facts.job_id] = analytics
        if facts.settled:
            cache.put(facts.job_id, analytics)
    return [cached[job_id] for job_id in job_ids]


async def cached_job_analytics(client: PrometheusClient, cache: AnalyticsCache, job_id: str,
                               lookback: float) -> dict:
    """job_analytics through the cache."""
    return (await cached_jobs_analytics(client, cache, [job_id], lookback))[0]


# ----- the fleet ----------------------------------------------------------------------------------------

async def recorded_split(client: PrometheusClient, range_seconds: float, now: float,
                         enabled: bool = True) -> float | None:
    """Where the fleet's recorded part begins (queries.recorded_split); None: raw series only."""
    if not enabled:
        return None
    gap = scalar(await client.query(q.recorded_gap(range_seconds, now), now))
    return q.recorded_split(range_seconds, now, gap)


async def fleet(client: PrometheusClient, range_seconds: float, now: float, split: float | None = None,
                details: bool = True) -> list[dict]:
    """One row per job seen in the last range_seconds: metadata, status, times, samples, throughput.

    split (recorded_split): read the recorded per-process series there, raw ones before and after it.
    details=False: leave metadata and final loss out (None) for add_details to fill in for a few rows."""
    return (await _fleet(client, range_seconds, now, split, details))[0]


async def _fleet(client: PrometheusClient, range_seconds: float, now: float, split: float | None,
                 details: bool) -> tuple[list[dict], dict[str, str]]:
    """The fleet's rows, and each job's newest process (its instance)."""
    state_expr = q.fleet_state(range_seconds, now, split)
    state_parts = state_expr if isinstance(state_expr, dict) else {"raw": state_expr}

    async def nothing() -> list:
        return []

    async def each_state() -> dict[str, list[dict]]:
        """The state parts as separate requests: together they were the fleet's longest one."""
        results = await asyncio.gather(*(client.query(expr, now) for expr in state_parts.values()))
        return dict(zip(state_parts, results))

    starts, ends, states, infos, samples, losses = await asyncio.gather(
        client.query(q.fleet_start(range_seconds, now, split), now),
        client.query(q.fleet_end(range_seconds, now, split), now),
        each_state(),
        client.query(q.fleet_info(range_seconds, now, split), now) if details else nothing(),
        client.query(q.fleet_samples(range_seconds, now, split), now),
        client.query(q.fleet_loss(range_seconds, now, split), now) if details else nothing())
    processes: dict[tuple[str, str], Process] = {}

    def process(labels: dict) -> Process:
        key = (labels.get("job_id", ""), labels.get("instance", ""))
        return processes.setdefault(key, Process(key[1]))

    for labels, value in rows(starts):
        process(labels).start = value
    for labels, value in rows(ends):
        process(labels).end = value
    # A process's state: the raw recent one, else its recorded state seen last, else the raw older one.
    chosen: dict[tuple[str, str], tuple[int, float, str | None]] = {}
    for rank, part in enumerate(("raw", "recent", "recorded", "older")):
        for labels, value in rows(states.get(part, [])):
            key = (labels.get("job_id", ""), labels.get("instance", ""))
            best = chosen.get(key)
            if best is None or (best[0] == rank and (value or 0.0) >= best[1]):
                chosen[key] = (rank, value or 0.0, labels.get("state"))
    for (job_id, instance), (_, _, state) in chosen.items():
        process({"job_id": job_id, "instance": instance}).state = state
    info_by_job = {labels.get("job_id"): labels for labels, _ in rows(infos)}
    samples_by_job = {labels.get("job_id"): value for labels, value in rows(samples)}
    loss_by_process = {(labels.get("job_id"), labels.get("instance")): value for labels, value in rows(losses)
                       if labels.get("rank", "0") == "0"}
    by_job: dict[str, list[Process]] = {}
    for (job_id, _), proc in processes.items():
        by_job.setdefault(job_id, []).append(proc)
    table, latest_instance = [], {}
    for job_id, procs in sorted(by_job.items()):
        latest = max(procs, key=lambda p: (p.start is not None, p.start or 0.0))
        latest_instance[job_id] = latest.instance
        status = latest.state or "unknown"
        starts_known = [p.start for p in procs if p.start is not None]
        start = min(starts_known) if starts_known else None
        end = latest.end if status in q.FINAL_STATES else None
        duration = ((end if end is not None else now) - start) if start is not None else None
        total = samples_by_job.get(job_id)
        info = info_by_job.get(job_id, {})
        table.append({
            "job_id": job_id, "job_name": info.get("job_name"), "model": info.get("model"),
            "dataset": info.get("dataset"), "owner": info.get("owner"), "device": info.get("device"),
            "status": status, "start_time": start, "end_time": end, "duration_seconds": _r(duration),
            "total_samples": int(total) if total is not None else None,
            "average_samples_per_second": _r(total / duration) if total is not None and duration else None,
            "final_loss": loss_by_process.get((job_id, latest.instance)),
        })
    return table, latest_instance


METADATA = ("job_name", "model", "dataset", "owner", "device")


async def add_details(client: PrometheusClient, chosen: list[dict], latest_instance: dict[str, str],
                      range_seconds: float, now: float, split: float | None) -> None:
    """Fill in the metadata and final loss of chosen rows of fleet(details=False), in one request."""
    if not chosen:
        return
    found = await query_parts(client, q.fleet_details([row["job_id"] for row in chosen], range_seconds, now, split), now)
    for index, row in enumerate(chosen):
        infos = [labels for labels, _ in rows(found[f"info_{index}"])]
        info = infos[0] if infos else {}
        row.update({key: info.get(key) for key in METADATA})
        instance = latest_instance.get(row["job_id"])
        row["final_loss"] = next((value for labels, value in rows(found[f"loss_{index}"])
                                  if labels.get("instance") == instance and labels.get("rank", "0") == "0"), None)


def filter_jobs(table: list[dict], status: str | None, owner: str | None, since: float | None,
                until: float | None, now: float) -> list[dict]:
    """Jobs matching every given filter; since/until keep jobs that ran at some time in [since, until]."""
    kept = []
    for row in table:
        if status is not None and row["status"] != status:
            continue
        if owner is not None and row["owner"] != owner:
            continue
        start = row["start_time"]
        end = row["end_time"] if row["end_time"] is not None else now
        if since is not None and (end is None or end < since):
            continue
        if until is not None and (start is None or start > until):
            continue
        kept.append(row)
    return kept


async def resource_trends(client: PrometheusClient, range_seconds: float, step: float, now: float,
                          recorded: bool) -> dict[str, dict]:
    """Each trend's points (on multiples of the step, then one at now), average and peak: a range query per
    trend (a fleet's trends are the summary's costliest queries: one each spreads them over Prometheus'
    cores) and one instant query at now for all of them."""
    parts = {name: q.trend(name, step, recorded) for name in q.TRENDS}
    start, end, step_literal = q.trend_grid(range_seconds, step, now)
    latest, *series = await asyncio.gather(
        query_parts(client, parts, now), *(client.query_range(expr, start, end, step_literal) for expr in parts.values()))
    points = {name: [[float(t), _number(v)] for t, v in result[0].get("values", [])] if result else []
              for name, result in zip(parts, series)}
    trends = {}
    for name, values in points.items():
        if now > end and latest[name]:
            values.append([round(now, 3), _number(latest[name][0]["value"][1])])
        numbers = [v for _, v in values if v is not None]
        trends[name] = {
            "average": _r(sum(numbers) / len(numbers)) if numbers else None,
            "peak": _r(max(numbers)) if numbers else None,
            "points": values,
        }
    return trends


async def summary(client: PrometheusClient, range_seconds: float, step: float, owner: str | None = None,
                  recorded: bool = True) -> dict:
    """The fleet summary over the last range_seconds (one owner's jobs when given), with the hosts'
    resource trends at `step` resolution. recorded: read the analytics recording rules' series where they
    cover the range."""
    now = time.time()
    split = await recorded_split(client, range_seconds, now, recorded)
    # Trends from recorded series only where they cover the whole range and each point spans several.
    recorded_trends = (split is not None and split <= now - range_seconds + q.RULE_WINDOW_SECONDS
                       and step >= q.RECORDED_TREND_MIN_STEP_SECONDS)
    # Metadata and final losses only where shown (the top 5), unless the owner filter needs everyone's.
    (table, latest_instance), trends = await asyncio.gather(
        _fleet(client, range_seconds, now, split, details=owner is not None),
        resource_trends(client, range_seconds, step, now, recorded_trends))
    if owner is not None:
        table = [row for row in table if row["owner"] == owner]
    by_status = {status: 0 for status in STATUSES}
    for row in table:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    durations = [row["duration_seconds"] for row in table if row["duration_seconds"] is not None]
    finished = [row["duration_seconds"] for row in table
                if row["status"] in q.FINAL_STATES and row["duration_seconds"] is not None]
    throughputs = [row["average_samples_per_second"] for row in table
                   if row["average_samples_per_second"] is not None]
    top = sorted((row for row in table if row["average_samples_per_second"] is not None),
                 key=lambda row: (-row["average_samples_per_second"], row["job_id"]))[:5]
    if owner is None:
        await add_details(client, top, latest_instance, range_seconds, now, split)
    return {
        "range_seconds": range_seconds,
        "evaluated_at": round(now, 3),
        "total_jobs": len(table),
        "jobs_by_status": by_status,
        "average_duration_seconds": _r(sum(finished) / len(finished)) if finished else None,
        "total_training_seconds": _r(sum(durations)) if durations else 0.0,
        "average_throughput_samples_per_sec": _r(sum(throughputs) / len(throughputs)) if throughputs else None,
        "top_performing_jobs": [{key: row[key] for key in ("job_id", "job_name", "owner", "status",
                                                           "average_samples_per_second", "duration_seconds",
                                                           "total_samples", "final_loss")} for row in top],
        "resource_trends": {"step_seconds": step, "series": trends},
    }


# ----- comparison ---------------------------------------------------------------------------------------

def comparison_row(analytics: dict) -> dict:
    """One job's side-by-side row."""
    performance, resources = analytics["performance"], analytics["resource_utilization"]
    return {
        "job_id": analytics["job_id"],
        "job_name": analytics["job_name"],
        "status": analytics["status"],
        "duration_seconds": analytics["duration"]["total_seconds"],
        "throughput": performance["average_samples_per_second"],
        "peak_throughput": performance["peak_samples_per_second"],
        "total_samples": performance["total_samples"],
        "final_loss": analytics["losses"]["final"],
        "best_loss": analytics["losses"]["best"],
        "gpu_utilization": resources["average_gpu_utilization_percent"],
        "average_cpu_percent": resources["average_cpu_percent"],
        "peak_memory_mb": resources["peak_memory_mb"],
        "overall_score": analytics["efficiency"]["overall_score"],
    }


async def compare(client: PrometheusClient, cache: AnalyticsCache, job_ids: list[str], lookback: float) -> dict:
    """Side-by-side rows and the winner per category, ties stated."""
    analytics = await cached_jobs_analytics(client, cache, job_ids, lookback)
    table = [comparison_row(a) for a in analytics]
    winner, ties = scoring.winners(table)
    return {"jobs": table, "winner": winner, "ties": ties}
