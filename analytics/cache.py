"""Settled jobs' analytics kept in memory, each valid while the cheap lookup sees the job as it did."""

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.goodput import EARLIER_RUNS_GONE
from trainmetrics.analytics.job import jobs_analytics
from trainmetrics.analytics.lookup import JobNotFound, fingerprint, owned_by
from trainmetrics.analytics.prometheus import (DEFAULT_RETRY_AFTER_SECONDS, PrometheusClient, PrometheusError,
                                                note_partial, partial_answers)
from trainmetrics.analytics.results import query_parts_many, rows
from trainmetrics.analytics.shapes import STATUSES, JobAnalytics, from_plain
from trainmetrics.contract import VANISHED
from trainmetrics.reports import NotSettled, PartialAnswer, ReportArchive


@dataclass(frozen=True)
class Entry:
    """A settled job's analytics, its owners, and what the cheap lookup saw of it (lookup.fingerprint)."""

    analytics: JobAnalytics | None      # None: another owner's job, found and never computed
    owners: frozenset[str]
    fingerprint: frozenset


class AnalyticsCache:
    """Settled jobs' analytics (stopped and no longer scraped), bounded, least recently used out. A settled job
    changes only when a new process of it runs (a resume), which the cheap lookup sees: every use checks
    that first. Running jobs are never kept."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.hits = self.misses = 0
        # The computations under way, by (job id, owner scope): a request for a job another is computing waits
        # for that one (computed_together).
        self.computing: dict[tuple[str, str | None], _Computation] = {}

    def get(self, job_id: str) -> Entry | None:
        """The job's entry, or None."""
        entry = self._entries.get(job_id)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(job_id)
        self.hits += 1
        return entry

    def put(self, job_id: str, entry: Entry) -> None:
        """Keep an entry (the caller checked that the job is settled)."""
        if self.max_entries <= 0:
            return
        self._entries[job_id] = entry
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, job_id: str) -> None:
        """Forget a job's entry."""
        self._entries.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._entries)


async def cached_jobs_analytics(client: PrometheusClient, cache: AnalyticsCache, job_ids: list[str],
                                lookback: float, owner: str | None = None,
                                archive: ReportArchive | None = None) -> list[JobAnalytics]:
    """jobs_analytics through the cache: the cached jobs checked in one request (a job whose processes changed
    is read again), the others read together; a job Prometheus does not hold comes from its stored report
    (`source: stored`) where the archive has one, and so do all of them while Prometheus cannot answer. With
    an owner, a job whose processes do not all carry that owner label is not found (404), exactly like one
    Prometheus lacks."""
    entries = {job_id: cache.get(job_id) for job_id in dict.fromkeys(job_ids)}
    try:
        with partial_answers() as partial:
            await _from_prometheus(client, cache, entries, lookback, archive, owner)
    except PrometheusError:
        # Prometheus cannot answer (nor say whether a cached job resumed): answered from the stored reports
        # when every job asked for has one of the caller's (another owner's stored job answers as an unknown
        # one does: a 404 for it, a 503 for the unknown, told one owner which ids another owner used).
        entries = await _stored_entries(archive, list(entries))
        if not all(_yours(entry, owner) for entry in entries.values()):
            raise
    entries.update(await _stored_entries(archive, [job_id for job_id, entry in entries.items() if entry is None]))
    for job_id in job_ids:    # the first job, in order, that is not there or not the caller's
        if not _yours(entries[job_id], owner):
            if partial:
                # It may be on the store that did not answer: "no such job" (404) the backend cannot say. Said
                # alike of an unknown id and of another owner's job (owners apart).
                raise PrometheusError("unavailable", f"Prometheus answered with part of its data, without job "
                                                     f"{job_id!r}: a store or shard did not answer",
                                      DEFAULT_RETRY_AFTER_SECONDS)
            raise JobNotFound(job_id)
    return [entries[job_id].analytics for job_id in job_ids]


def _yours(entry: Entry | None, owner: str | None) -> bool:
    """True when the job is there and, with an owner, wholly that owner's."""
    return entry is not None and owned_by(entry.owners, owner)


async def _from_prometheus(client: PrometheusClient, cache: AnalyticsCache, entries: dict[str, Entry | None],
                           lookback: float, archive: ReportArchive | None = None, owner: str | None = None) -> None:
    """Fill in `entries` from Prometheus: the cached ones checked in one request, the others read together. A
    settled job of which Prometheus holds less than its stored report (retention removes the oldest data first:
    its first runs, its early samples) is its stored report. A job that is not the owner's is looked up only
    (its entry's analytics None, not cached): it answers as an unknown one does, at the same cost."""
    cached = [job_id for job_id, entry in entries.items() if entry is not None]
    if cached:
        now = time.time()
        with partial_answers() as partial:
            found = await query_parts_many(client, [_check(job_id, entries[job_id], lookback, now)
                                                    for job_id in cached], now)
        for job_id, parts in zip(cached, found):
            seen, back = fingerprint(parts), came_back(entries[job_id], parts)
            # A partial answer that only lacks some of what the entry saw (a store down) says nothing changed: the
            # entry holds (read again from that answer, the job was a 503, or short of figures). One that saw
            # something new is read afresh; the entry goes only where a whole answer says the job changed.
            if not back and (seen == entries[job_id].fingerprint or (partial and seen <= entries[job_id].fingerprint)):
                continue
            if not partial:
                cache.drop(job_id)
            entries[job_id] = None
    missing = [job_id for job_id, entry in entries.items() if entry is None]
    for result in await computed_together(client, cache, missing, lookback, owner) if missing else []:
        if result is not None:
            analytics, facts = result
            if analytics is None:
                entries[facts.job_id] = Entry(None, facts.owners, facts.fingerprint)
                continue
            if facts.settled and archive is not None and archive.load is not None:
                stored = await stored_entry(archive, facts.job_id)
                if stored is not None and holds_less(analytics, stored.analytics):
                    analytics = stored.analytics
            entries[facts.job_id] = Entry(analytics, facts.owners, facts.fingerprint)
            if facts.settled and not facts.partial:
                cache.put(facts.job_id, entries[facts.job_id])


class _Computation:
    """jobs_analytics of some jobs under way in a task of its own, and how many requests wait for it."""

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.waiting = 0


async def _compute(client: PrometheusClient, job_ids: list[str], lookback: float, owner: str | None):
    """jobs_analytics (not strict) by job id, and the warnings of the partial answers among them."""
    with partial_answers() as partial:
        results = await jobs_analytics(client, job_ids, lookback, strict=False, owner=owner)
    return dict(zip(job_ids, results)), list(partial)


async def computed_together(client: PrometheusClient, cache: AnalyticsCache, job_ids: list[str], lookback: float,
                            owner: str | None) -> list:
    """jobs_analytics of the jobs (not strict), in order; a job another request of the same owner scope is computing
    now is that computation's. Each request computed its own: a dashboard's 8 viewers opening a finished job that was
    not cached yet cost 8 times its queries, queued behind --max-concurrency (a long job's past --request-timeout).
    A computation runs in a task of its own, so that one waiting request that gives up (its deadline, its client
    gone) leaves it to the others; the last to give up ends it, freeing its slots as a lone request's end did."""
    new = [job_id for job_id in job_ids if (job_id, owner) not in cache.computing]
    if new:
        computation = _Computation(asyncio.get_running_loop().create_task(_compute(client, new, lookback, owner)))
        keys = [(job_id, owner) for job_id in new]
        cache.computing.update(dict.fromkeys(keys, computation))
        computation.task.add_done_callback(lambda task: _computed(cache, keys, computation))
    computations = list(dict.fromkeys(cache.computing[(job_id, owner)] for job_id in job_ids))
    for computation in computations:
        computation.waiting += 1
    try:
        found = {}
        for computation in computations:
            results, warnings = await asyncio.shield(computation.task)
            note_partial(warnings)      # (this request's answer is partial as the computation's is)
            found.update(results)
    finally:
        for computation in computations:
            computation.waiting -= 1
            if computation.waiting == 0:
                computation.task.cancel()
    return [found[job_id] for job_id in job_ids]


def _computed(cache: AnalyticsCache, keys: list[tuple[str, str | None]], computation: _Computation) -> None:
    """A computation is over: later requests start their own (or use the cache it filled)."""
    for key in keys:
        if cache.computing.get(key) is computation:
            del cache.computing[key]
    if not computation.task.cancelled():
        computation.task.exception()    # (retrieved: no "never retrieved" log where every waiter gave up)


def _check(job_id: str, entry: Entry, lookback: float, now: float) -> dict[str, str]:
    """What a cached job is checked with: the cheap lookup, and for a vanished job its heartbeats since its end."""
    parts = q.job_recent(job_id, lookback, now)
    if _vanished_at(entry) is not None:
        parts.update(q.job_seen_since(job_id, _vanished_at(entry), now))
    return parts


def _vanished_at(entry: Entry) -> float | None:
    """The end of a cached vanished job (its newest process's last heartbeat), else None."""
    analytics = entry.analytics
    return analytics.end_time if analytics is not None and analytics.status == VANISHED else None


def came_back(entry: Entry, parts: dict[str, list[dict]]) -> bool:
    """Whether a cached vanished job's process (rank 0's, which speaks for the job) was seen after its end: frozen
    or cut off, not dead, it ran on. Vanished again between two uses, its start, spawn and missing end read as
    before (the fingerprint, which leaves heartbeat values out), and the cache served the first vanish's end,
    time and counts."""
    end = _vanished_at(entry)
    return end is not None and any(value is not None and value > end + 1e-3 for labels, value in
                                   rows(parts.get("seen", [])) if labels.get("rank", "0") == "0")


def holds_less(answer: JobAnalytics, stored: JobAnalytics) -> bool:
    """Whether an ended job's analytics from Prometheus now cover less of it than its stored report, computed from
    all of it once it settled (after which its series only go): a later start or a shorter life (its first runs
    gone), fewer evaluations (early samples gone), the earliest runs' time unaccounted, or a sampled peak lower
    than the report's (a run's first hours gone: its start, end and last eight evaluations are in its last
    samples, so a single run read as whole, its peaks and scores from what was left). Never when Prometheus holds
    a later end than the report's: that is newer data, not less."""
    def less(now: float | None, then: float | None) -> bool:
        return then is not None and (now is None or now < then - 1e-3)

    def peaks(analytics: JobAnalytics) -> tuple[float | None, ...]:
        resources = analytics.resource_utilization
        return (analytics.performance.peak_samples_per_second, resources.peak_gpu_utilization_percent,
                resources.peak_cpu_percent, resources.peak_memory_mb, resources.host.cpu.peak_percent,
                resources.host.memory.peak_mb)

    # A stored report's part may be missing (the row is text anyone with the database may have edited:
    # from_plain reads what is not there as null, a missing block as one whose every figure is null): what it
    # does not say is not more (a goodput block with neither a wall clock nor a reason says nothing).
    later_start = stored.start_time is not None and (answer.start_time is None or
                                                     answer.start_time > stored.start_time + 1e-3)
    if stored.end_time is not None and less(stored.end_time, answer.end_time):
        # Prometheus holds a run that ended after the report's end: the id ran again since (a standalone run reusing
        # it; a resume through the job server drops the report), which the report knows nothing of. Served, the
        # report hid that newer run once retention took the first one (a later start).
        return False
    said = stored.goodput.wall_clock_seconds is not None or stored.goodput.unavailable_reason is not None
    stored_reason = stored.goodput.unavailable_reason if said else EARLIER_RUNS_GONE
    return (later_start or less(answer.duration.total_seconds, stored.duration.total_seconds)
            or len(answer.evaluations) < len(stored.evaluations or ())
            or answer.goodput.unavailable_reason == EARLIER_RUNS_GONE != stored_reason
            or any(less(now, then) for now, then in zip(peaks(answer), peaks(stored))))


async def _stored_entries(archive: ReportArchive | None, job_ids: list[str]) -> dict[str, Entry | None]:
    if archive is None or archive.load is None:
        return {job_id: None for job_id in job_ids}
    return {job_id: await stored_entry(archive, job_id) for job_id in job_ids}


async def settled_job_analytics(client: PrometheusClient, cache: AnalyticsCache, job_id: str,
                                lookback: float, settled: bool = True, owner: str | None = None) -> JobAnalytics:
    """A job's analytics for its stored report: NotSettled while a process of it, or a node exporter that
    attributes it (its energy counts), is still scraped (unless `settled` is False: the keeper's last
    word); PartialAnswer when the backend answered with part of its data (never stored: a report is kept for
    good); JobNotFound when Prometheus does not hold it, or (with an owner) not wholly as that owner's: a report
    served to its owner holds nothing of another owner's job that shares its id, which its analytics never
    answered the owner either (lookup.owned_by)."""
    analytics, facts = (await jobs_analytics(client, [job_id], lookback, strict=True, owner=owner))[0]
    if facts.partial:
        raise PartialAnswer(job_id)
    if analytics is None:
        raise JobNotFound(job_id)
    if settled and not facts.settled:
        raise NotSettled(job_id)
    if facts.settled:
        cache.put(job_id, Entry(analytics, facts.owners, facts.fingerprint))
    return analytics


async def stored_entry(archive: ReportArchive, job_id: str) -> Entry | None:
    """The job's stored report as an entry (never cached here: the job server holds it), or None."""
    found = await archive.load(job_id)
    if found is None:
        return None
    owner, report = found
    analytics = from_plain(JobAnalytics, report)
    if analytics.status not in STATUSES:    # (an edited row: null or any text broke the schema's enum of statuses)
        analytics.status = "unknown"
    analytics.source = "stored"
    analytics.partial = False       # (never stored from a partial answer; a report from before the field lacks it)
    return Entry(analytics, frozenset({owner}), frozenset())


async def cached_job_analytics(client: PrometheusClient, cache: AnalyticsCache, job_id: str,
                               lookback: float, owner: str | None = None,
                               archive: ReportArchive | None = None) -> JobAnalytics:
    """jobs_analytics of one job through the cache (and the stored reports)."""
    return (await cached_jobs_analytics(client, cache, [job_id], lookback, owner, archive))[0]
