"""Stored reports: once a job has ended (completed, failed or cancelled) and settled in Prometheus, the job
server asks the analytics for its report and keeps it in the job's row, so its analytics outlive Prometheus'
retention (trainmetrics.reports). A job whose report cannot be computed yet (Prometheus down) is asked for
again later, up to an hour of the server's up time after its end (the times it was down do not
count); a resumed job's stored report is dropped (its new runs change it).
"""

import json
import logging
import math
import sqlite3
import time

from trainmetrics.contract import FINAL_STATES
from trainmetrics.reports import NotSettled

log = logging.getLogger("trainmetrics.server")

# After a job's end its final scrape is in (the process lingered for it before exiting); a few seconds more
# let its series go stale. The report is stored once the analytics call the job settled: no process of it and
# no node exporter attributing it scraped any more (the exporter's last energy counts are in), and they say the
# job's end as the job API does (an end the server publishes is in); until then it is asked again every
# SETTLE_RETRY_SECONDS.
SETTLE_SECONDS = 5.0
SETTLE_RETRY_SECONDS = 2.0
# A job still not settled this long after the first answer that said so (an exporter that goes on attributing
# it: a process of its tree that outlived it) is stored as it stands: a report a little short beats none.
UNSETTLED_LIMIT_SECONDS = 120.0
# Never stored, even past the limit: the job ended, and a report that says it goes on would say so for good. (A
# job that ended while Prometheus was down: restarted, Prometheus shows the dead process's last samples as
# current for its lookback, 5 minutes, as it writes no staleness markers for a target that died meanwhile.)
STILL_GOING = ("queued", "running")
# A job Prometheus never held (no Prometheus, a target that was never scraped) is given up on after this long
# of the server's up time since its end (UpTime).
GIVE_UP_SECONDS = 3600.0
# How often a running server notes in its store that it is up; its next start takes its down time from the last
# note (a little more than it was: the hour is that much longer), and notes it in the store for the starts after.
ALIVE_NOTE_SECONDS = 30.0
RETRY_SECONDS = 30.0
# Reports computed per round at most, so a backlog after a restart does not hold up a round for long.
PER_ROUND = 4


class UpTime:
    """The server's stops within the hour its reports are asked for, from its notes that it was up on the same store,
    so that the hour a job's report is asked for counts the server's up time: a server down for an hour just after a
    job's end (its report not stored yet: Prometheus down, or the server stopped within seconds of it) gave the
    job up at its start, and the job's analytics were lost with Prometheus' retention. Every stop counts, not only
    the last: a server stopped twice in a job's hour gave it up at its second start."""

    def __init__(self, store):
        self._store, self._noted, self._failing = store, None, False
        self.began, now = time.monotonic(), time.time()       # this start
        last = store.last_alive()
        # (Not a number: a hand-edited row, SQLite keeps text in a REAL column. No server's note then.)
        self.downtime = max(0.0, now - last) if _number(last) else 0.0     # this stop's
        self._down = [(last, now)] if self.downtime > 0 else []
        # The earlier stops, before this one (a row of this stop's, from a start that failed, is this one).
        before = last if self.downtime > 0 else now
        self._down += [(began, ended) for began, ended in _read(store.downtimes)
                       if _number(began) and _number(ended) and began < ended < before]
        if self.downtime > 0:
            try:        # (those before the hour no job still asked for can reach are forgotten)
                store.note_downtime(last, now, self.back(now, GIVE_UP_SECONDS))
            except sqlite3.Error as error:
                log.warning("cannot note that the server was down (%s): a restart within the hour its reports "
                            "are asked for shortens it by this down time", error)

    def note(self) -> None:
        """Note that the server is up (at most every ALIVE_NOTE_SECONDS); on the state thread. A note that fails (a
        full disk, the database locked) waits as long as a note that did, and is said once until one is written
        again: it raised, so it was tried again at every tick, cut each short (no jobs published, /healthz
        `not_supervising`) and logged a traceback each time. The next start then takes its down time from an
        older note: the hour its reports are asked for is that much longer, no more."""
        clock = time.monotonic()
        if self._noted is None or clock - self._noted >= ALIVE_NOTE_SECONDS:
            self._noted = clock
            try:
                self._store.note_alive(time.time())
            except sqlite3.Error as error:
                if not self._failing:
                    log.warning("cannot note that the server is up (%s): tried again every %g s", error,
                                ALIVE_NOTE_SECONDS)
                self._failing = True
                return
            if self._failing:
                log.info("the note that the server is up is written again")
            self._failing = False

    def asked_after(self, now: float) -> float:
        """The end after which a job's report is still asked for."""
        return self.back(now, GIVE_UP_SECONDS)

    def back(self, now: float, seconds: float) -> float:
        """The end `seconds` of the server's up time before `now`: further back by each stop within them (a run that
        ended while the server was down has its result's end, not the restart's)."""
        # The stretches of up time, the newest first: this start's, then each between two stops.
        ups = [time.monotonic() - self.began] + [max(0.0, later[0] - earlier[1])
                                                  for later, earlier in zip(self._down, self._down[1:])]
        at, left = now, seconds
        for up, (began, ended) in zip(ups, self._down):
            if up >= left:
                break
            at, left = at - up - (ended - began), left - up
        return at - left


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read(read):
    """A list from the store, or none where it cannot be read (the server starts all the same)."""
    try:
        return read()
    except sqlite3.Error as error:
        log.warning("cannot read the server's earlier stops (%s): only the last one counts", error)
        return []


def readable_report(job_id: str, text: str) -> dict | None:
    """The stored report as served: a JSON object naming the job, else None (the row is text anyone with the
    database may have edited)."""
    try:
        report = json.loads(text)
    except (ValueError, TypeError, RecursionError):     # nested past the parser's depth: no report of ours is
        return None
    return report if isinstance(report, dict) and report.get("job_id") == job_id else None


class ReportKeeper:
    """Computes and stores the reports of jobs that ended; run one round at a time from the server's loop."""

    def __init__(self, archive, call, store, uptime: UpTime, owners: bool = False):
        self.archive, self.call, self.store, self.uptime = archive, call, store, uptime
        # With owners (--tokens), a report is computed in its job's owner's scope, as the owner reads the job.
        self.owners = owners
        # Keyed by (job id, end): a job resumed and ended again between two rounds (cancelled while queued, during a
        # round that waited on a slow Prometheus) is another end, whose wait starts afresh.
        self._retry_at: dict[tuple[str, float], float] = {}
        self._unsettled_since: dict[tuple[str, float], float] = {}

    async def load(self, job_id: str) -> tuple[str, dict] | None:
        """(owner, report) of a job with a stored report."""
        found = await self.call(self.store.get_report, job_id)
        if found is None:
            return None
        owner, text = found
        report = readable_report(job_id, text)
        if report is None:
            log.warning("job %s: its stored report is not this job's report (a JSON object naming it); ignored",
                        job_id)
            return None
        return owner, report

    async def round(self) -> None:
        """Store the reports of jobs that ended lately and have none."""
        if self.archive is None or self.archive.compute is None:
            return
        now, clock = time.time(), time.monotonic()
        ended = {job_id: (end, state, owner) for job_id, end, state, owner in
                 await self.call(self.store.jobs_to_report, FINAL_STATES, self.uptime.asked_after(now),
                                 now - SETTLE_SECONDS)}
        # Only ends still waiting for their report keep their clocks: a resumed job (or one given up, or reported)
        # starts afresh at its next end, and the retry times of every job that ever failed a try no longer pile up.
        waiting = {(job_id, end) for job_id, (end, _, _) in ended.items()}
        for clocks in (self._unsettled_since, self._retry_at):
            for key in set(clocks) - waiting:
                del clocks[key]
        for job_id in [job_id for job_id, (end, _, _) in ended.items()
                       if self._retry_at.get((job_id, end), 0.0) <= clock][:PER_ROUND]:
            end, state, owner = ended[job_id]
            key = (job_id, end)
            # The wait counts from the first answer that said "not settled" (not from a try Prometheus failed), of
            # those in a row since the last failed try.
            waited = clock - self._unsettled_since.get(key, clock)
            try:
                found = await self.archive.compute(job_id, settled=waited < UNSETTLED_LIMIT_SECONDS,
                                                   owner=owner if self.owners else None)
                if found.get("status") in STILL_GOING:
                    self._unsettled_since.setdefault(key, clock)
                    self._retry_at[key] = clock + RETRY_SECONDS
                    continue
                if found.get("status") != state and waited < UNSETTLED_LIMIT_SECONDS:
                    # Not the end the job API says yet: one its process did not publish (killed, a cancel that
                    # overruled its `paused`) is the server's, in Prometheus from the server's next scrape, which
                    # can come after the job settled (a server scraped less often than every 5 s): the report was
                    # stored `vanished` (`paused`) for good.
                    raise NotSettled(job_id)
                report = json.dumps(found, allow_nan=False)
            except NotSettled:
                self._unsettled_since.setdefault(key, clock)
                self._retry_at[key] = clock + SETTLE_RETRY_SECONDS
                continue
            except Exception as error:
                self._retry_at[key] = clock + RETRY_SECONDS
                # The wait counts "not settled" answers in a row: run on while Prometheus was down, a job not settled
                # before (an exporter's last energy counts not in) was stored as it stood at the first answer after.
                self._unsettled_since.pop(key, None)
                log.info("job %s: its report cannot be stored yet: %s", job_id, getattr(error, "message", error))
                continue
            self._retry_at.pop(key, None)
            self._unsettled_since.pop(key, None)
            if await self.call(self.store.keep_report, job_id, report, end):
                log.info("job %s: its analytics report is stored", job_id)
