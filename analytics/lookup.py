"""Finding a job by id over the lookback window: its processes (rank 0's: a resumed job has one per run), its
state, when it ran and when it stopped (JobFacts). Queries come from queries.py only."""

from dataclasses import dataclass, field

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.analytics.results import process_of, query_parts_many, rows
from trainmetrics.contract import FINAL_STATES, RUN_LABEL, VANISHED, WAITING_STATES
from trainmetrics.edge import ApiError

# A process in one of these states has stopped for good: only a new process (a resume) changes the job.
STOPPED_STATES = (*FINAL_STATES, "paused")
# A job with one of these statuses is not running: it has an end.
ENDED = (*STOPPED_STATES, VANISHED)
# Labels of trainer_job_info that say where a process ran, not what the job is.
INTERNAL_LABELS = ("__name__", "instance", "job", "job_id", "rank", RUN_LABEL)


class JobNotFound(ApiError):
    """No series of this job id within the lookback window, or not the caller's job (404 either way)."""

    def __init__(self, job_id: str):
        super().__init__(404, "not_found", f"no training job {job_id!r} in Prometheus")
        self.job_id = job_id


@dataclass
class Process:
    """One process of a job (its rank 0) as Prometheus saw it."""

    key: str                            # which process it is: its address and its own id (results.process_of)
    start: float | None = None          # when it started training (None: it never did)
    end: float | None = None            # its end timestamp: a final state, or paused
    state: str | None = None
    error_type: str | None = None
    last_seen: float | None = None      # its heartbeat's last value
    live: bool = False                  # scraped now (or missed by a scrape or two: hold_missed_scrapes)
    checkpoints: float | None = None    # checkpoints counted, a resumed run's taken over from its checkpoint
    written: float | None = None        # checkpoints this process wrote itself
    process_start: float | None = None  # when the process itself started (before its imports)
    submitted: float | None = None      # when the job was submitted to the job server (its own series too)
    # The job server's: the job ran before and waits to resume, or, with an end, had waited so when the server
    # ended it (cancelled, or failed to start: an end of a wait, not the notice of a killed run's death).
    resuming: bool = False

    def stop(self, now: float) -> float | None:
        """When it stopped running: its end, now while it is scraped, else when it was last seen."""
        if self.end is not None:
            return self.end
        return now if self.live else self.last_seen

    @property
    def trainer(self) -> bool:
        """A trainer's process: it published its own life (the job server publishes only the state of a
        job that has no process: queued, paused, or ended by the server, with that end)."""
        return any(t is not None for t in (self.start, self.last_seen, self.process_start))

    @property
    def waiting(self) -> bool:
        """The job server's state of a job that waits now (queued, to resume too, or paused): it publishes one only
        while the job has no process, so it is the job's state now (job_status)."""
        return not self.trainer and self.live and self.state in WAITING_STATES

    @property
    def ended_by_server(self) -> bool:
        """The job server's end of a job no process ended (cancelled while queued or paused, or never started):
        newer than every process of the job, it speaks for the job. (Not while the server says the job waits: an
        end read then is an older one's, a killed run's notice before the job was resumed.)"""
        return not self.trainer and self.end is not None and not self.waiting

    @property
    def order(self) -> tuple[bool, float]:
        """Its place among the job's processes, oldest first: the job server's state of a waiting job first,
        then the trainer's processes by when each started (one that failed or was killed before its first
        step too: it is newer than the run it tried to resume), the server's end of the job last."""
        began = next((t for t in (self.process_start, self.start, self.end, self.last_seen) if t is not None), 0.0)
        return self.trainer or self.ended_by_server, began

    @property
    def resumed(self) -> bool:
        """It took its checkpoint count over from an earlier run: it counts more than it wrote."""
        return (self.checkpoints or 0) > (self.written or 0)


@dataclass(frozen=True)
class Timeline:
    """When a job ran: its runs (its processes' spans, merged where they overlap: ranks overlap, a resumed
    job's runs follow each other), from the first start to the last stop."""

    runs: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, spans: list[tuple[float, float]]) -> "Timeline":
        """The timeline of (start, stop) spans."""
        runs: list[tuple[float, float]] = []
        for start, stop in sorted(spans):
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(runs[-1][1], stop))
            else:
                runs.append((start, stop))
        return cls(tuple(runs))

    @property
    def total_seconds(self) -> float | None:
        """First start to last stop."""
        return self.runs[-1][1] - self.runs[0][0] if self.runs else None

    @property
    def training_seconds(self) -> float | None:
        """The runs' lengths added up."""
        return sum(stop - start for start, stop in self.runs) if self.runs else None

    def training_seconds_within(self, begin: float, end: float) -> float | None:
        """The runs' lengths within (begin, end] added up: each cut to it, as the fleet's goodput cuts its phases
        (goodput.fleet)."""
        return sum(max(0.0, min(stop, end) - max(start, begin)) for start, stop in self.runs) if self.runs else None

    @property
    def paused_seconds(self) -> float | None:
        """The gaps between the runs."""
        return self.total_seconds - self.training_seconds if self.runs else None


@dataclass
class JobFacts:
    """Where and when a job ran, found by id over the lookback window."""

    job_id: str
    info: dict
    status: str
    processes: list[Process]            # oldest first
    timeline: Timeline
    upload_seconds: float | None
    # The `owner` label of every process of the job: a job belongs to an owner only when all say so.
    owners: frozenset[str]
    # What the cheap lookup saw (lookup.fingerprint): a cached report holds while it stays the same.
    fingerprint: frozenset
    now: float
    # A node exporter attributes the job's processes now: its energy counts may still grow.
    attributed_now: bool = False
    # When each node exporter (instance) that attributes the job's processes now last showed its CPU time.
    attributing: dict[str, float] = field(default_factory=dict)
    # Some process of the job, of any rank, is scraped now (`processes` are rank 0's only): one of another rank
    # may still have its final scrape, with its last counts, to come.
    any_rank_live: bool = False
    # How far behind now the backend's answers may be (PrometheusClient.answer_delay).
    answer_delay: float = 0.0
    # The backend answered some request of the job's analytics with part of its data (job.jobs_analytics): not
    # to be kept as settled, however settled the job is.
    partial: bool = False

    @property
    def latest(self) -> Process | None:
        """The newest process: it speaks for the job (a resumed job's earlier one ended "paused" or failed)."""
        return self.processes[-1] if self.processes else None

    @property
    def started(self) -> list[Process]:
        """The processes that started training (a job server's queued or paused job has a state only)."""
        return [p for p in self.processes if p.start is not None]

    @property
    def start(self) -> float | None:
        """The first start."""
        starts = [p.start for p in self.started]
        return min(starts) if starts else None

    @property
    def began(self) -> float | None:
        """When the job first ran: its first start of training, else its first process's start (a run that failed or
        was killed in its init, a bad dataset's, ran all the same: its phase totals, the ledger's init, are its)."""
        if self.start is not None:
            return self.start
        spawned = [p.process_start for p in self.processes if p.trainer and p.process_start is not None]
        return min(spawned) if spawned else None

    @property
    def end(self) -> float | None:
        """The last stop of a job that stopped (final, paused or vanished); None while it runs."""
        if self.status not in ENDED or self.latest is None:
            return None
        killed = killed_run(self.processes)
        return (killed or self.latest).stop(self.now)

    @property
    def live(self) -> bool:
        """Some process is scraped now (the job server's state of a waiting job is none)."""
        return any(p.live for p in self.processes if p.trainer)

    @property
    def waiting(self) -> bool:
        """The job server says the job waits now (paused, queued to resume): waiting_entry."""
        return waiting_entry(self.processes) is not None

    @property
    def settled(self) -> bool:
        """Stopped, no longer scraped, no exporter attributes it any more (its energy counts are final), and
        every process that stopped with a state has its end timestamp in the store: only a new process (a
        resume) can change its analytics. A store that makes a new series searchable only seconds after its
        samples arrived (VictoriaMetrics), the end timestamp's among them, shows a final state before the end:
        read then, the end would be the last heartbeat's, and a report stored then would keep it. And its newest
        sample (its last heartbeat, or end) is the backend's answer delay behind now (a default VictoriaMetrics'
        30 s: read sooner, its range reads, the evaluations and the peak among them, missed the job's last
        seconds). Not while the job server says the job waits (paused, queued to resume): its ledger's paused time
        grows to now. Not while a process of any rank is scraped: rank 0 ended, another rank's last counts may not
        be in the store yet."""
        if self.end is None or self.live or self.any_rank_live or self.attributed_now or self.waiting or \
                any(p.trainer and p.state in STOPPED_STATES and p.end is None for p in self.processes):
            return False
        newest = max((t for p in self.processes for t in (p.last_seen, p.end) if t is not None), default=self.end)
        return self.now - newest >= self.answer_delay

    @property
    def error_type(self) -> str | None:
        """The exception class of the job's last run, when it failed (not once the job was resumed: queued)."""
        return self.latest.error_type if self.latest and self.status == "failed" else None

    @property
    def finals(self) -> list[float] | None:
        """Each trainer process's final instant (its stop plus the linger, never past now), newest first; None when
        a process's stop is unknown. Those that never started training too: a resumed run that failed its restore
        publishes the job's totals, its own init and restore in them, and read only at the runs' finals that had
        started, its last values lay past their windows when it failed 15 s after its predecessor's end (a busy
        host's imports): the goodput ledger left it out, and its restore with it."""
        stops = [p.stop(self.now) for p in self.processes if p.trainer]
        if None in stops:
            return None
        return sorted({min(self.now, stop + q.FINAL_SCRAPE_GRACE_SECONDS) for stop in stops}, reverse=True)

    @property
    def segments(self) -> list[tuple[float, float]] | None:
        """The job's runs; None when a process's stop is unknown."""
        return list(self.timeline.runs) if self.finals is not None else None


# A process missing from the last scrape is not dead yet: Prometheus marks a target's series stale at its first
# failed scrape (a busy trainer missing the 200 ms timeout is routine) and the next scrape brings them back. A
# process that has not stopped counts as live while its last heartbeat is this recent, and vanished after.
MISSED_SCRAPES_SECONDS = 5.0


def hold_missed_scrapes(processes, now: float) -> None:
    """Count a process that has not stopped, and was seen within MISSED_SCRAPES_SECONDS, as live (scraped now)."""
    for process in processes:
        if not process.live and process.state not in STOPPED_STATES and process.last_seen is not None and \
                now - process.last_seen <= MISSED_SCRAPES_SECONDS:
            process.live = True


def hold_while_a_rank_runs(latest: Process, any_rank_live: bool) -> None:
    """Count a job's newest process (its rank 0) as live while any process of the job is scraped: rank 0
    publishes the job's lifecycle, but the job runs while any of its ranks does (rank 0 frozen, or its node
    unreachable, with rank 1 still scraped, is not a vanished job)."""
    if any_rank_live and latest.trainer and latest.state not in STOPPED_STATES:
        latest.live = True


def speakers(processes: list[Process]) -> list[Process]:
    """Who speaks for a job's metadata, first to last: its trainer processes newest first, then the job server's
    entries (the job server publishes only a name and an owner). `processes` oldest first."""
    return sorted(reversed(processes), key=lambda p: not p.trainer)


def in_order(processes) -> list[Process]:
    """A job's processes, oldest first (Process.order)."""
    return sorted(processes, key=lambda p: p.order)


def killed_run(processes: list[Process]) -> Process | None:
    """The newest trainer process of a job the server ended after it stopped without a state of its own (killed:
    the server's end is its notice of the death, its state the job's, and the job ended with the process);
    None otherwise. `processes` oldest first."""
    trainers = [p for p in processes if p.trainer]
    # (Not an end the server gave the job after it waited to resume: cancelled, or failed to start, then. Taken for
    # the notice, it ended the job at the kill, and the wait to that end was in no phase.)
    if not trainers or not processes[-1].ended_by_server or processes[-1].resuming:
        return None
    newest = trainers[-1]
    return newest if newest.state not in STOPPED_STATES and not newest.live else None


def timeline_of(processes: list[Process], now: float) -> Timeline:
    """When a job ran: its processes' spans from their start of training to their stop; a process that stopped
    before its first step (a failed restore, a kill in its init) after the others ends the job there, and so
    does the job server's end of it (cancelled while paused), unless the process before that end was killed
    (the server's end is its notice of the death, not a pause: the run ends at its last scrape)."""
    spans = [(p.start, p.stop(now)) for p in processes if p.start is not None and p.stop(now) is not None]
    if spans:
        last = max(stop for _, stop in spans)
        killed = killed_run(processes) is not None
        spans += [(stop, stop) for p in processes if p.start is None and
                  (p.trainer or (p.ended_by_server and not killed))
                  for stop in [p.stop(now)] if stop is not None and stop > last]
    return Timeline.of(spans)


def status_of(latest: Process) -> str:
    """A job's status: its newest process's state, or vanished when that stopped without a final one (kill -9,
    a lost node) and is no longer scraped."""
    status = latest.state or "unknown"
    if status not in STOPPED_STATES and latest.trainer and not latest.live:
        return VANISHED
    return status


def waiting_entry(processes: list[Process]) -> Process | None:
    """The job server's state of a job it says waits now (paused, queued to resume), while no process of the job
    is scraped (a run started since is newer: the server's state goes at its next scrape); else None."""
    if any(p.live for p in processes if p.trainer):
        return None
    return next((p for p in processes if p.waiting), None)


def job_status(processes: list[Process]) -> str:
    """A job's status as the job API says it: the job server's while it says the job waits (waiting_entry; queued to
    resume after a failure: its failed run, the newest process, said `failed`), else its newest process's
    (status_of). `processes` oldest first."""
    waiting = waiting_entry(processes)
    return waiting.state if waiting is not None else status_of(processes[-1])


def fingerprint(found: dict[str, list[dict]]) -> frozenset:
    """What job_recent's answer says of a job's processes, leaving out the values that move while nothing
    changes (heartbeats, counters): equal as long as no process starts, stops or is seen anew. `spawns` is in it:
    a resume killed in its init between two uses (no start of training, no end, not scraped now) shows there only,
    and makes the job `vanished`."""
    return frozenset((part, tuple(sorted(labels.items())), None if part == "heartbeat" else value)
                     for part in ("end", "start", "starts", "spawns", "state", "heartbeat")
                     for labels, value in rows(found.get(part, [])))


class _Lookup:
    """One job's processes as the lookup queries find them (find_jobs runs each step for all jobs at once)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.processes: dict[str, Process] = {}
        self.info: list[dict] = []
        self.upload: list[float] = []
        self.ended: list[Process] = []
        self.fingerprint: frozenset = frozenset()
        self.attributed_now = False
        self.attributing: dict[str, float] = {}
        self.started_keys: set[str] = set()     # every process that started over the lookback (rank 0)
        self.spawned_keys: set[str] = set()     # every process that began over the lookback (rank 0)
        self.any_rank_live = False              # some process of the job, of any rank, is scraped now

    def process(self, labels: dict) -> Process:
        key = process_of(labels)
        return self.processes.setdefault(key, Process(key))

    def absorb(self, parts: dict[str, list[dict]], suffix: str = "", key: str | None = None,
               live: bool = False) -> None:
        """Take the lookup parts' answers (rank 0's: the job's lifecycle series come from it alone)."""
        def mine(name: str) -> list[tuple[dict, float | None]]:
            return [(labels, value) for labels, value in rows(parts.get(name + suffix, []))
                    if labels.get("rank", "0") == "0" and (key is None or process_of(labels) == key)]

        for labels, value in mine("end"):
            self.process(labels).end = value
        for labels, value in mine("start"):
            self.process(labels).start = value
        for labels, _ in mine("state"):
            self.process(labels).state = labels.get("state")
        for labels, _ in mine("failure"):
            self.process(labels).error_type = labels.get("error_type")
        for labels, value in mine("heartbeat"):
            self.process(labels).last_seen = value
        for labels, value in mine("counted"):
            self.process(labels).checkpoints = value
        for labels, value in mine("written"):
            self.process(labels).written = value
        for labels, value in mine("spawned"):
            self.process(labels).process_start = value
        for labels, value in mine("submission"):
            self.process(labels).submitted = value
        for labels, value in mine("resuming"):
            self.process(labels).resuming = bool(value)
        if live:    # answered at now: scraped now (a start at now, for trainers without a heartbeat; the job
            #         server's state of a job that waits now: Process.waiting)
            waits = [(labels, value) for labels, value in mine("state") if labels.get("state") in WAITING_STATES]
            for labels, _ in mine("heartbeat") + mine("start") + waits:
                self.process(labels).live = True
        self.info.extend(labels for labels, _ in mine("info"))
        self.upload.extend(value for _, value in mine("upload") if value is not None)

    def recent(self, found: dict[str, list[dict]]) -> dict[str, str] | None:
        """Take job_recent's answer; the job_ended parts for processes that ended longer ago than the
        staleness window, or are going stale (read just before their final scrape), None when there are none."""
        self.absorb(found, live=True)
        self.fingerprint = fingerprint(found)
        self.attributing = {labels.get("instance", ""): value for labels, value in rows(found.get("attributed", []))
                            if value is not None}
        self.attributed_now = bool(found.get("attributed"))
        self.any_rank_live = any(rows(found.get(part, [])) for part in ("heartbeat", "start"))
        self.started_keys = {process_of(labels) for labels, _ in rows(found.get("starts", []))
                             if labels.get("rank", "0") == "0"}
        self.spawned_keys = {process_of(labels) for labels, _ in rows(found.get("spawns", []))
                             if labels.get("rank", "0") == "0"}
        # A process with an end whose state is not read at now stopped, even if another of its series still
        # answers there: a store fed by remote write receives a scrape's stale markers in several requests and
        # shows each as it arrives (VictoriaMetrics: its state series stale while its heartbeat answered, the job
        # read `unknown`). Its state is the last one before its final scrape; it stays live (not settled).
        self.ended = [p for p in self.processes.values()
                      if p.end is not None and (not p.live or p.state is None)][-8:]
        return q.job_ended(self.job_id, [p.end for p in self.ended]) if self.ended else None

    def older(self, found: dict[str, list[dict]]) -> None:
        """Take job_ended's answer."""
        for index, proc in enumerate(self.ended):
            self.absorb(found, f"_{index}", proc.key)

    def incomplete(self) -> bool:
        """Nothing found, a process started (or began: one killed in its init) that was not found, or the
        earliest process found resumed a run that was not: a process that stopped without an end (killed) and
        is no longer scraped, which only the full lookup finds."""
        started = [p for p in self.processes.values() if p.start is not None]
        missing = self.started_keys - {key for key, p in self.processes.items() if p.start is not None}
        missing |= self.spawned_keys - set(self.processes)
        return not self.processes or bool(missing) or (bool(started) and min(started, key=lambda p: p.start).resumed)

    def facts(self, now: float) -> JobFacts:
        hold_missed_scrapes(self.processes.values(), now)
        processes = in_order(self.processes.values())
        if not any(p.start is not None or p.state is not None for p in processes):
            raise JobNotFound(self.job_id)
        latest = processes[-1]
        hold_while_a_rank_runs(latest, self.any_rank_live)
        # Its newest trainer process's metadata, else the job server's (a job that never ran: its name and owner
        # only): as the job list reads it, not whichever row came first.
        by_process = {process_of(labels): labels for labels in self.info}
        info = next((by_process[p.key] for p in speakers(processes) if p.key in by_process),
                    self.info[0] if self.info else {})
        return JobFacts(job_id=self.job_id, info={k: v for k, v in info.items() if k not in INTERNAL_LABELS},
                        status=job_status(processes), processes=processes, timeline=timeline_of(processes, now),
                        upload_seconds=max(self.upload) if self.upload else None,
                        owners=frozenset(labels.get("owner", "") for labels in self.info),
                        fingerprint=self.fingerprint, now=now, attributed_now=self.attributed_now,
                        attributing=self.attributing, any_rank_live=self.any_rank_live)


def owned_by(owners: frozenset[str], owner: str | None) -> bool:
    """Whether a job whose processes name `owners` is the caller's (every job without an owner scope): every
    process of it says that owner."""
    return owner is None or owners == {owner}


async def find_jobs(client: PrometheusClient, job_ids: list[str], lookback: float, now: float,
                    strict: bool = True) -> list[JobFacts | None]:
    """Each job's processes, state and times, every step one request for all the jobs. When Prometheus holds
    nothing of a job: JobNotFound for the first in order, or None in its place when not strict."""
    lookups = [_Lookup(job_id) for job_id in job_ids]
    found = await query_parts_many(client, [q.job_recent(job_id, lookback, now) for job_id in job_ids], now)
    ended = [(lookup, lookup.recent(parts)) for lookup, parts in zip(lookups, found)]
    ended = [(lookup, parts) for lookup, parts in ended if parts]
    if ended:
        for (lookup, _), parts in zip(ended, await query_parts_many(client, [p for _, p in ended], now)):
            lookup.older(parts)
    incomplete = [lookup for lookup in lookups if lookup.incomplete()]
    if incomplete:
        full = await query_parts_many(client, [q.job_lookup_full(lookup.job_id, lookback, now)
                                               for lookup in incomplete], now)
        for lookup, parts in zip(incomplete, full):
            lookup.absorb(parts)
    if strict:
        found_facts = [lookup.facts(now) for lookup in lookups]
    else:
        found_facts = []
        for lookup in lookups:
            try:
                found_facts.append(lookup.facts(now))
            except JobNotFound:
                found_facts.append(None)
    # A job settled by what Prometheus holds is settled only once its end is the backend's answer delay behind
    # now (asked only then: one request for the service's life).
    if any(facts is not None and facts.settled for facts in found_facts):
        answer_delay = await client.answer_delay()
        for facts in found_facts:
            if facts is not None:
                facts.answer_delay = answer_delay
    return found_facts
