"""The goodput ledger of one job: where its wall-clock time went, from submission to its end.

Every process of a job counts its own life per phase (trainer_phase_seconds_total: init, restore, data_wait,
compute, optimizer, collective, eval, checkpoint; they add up to the process's age) and carries the job's
totals in its checkpoints, so the newest process's totals are the job's up to that process, less what was
thrown away. The ledger adds what no process sees:

- queued: the submission (trainer_job_submitted_timestamp_seconds) to the first process's start;
- paused: each gap between a process's end (a pause, a failure, a kill) and the next one's start, and, while
  the job server says the job waits (paused, queued to resume), from the last end to now;
- lost: what a process trained after its last checkpoint and a successor threw away by resuming from that
  checkpoint (or, with none, by starting afresh: then all it trained, its init and restore staying theirs).
  A process's carried totals are its totals less its own age (its totals only grow with its life), so what
  a run lost is its last totals less what its successor carried in. A checkpoint carries the
  totals of its snapshot, taken before its write: the write of the checkpoint a successor resumed from
  (trainer_checkpointed_seconds: the totals when that write ended) threw nothing away and counts as
  checkpoint time; so does, for a run that stopped on request (paused, cancelled) and wrote its checkpoint
  at the stop, everything after the snapshot (the write, the exit).

The step (compute + optimizer + collective) over the wall clock is the goodput ratio; the rest is badput by
cause. The parts add up to the wall clock by construction; `unaccounted_seconds` says how far they miss it
(the clocks of separate processes, a scrape interval at a crash). A run lives in the ledger to its successor's start
(a killed run scraped past it loses nothing after it), and a wall clock shorter than the phases by more than a second
(a host clock set back during a run) is taken to be their sum, with unavailable_reason saying so.
"""

from dataclasses import dataclass

from trainmetrics.analytics import shapes
from trainmetrics.analytics.lookup import JobFacts, Process, killed_run
from trainmetrics.analytics.results import process_of, ratio, rounded, rows
from trainmetrics.contract import FINAL_STATES, STEP_PHASES, STOP_SIGNALS

# The ledger's phases, in a job's order; `step` is goodput, the others badput.
LEDGER_PHASES = ("queued", "init", "restore", "step", "data_wait", "eval", "checkpoint", "paused", "lost")
# A run's time before its first step: what a run thrown away whole spent on them stays theirs, not lost.
SETUP_PHASES = ("init", "restore")
NO_PHASES = "the job's trainer published no phase totals (trainer_phase_seconds_total): a trainer before the ledger"
EARLIER_RUNS_GONE = ("the job's earliest run Prometheus still holds resumed from a checkpoint: the runs before it "
                     "are gone (retention, a wiped store), so their queued, paused and lost time is in "
                     "unaccounted_seconds")
EARLIER_RUNS_GONE_UNSUBMITTED = ("the job's earliest run Prometheus still holds resumed from a checkpoint: the runs "
                                 "before it are gone (retention, a wiped store), and with no submission time the wall "
                                 "clock starts the time that run carried in before it (the least they took): the "
                                 "goodput ratio is an upper bound")
NO_SUBMISSION = ("no submission time (a job started without the job server): queued is 0 and the wall clock starts "
                 "at the first process")
CLOCK_SET_BACK = ("the phases (the trainers' monotonic counters) add up to more than the span of the job's timestamps "
                  "(the hosts' clocks): a host clock was set back during a run, so the wall clock is the phases' sum "
                  "and queued and paused, read from those timestamps, may be short")
# Phases past the timestamps' span by more than this are a clock set back, not the noise of two processes' clocks.
CLOCK_SET_BACK_TOLERANCE_SECONDS = 1.0
# A run that started afresh carries nothing; its totals and its life are read from two clocks a scrape apart.
CARRIED_TOLERANCE_SECONDS = 1.0


@dataclass(frozen=True)
class _Run:
    """One process of the job (rank 0) as the ledger needs it."""

    started: float            # the process's start (before its imports)
    as_of: float              # when its totals were last read: its end, else its last scrape
    totals: dict[str, float]  # seconds per accounted phase, the job's (carried plus its own)
    stopped: bool             # it stopped on request, after a checkpoint (paused, cancelled)
    checkpointed: float | None = None   # its totals in all when its last checkpoint write ended
    trained: bool = True      # it reached its training loop (a run stopped in its init or restore did not)
    training_start: float | None = None   # when it did (its init and restore before it)
    wrote: float | None = None            # the checkpoints it wrote itself (None: not known)
    counted: float | None = None          # the checkpoints of its line at its end: carried in and its own

    @property
    def life(self) -> float:
        return self.as_of - self.started

    @property
    def total(self) -> float:
        return sum(self.totals.values())

    @property
    def carried(self) -> float:
        """The seconds it took over from the checkpoint it resumed from."""
        return self.total - self.life

    @property
    def resumed(self) -> bool:
        """It took a checkpoint over: it counts more checkpoints than it wrote; without those counts, it carried
        seconds in (its totals and its life are read from two clocks a scrape apart: a fresh one carries
        microseconds, and a run resumed from a checkpoint taken within a second of its job's start looks fresh)."""
        if self.counted is not None and self.wrote is not None:
            return self.counted > self.wrote
        return self.carried > CARRIED_TOLERANCE_SECONDS


def ledger(facts: JobFacts, found: dict[str, list[dict]]) -> shapes.Goodput:
    """The job's goodput block from its facts and its processes' last values (queries.job_totals)."""
    def rank0(name: str) -> list[tuple[dict, float]]:
        return [(labels, value) for labels, value in rows(found.get(name, []))
                if value is not None and labels.get("rank", "0") == "0"]

    phases: dict[str, dict[str, float]] = {}
    for labels, value in rank0("phase_seconds"):
        phases.setdefault(process_of(labels), {})[labels.get("phase", "")] = value
    started_at = {process_of(labels): value for labels, value in rank0("process_start")}
    checkpointed = {process_of(labels): value for labels, value in rank0("checkpointed")}
    submitted = max((value for _, value in rank0("submitted")), default=None)
    runs = []
    # Resumed runs that never read the job's totals from their checkpoint (their restore failed before it, or is
    # still loading) publish none: their life is their setup, init. Left out, it was in no phase: paused before a
    # later run, past the wall clock's end after the last (a job whose resume failed ended at its pause).
    unread: list[tuple[float, float]] = []
    for process in facts.processes:     # a run that failed its restore too: its init and restore are the job's
        as_of = process.end if process.end is not None else process.last_seen
        if process.key not in started_at or as_of is None:
            continue
        if process.key not in phases:
            unread.append((started_at[process.key], as_of))
        else:
            runs.append(_Run(started_at[process.key], as_of, phases[process.key],
                             stopped=process.state in STOP_SIGNALS,
                             checkpointed=checkpointed.get(process.key), trained=process.start is not None,
                             training_start=process.start, wrote=process.written, counted=process.checkpoints))
    # The job server's end of the job (cancelled while queued or paused): the ledger runs to it.
    server_end = facts.latest.end if facts.latest is not None and facts.latest.ended_by_server else None
    if not runs:
        submitted = max((p.submitted for p in facts.processes if p.submitted is not None), default=submitted)
        # Never ran: queued to the job server's end of it (cancelled while queued), or to now while the server says it
        # waits (its newest process: no trainer's came after it). (It had no ledger, "a trainer before the ledger".)
        until = facts.now if server_end is None and facts.latest is not None and facts.latest.waiting else server_end
        if until is not None and submitted is not None and submitted <= until:
            return _queued_only(until - submitted)
        return shapes.Goodput(wall_clock_seconds=None, goodput_ratio=None, seconds={}, badput_percent={},
                              step_seconds_by_part={}, unaccounted_seconds=None, unavailable_reason=NO_PHASES)
    runs.sort(key=lambda run: run.started)
    final = runs[-1].totals
    lost = checkpoint_writes = 0.0
    thrown_setup = dict.fromkeys(SETUP_PHASES, 0.0)
    for run, after in zip(runs, runs[1:]):
        # A run still alive (or scraped) after its successor started (a hung run killed late, two hosts' clocks):
        # the wall clock from that start is the successor's, whose phases count it; counted as lost too, those
        # seconds were in the ledger twice (the phases past the wall clock).
        overlap = max(0.0, run.as_of - after.started)
        after_snapshot = max(0.0, run.total - after.carried - overlap)
        if not after.resumed:                      # started afresh: the whole run was thrown away...
            setup = {name: run.totals.get(name, 0.0) for name in SETUP_PHASES}
            for name, value in setup.items():      # ...but its setup was setup (a run paused in its init)
                thrown_setup[name] += value
            lost += max(0.0, after_snapshot - sum(setup.values()))
        elif not run.trained:      # stopped or killed in its init or restore: no step, nothing trained to lose
            thrown_setup["init"] += after_snapshot
        elif run.resumed and run.wrote == 0:
            # Resumed, and gone before it wrote a checkpoint of its own (killed, failed, or paused on a loss spike
            # again: the same batch, the same weights): its successor resumed from the checkpoint it did, so all
            # it trained was thrown away, its time up to its training start (init, restore) staying setup.
            setup = min(after_snapshot, max(0.0, run.training_start - run.started))
            thrown_setup["init"] += setup
            lost += after_snapshot - setup
        elif run.stopped and run.checkpointed is None:     # resumed from the checkpoint written at the stop
            checkpoint_writes += after_snapshot
        else:   # a failure or a kill, or a stop whose last checkpoint write is known (a loss spike's pause writes
            #     none at its stop): that write is checkpoint time, what followed it lost. Unless its successor
            #     resumed from an older checkpoint (the newest did not load: it carried in fewer): then what
            #     followed that one's snapshot is lost, its write included (its time not known: lost is over by
            #     one write at most), where the newest's write counted the steps between them as checkpoint time.
            older = None not in (run.counted, after.counted, after.wrote) and after.counted - after.wrote < run.counted
            written = 0.0 if older else min(after_snapshot,
                                            max(0.0, (run.checkpointed or after.carried) - after.carried))
            checkpoint_writes += written
            lost += after_snapshot - written
    unread = [(started, as_of) for started, as_of in unread if started > runs[0].started]
    spans = sorted([(run.started, _lived_to(run, after)) for run, after in zip(runs, [*runs[1:], None])] + unread)
    paused = sum(max(0.0, after[0] - before[1]) for before, after in zip(spans, spans[1:]))
    end = spans[-1][1]
    # (Not after a run that was killed: the server's end is its notice of the death; the job ended with the run.)
    if server_end is not None and server_end > end and killed_run(facts.processes) is None:
        paused += server_end - end          # paused (or queued to resume) until it was cancelled
        end = server_end
    elif server_end is None and facts.now > end and facts.waiting:
        paused += facts.now - end           # paused (or queued to resume) now, as the fleet counts it: to now
        end = facts.now
    # The first run Prometheus holds took time over from a checkpoint: earlier runs are gone from it (retention,
    # a wiped store). Their queued, paused and lost time is not known: left unaccounted, not called queued.
    earlier_runs_gone = runs[0].resumed
    began = submitted if submitted is not None and submitted <= runs[0].started else runs[0].started
    if earlier_runs_gone and submitted is None:
        # No submission to start from, and the first process is gone: the job began at least the time its held run
        # carried in before that run (from the held run's start, its carried step time made goodput over 1).
        began = runs[0].started - max(0.0, runs[0].carried)
    wall = end - began
    step_parts = {part: final.get(part, 0.0) for part in STEP_PHASES}
    seconds = {"queued": 0.0 if earlier_runs_gone else runs[0].started - began,
               "init": final.get("init", 0.0) + thrown_setup["init"] + sum(e - s for s, e in unread),
               "restore": final.get("restore", 0.0) + thrown_setup["restore"], "step": sum(step_parts.values()),
               "data_wait": final.get("data_wait", 0.0), "eval": final.get("eval", 0.0),
               "checkpoint": final.get("checkpoint", 0.0) + checkpoint_writes, "paused": paused, "lost": lost}
    # lost to the millisecond: a difference of large sums, as unaccounted_seconds below; its share from the
    # same figure (0.3 ms of clock noise between two processes was 0.0 s lost but 0.0012 % lost).
    seconds["lost"] = round(seconds["lost"], 3)
    # The phases are the trainers' monotonic counters, the wall clock the span of the hosts' timestamps: a host
    # clock set back during a run shortens that span and not the phases (a goodput ratio over 1; set back further
    # than the run lived, a negative wall clock). The phases are what happened: the wall clock is their sum.
    set_back = sum(seconds.values()) - wall > CLOCK_SET_BACK_TOLERANCE_SECONDS
    if set_back:
        wall = sum(seconds.values())
    return shapes.Goodput(
        wall_clock_seconds=rounded(wall), goodput_ratio=rounded(ratio(seconds["step"], wall)),
        seconds={name: seconds[name] if name == "lost" else rounded(seconds[name]) for name in LEDGER_PHASES},
        badput_percent={name: rounded(100.0 * ratio(seconds[name], wall)) if wall > 0 else None
                        for name in LEDGER_PHASES if name != "step"},
        step_seconds_by_part={part: rounded(value) for part, value in step_parts.items()},
        # To the millisecond: a difference of large sums, whose last digits a backend storing fewer (such as
        # VictoriaMetrics) would change.
        unaccounted_seconds=round(wall - sum(seconds.values()), 3),
        unavailable_reason=(EARLIER_RUNS_GONE if submitted is not None else EARLIER_RUNS_GONE_UNSUBMITTED)
        if earlier_runs_gone else CLOCK_SET_BACK if set_back else None if submitted is not None else NO_SUBMISSION)


def _lived_to(run: _Run, after: _Run | None) -> float:
    """When the run stopped, as far as the ledger can tell: its end, else its last scrape; or later, up to its
    successor's start, where the successor carried in more of the run's life than that (the checkpoint it resumed
    from was taken after the run's last scrape: Prometheus down across the run's end, a kill within a scrape
    interval of a checkpoint). Those seconds are in the successor's totals: counted as paused too, the phases went
    past the wall clock, and the ledger read as a host clock set back."""
    if after is None:
        return run.as_of
    shown = run.started + (after.carried - run.carried)     # the snapshot, on the run's own clock
    return max(run.as_of, min(shown, after.started))


def complete(ledger: shapes.Goodput) -> bool:
    """The ledger's goodput ratio is the job's: not an upper bound (earlier runs gone, no submission time)."""
    return ledger.unavailable_reason != EARLIER_RUNS_GONE_UNSUBMITTED


def _queued_only(wall: float) -> shapes.Goodput:
    """The ledger of a job that never ran (cancelled while queued, or queued still): all of it queued."""
    seconds = {name: wall if name == "queued" else 0.0 for name in LEDGER_PHASES}
    return shapes.Goodput(
        wall_clock_seconds=rounded(wall), goodput_ratio=0.0 if wall > 0 else None,
        seconds={name: rounded(value) for name, value in seconds.items()},
        badput_percent={name: rounded(100.0 * ratio(seconds[name], wall)) if wall > 0 else None
                        for name in LEDGER_PHASES if name != "step"},
        step_seconds_by_part=dict.fromkeys(STEP_PHASES, 0.0), unaccounted_seconds=0.0, unavailable_reason=None)


# The fleet's phases over a range: the ledger's, less lost (a per-job figure: it needs each job's runs).
FLEET_PHASES = tuple(name for name in LEDGER_PHASES if name != "lost")


def fleet(found: dict[str, list[dict]], processes: dict[tuple[str, str], Process], job_ids: set[str],
          range_start: float, now: float) -> shapes.FleetGoodput:
    """The fleet's goodput over (range_start, now] for the jobs in job_ids: queries.fleet_goodput's answer and
    the fleet's processes (their stops). Phases grow from each process's first scrape; queued is each job's
    submission to its first process's start (or to now, still queued; or to its cancel), paused each gap from a
    process's stop to the next one's start (or to now, paused or queued to resume; or to its cancel), and a job's
    wait before its first run in the range when it ran before the range; all cut to the range."""
    def within(begin: float, end: float) -> float:
        return max(0.0, min(end, now) - max(begin, range_start))

    seconds = dict.fromkeys(FLEET_PHASES, 0.0)
    for labels, value in rows(found.get("phases", [])):
        if labels.get("job_id") in job_ids and value is not None:
            phase = labels.get("phase", "")
            name = "step" if phase in STEP_PHASES else phase
            if name in seconds:
                seconds[name] += value
    submitted = {labels.get("job_id"): value for labels, value in rows(found.get("submitted", [])) if value}
    starts: dict[str, list[tuple[float, str]]] = {}
    for labels, value in rows(found.get("process_start", [])):
        if labels.get("job_id") in job_ids and value is not None:
            starts.setdefault(labels["job_id"], []).append((value, process_of(labels)))
    # A job that ran before the range: its wait before its first run in the range (or all of it, none there) was
    # a pause. Its first run there resumed one from before (counts more checkpoints than it wrote), or the job was
    # paused or waiting to resume at the range's start (a run after a pause before any checkpoint starts afresh:
    # its wait was counted as queued), or, with no run in the range, it was paused in it (not so with one: a job
    # queued to its first run there and paused after it). (Counted as queued, a job paused a day showed a day's
    # queue.)
    written = {(labels.get("job_id"), process_of(labels)): value or 0.0
               for labels, value in rows(found.get("written", []))}
    resumed = {key for labels, value in rows(found.get("counted", []))
               for key in [(labels.get("job_id"), process_of(labels))] if (value or 0.0) > written.get(key, 0.0)}
    paused_in_range = {labels.get("job_id") for labels, _ in rows(found.get("paused", []))}
    paused_at_start = {labels.get("job_id") for labels, _ in rows(found.get("paused_at_start", []))}
    server_ends: dict[str, float] = {}      # jobs the server ended (cancelled while waiting): queued or paused to it
    waiting: set[str] = set()               # jobs the job server says wait now (after a run: to resume)
    waited: set[str] = set()                # jobs the server ended after they waited to resume (not a kill's notice)
    for (job_id, _), proc in processes.items():
        # With a final state: an end followed by `queued` or `paused` was the notice of a killed run's death, and the
        # job resumed since (taken for the job's end, it cut off the job's wait to resume, or its next pause).
        if proc.ended_by_server and proc.state in FINAL_STATES:
            server_ends[job_id] = max(proc.end, server_ends.get(job_id, proc.end))
            if proc.resuming:
                waited.add(job_id)
        elif proc.waiting:
            waiting.add(job_id)
    for job_id in job_ids:
        runs = sorted(starts.get(job_id, []))
        waited_until = server_ends.get(job_id, now)
        ran_before = ((job_id, runs[0][1]) in resumed or job_id in paused_at_start) if runs else \
            job_id in paused_in_range
        # (A job run without the job server has no submission; one that ran before the range waited in it all the
        # same: dropped with the submission, its pause before a run resumed by hand was in no phase.)
        waited_since = submitted.get(job_id, range_start if ran_before and runs else None)
        if waited_since is not None:
            seconds["paused" if ran_before else "queued"] += within(waited_since, runs[0][0] if runs else waited_until)
        stops = [processes.get((job_id, key)) for _, key in runs]
        for stopped, (following, _) in zip(stops, runs[1:]):
            stop = stopped.stop(now) if stopped is not None else None
            if stop is not None:
                seconds["paused"] += within(stop, following)
        # After its last run the job waited, paused, to now or to the server's end of it, as the next run's start
        # would close that gap: that run paused, or it failed and the job was queued to resume (the job server says
        # it waits now; or, after a run that failed with its own state, the server ended the job since: cancelled
        # in that wait; or the server says it ended the job after such a wait, the last run killed too). (Counted for
        # paused runs only, a failed job's wait to resume was nothing until it ran.) Not after a kill the server
        # ended the job for: its end is the notice of the death, the job ended with the run.
        last = stops[-1] if stops else None
        stop = last.stop(now) if last is not None else None
        if stop is not None and (job_id in waiting or job_id in waited or last.end is not None and (
                last.state == "paused" or job_id in server_ends)):
            seconds["paused"] += within(stop, waited_until)
    total = sum(seconds.values())
    return shapes.FleetGoodput(
        goodput_ratio=rounded(ratio(seconds["step"], total)),
        seconds={name: rounded(value) for name, value in seconds.items()},
        badput_percent={name: rounded(100.0 * ratio(value, total)) if total > 0 else None
                        for name, value in seconds.items() if name != "step"})
