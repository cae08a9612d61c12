"""Where a job process is now, and where its time went: the phase clock behind `trainer_phase{phase}`,
`trainer_phase_since_timestamp_seconds`, `trainer_last_step_timestamp_seconds` and
`trainer_phase_seconds_total{phase}`.

The loop pays for a phase change with one attribute store, `mark`: the phase, the perf_counter it began, and
the data wait and finished phases' seconds summed as it began, in one tuple, so that a scrape never sees a phase's
seconds summed while the phase has not yet been left (it counted them twice, and kept them: each total only
grows). Every sum is made when something collects. Every second of the process falls in exactly one accounted phase:
`init` (process start to training start, the wait for a first scrape included; for a process's later job,
from its creation), `restore` (loading a checkpoint), `data_wait`, `optimizer` and `collective` (where the
loop marks them), `eval`, `checkpoint`, and `compute`, the rest of the loop: `compute` is never summed, it is
the loop's time minus the others, so the phases add up to the process's life by construction, up to its run's end
(finish(), pause(): the clock stops there; a checkpoint written after it is counted, its time in no phase). A phase in
progress counts as far as it has gone, and each published total only grows (a scrape between two of the
loop's stores cannot make one dip).
"""

import logging
import math
import os
import threading
import time

from trainmetrics.contract import ACCOUNTED_PHASES

log = logging.getLogger("trainmetrics.trainer")

# The phases a process can be in now (trainer_phase{phase}): the accounted ones, and paused at the end of a
# paused run. `data` is the data_wait phase as the loop is in it.
INIT, RESTORE, DATA, COMPUTE, OPTIMIZER, COLLECTIVE, EVAL, CHECKPOINT, PAUSED, ENDED = (
    "init", "restore", "data_wait", "compute", "optimizer", "collective", "eval", "checkpoint", "paused", "ended")
CURRENT_PHASES = (INIT, RESTORE, DATA, COMPUTE, OPTIMIZER, COLLECTIVE, EVAL, CHECKPOINT, PAUSED, ENDED)
# The phases a data-loader wait counts as data wait in (JobMetrics.timed): the loop's own; a wait in a phase the
# loop marked (an evaluation's loader) is that phase's time, and one that begins inside another's wait (timed() over
# a generator that iterates timed(loader) itself) is the outer wait's: counted once.
LOOP_PHASES = (INIT, COMPUTE)
# Phases whose time is summed as they end (compute is what the loop's time leaves over; the data wait the loop
# sums itself).
SUMMED = (RESTORE, OPTIMIZER, COLLECTIVE, EVAL, CHECKPOINT)


def process_start_time() -> float:
    """Unix time this process started (its interpreter's start, before any import of ours), to the kernel's
    clock tick (10 ms): its start since boot (/proc/self/stat) against the uptime now. Not psutil's
    create_time, which adds the boot time in whole seconds (up to a second off)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            after_name = stat.read().rsplit(")", 1)[1].split()
            since_boot = float(uptime.read().split()[0])
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")       # field 22, starttime, in ticks
        return time.time() - (since_boot - started)
    except (OSError, ValueError, IndexError):     # no /proc: the phase clock's own creation is close enough
        return time.time()


# The most seconds a phase's carried total may hold (31,700 years: more than any job lives). A checkpoint's total
# is taken only when it is a finite number from 0 to this: a NaN or an infinity made every published total NaN
# (_grown spreads the growth by a ratio of sums), a negative one held them all at 0 until the others grew past it,
# and two near the float limit (1e308 each) overflowed their sum into the same NaN.
CARRIED_SECONDS_MAX = 1e12


def carried_seconds(value) -> float | None:
    """A checkpoint's carried total for one phase as seconds, or None when it is none (not a number, a bool, NaN,
    infinite, negative, or past CARRIED_SECONDS_MAX)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:        # an int past the float range
        return None
    return seconds if math.isfinite(seconds) and 0.0 <= seconds <= CARRIED_SECONDS_MAX else None


# How far the wall clock may move from the perf_counter offset before published times take the new one: further
# is a step (an NTP correction, a suspended VM's clock catching up: perf_counter stood still); less is a
# slewing clock's drift, which must not make them jitter.
CLOCK_STEP_SECONDS = 1.0

# The first job clock of a process starts at the process's start (its imports are that job's init); a later
# one (a second job in a notebook, a test) at its own creation: the jobs before it are not its init.
_process_start_taken = False


def job_start_time() -> float:
    """Unix time this process's job began: the process's start for the process's first job, else now."""
    global _process_start_taken
    if _process_start_taken:
        return time.time()
    _process_start_taken = True
    return process_start_time()


class PhaseClock:
    """The current phase and the time spent per phase, for one process (carried totals from a checkpoint).

    The data wait is summed by the loop itself (JobMetrics.timed), which sets `mark` directly around each wait,
    without enter()."""

    def __init__(self):
        # (the phase now, the perf_counter it began, the loop's data wait then, this process's finished summed phases
        # then, by name): replaced whole, never changed in place (the module's docstring).
        self.mark: tuple[str, float, float, dict[str, float]] = (
            INIT, time.perf_counter(), 0.0, dict.fromkeys(SUMMED, 0.0))
        self.process_start = job_start_time()             # unix seconds (its creation for a process's later jobs)
        self.loop_began: float | None = None              # perf_counter at training start
        self.loop_ended: float | None = None
        # The mark the run ended with (end_loop): what the clock reads from then on. A data wait in flight at the
        # end (pause() from a signal handler during the loader's wait) stores its phase back into `mark` as its
        # batch arrives, unchecked on the hot path: read from there, a paused job showed `compute`, and its data
        # wait grew past the end (the phases added up to more than the process had lived).
        self.ended_mark: tuple[str, float, float, dict[str, float]] | None = None
        self.before_loop = 0.0                            # of which before training started (a restore...)
        self.carried = dict.fromkeys(ACCOUNTED_PHASES, 0.0)   # the job's totals at the checkpoint resumed from
        self.last_step: float | None = None               # perf_counter of the last completed step
        # perf_counter of the loop's last progress: a step, or the end of an evaluation or checkpoint (the
        # hang clock: those phases are not a hang, and the step after one has had no time to complete).
        self.progress: float | None = None
        # The job's phase seconds in all when the last checkpoint write ended: a resume from that checkpoint
        # carries its snapshot (taken before the write), so the write itself is not thrown away.
        self.checkpointed: float | None = None
        self._published = dict.fromkeys(ACCOUNTED_PHASES, 0.0)
        self._lock = threading.Lock()
        # perf_counter to unix time: one offset, so published times do not jitter, taken again when the wall clock
        # was stepped (unix()). The phase totals keep the first (process_start is by it).
        self._epoch = self._start_epoch = time.time() - time.perf_counter()

    @property
    def phase(self) -> str:
        """The phase this process is in now."""
        return (self.ended_mark or self.mark)[0]

    @property
    def since(self) -> float:
        """The perf_counter the current phase began."""
        return (self.ended_mark or self.mark)[1]

    def unix(self, perf: float) -> float:
        """A perf_counter reading as unix seconds, by the wall clock now. With the offset of the clock's creation
        only, a wall clock stepped since left every published time that far off Prometheus's time() for the rest
        of the run: TrainerHang fired at every step of a healthy job (or never, stepped back)."""
        offset = time.time() - time.perf_counter()
        if abs(offset - self._epoch) > CLOCK_STEP_SECONDS:
            self._epoch = offset
        return self._epoch + perf

    def enter(self, phase: str, now: float | None = None) -> None:
        """Leave the current phase for `phase`: the time of a summed phase is added as it ends."""
        if self.loop_ended is not None:      # the run ended: the clock stopped (end_loop), and stays stopped
            return
        now = time.perf_counter() if now is None else now
        previous, since, data_waited, summed = self.mark
        if previous in summed:
            summed = {**summed, previous: summed[previous] + now - since}
            if previous in (EVAL, CHECKPOINT) and self.loop_began is not None:
                self.progress = now
        self.mark = (phase, now, data_waited, summed)

    def outside_training(self, now: float) -> float:
        """This process's seconds in eval and checkpoint so far, the one in progress as far as it has gone (a log
        interval's training throughput leaves them out)."""
        phase, since, _, summed = self.ended_mark or self.mark
        seconds = summed[EVAL] + summed[CHECKPOINT]
        return seconds + (now - since if phase in (EVAL, CHECKPOINT) else 0.0)

    def last_step_unix(self) -> float | None:
        """Unix time of the last completed step."""
        return None if self.last_step is None else self.unix(self.last_step)

    def progress_unix(self) -> float | None:
        """Unix time of the loop's last progress (a step, the end of an evaluation or checkpoint, the start)."""
        return None if self.progress is None else self.unix(self.progress)

    def start_loop(self, now: float) -> None:
        """Training starts: init is over."""
        self.enter(COMPUTE, now)
        self.loop_began = self.progress = now
        _, _, data_waited, summed = self.mark
        self.before_loop = sum(summed.values()) + data_waited

    def end_loop(self, phase: str) -> None:
        """Training is over (the run's final state): the clock stops."""
        now = time.perf_counter()
        self.enter(phase, now)
        self.ended_mark = self.mark
        self.loop_ended = now

    def keep_ended(self) -> None:
        """Put the end's mark back where the loop reads it (a wait in flight at the end stored its own), so that
        the loop's later waits are no data wait of the ended run."""
        if self.ended_mark is not None:
            self.mark = self.ended_mark

    def totals(self) -> dict[str, float]:
        """The job's seconds per accounted phase: the carried totals plus this process's, the current phase
        counted as far as it has gone; each never below what was published before."""
        with self._lock:
            # The mark before the time: read after it, a phase the loop left in between (this thread preempted for
            # ms on a busy host) was summed to past `now`, and compute, counted to `now`, was short by as much;
            # held at what was published, it stayed ahead of the process's life for good (3.8 ms).
            phase, since, data_waited, finished = self.ended_mark or self.mark
            now = time.perf_counter()
            summed = {**finished, DATA: data_waited}
            if phase in summed:
                summed[phase] += now - since
            marked = {"restore": summed[RESTORE], "data_wait": summed[DATA], "optimizer": summed[OPTIMIZER],
                      "collective": summed[COLLECTIVE], "eval": summed[EVAL], "checkpoint": summed[CHECKPOINT]}
            # init is the process's life before training less the phases marked in it (a restore, an evaluation
            # or a checkpoint before the first step), compute the loop's less those marked in it: each second
            # in one phase only.
            started = self.loop_began
            if started is None:          # still in init: its age so far, up to the end of a run that ended before
                # its first step (not on through its final linger)
                ended = self.loop_ended if self.loop_ended is not None else now
                init = self._start_epoch + ended - self.process_start
                init -= sum(marked.values())
                compute = 0.0
            else:
                init = self._start_epoch + started - self.process_start - self.before_loop
                loop = (self.loop_ended if self.loop_ended is not None else now) - started
                compute = loop - (sum(marked.values()) - self.before_loop)
            own = {"init": init, "compute": compute, **marked}
            self._published = _grown(self._published, {name: self.carried[name] + own[name]
                                                       for name in ACCOUNTED_PHASES})
            return dict(self._published)

    def state_dict(self) -> dict[str, float]:
        """The job's totals now, for a checkpoint."""
        return self.totals()

    def load_state_dict(self, totals: dict) -> None:
        """Take over the totals a checkpoint holds (before training starts); a phase's that is no number of seconds
        (carried_seconds) is left out, said with the phase's name (its carried total stays 0)."""
        for name in ACCOUNTED_PHASES:
            value = totals.get(name)
            if value is None:
                continue
            seconds = carried_seconds(value)
            if seconds is None:
                log.warning("ignoring the checkpoint's %s seconds, %s: a phase's carried total is a finite number of "
                            "seconds from 0 to %g", name, str(value)[:40], CARRIED_SECONDS_MAX)
                continue
            self.carried[name] = seconds
        with self._lock:
            self._published = dict.fromkeys(ACCOUNTED_PHASES, 0.0)


def _grown(published: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """The totals to publish: each at least what was published, and all of them together no more than `now`'s
    (the job's time so far). The loop dates a phase change from a clock read before its store (a checkpoint from
    its start), so a collection between the two counts time to the phase being left that the new mark then gives
    to the next one: the left one's total dips. Held at what was published, each alone, the totals added up to
    more than the process had lived, for good (3.8 ms over, the loop preempted between its read and its store on
    a busy host). The published surplus is taken out of the others' growth instead, which it delays: the totals
    are the `now` ones again once the dipped one has grown back."""
    short = sum(max(published[name] - seconds, 0.0) for name, seconds in now.items())
    grown = sum(max(seconds - published[name], 0.0) for name, seconds in now.items())
    kept = (grown - short) / grown if grown > short else 0.0      # the share of each growth published now
    return {name: published[name] + max(seconds - published[name], 0.0) * kept for name, seconds in now.items()}
