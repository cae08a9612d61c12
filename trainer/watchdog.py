"""Every thread's Python stack, on demand and when the job seems hung.

- On demand: SIGUSR2 makes the standard library's faulthandler write every thread's stack to
  `<dir>/stacks.rank<N>.txt`, or to stderr (the job's log) when no directory is given (in the signal handler, without the GIL: it works when the loop is stuck in C,
  a collective or a sleep). The job server's `GET /api/training/jobs/{job_id}/stacks` sends it to every rank.
- When hung: a watchdog thread checks every few seconds whether a step has completed lately; past
  max(MIN_HANG_SECONDS, HANG_FACTOR x the p99 step time of the last 10 minutes) outside checkpoints and
  evaluations, it writes the stacks once (once per hang: a step that completes ends it). The same rule as the
  TrainerHang alert. A hang that holds the GIL (native code that never lets go of it) stops that thread too:
  faulthandler's own timer (dump_traceback_later), armed at each check for when the bound will have passed
  plus two checks, writes them from C without the GIL, during the hang.
"""

import errno
import faulthandler
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from trainmetrics.contract import STACKS_SIGNAL, TRAINING_LOOP_PHASES
from trainmetrics.jobfiles import open_regular, stacks_path

log = logging.getLogger("trainmetrics.trainer")

MIN_HANG_SECONDS = 60.0
HANG_FACTOR = 10.0
CHECK_SECONDS = 5.0
# A check later than due by more than this (and by more than 2 check intervals): the watchdog could not run.
STARVED_SECONDS = 1.0
# The recent step times: bucket counts over the TrainerHang rule's window (its p99 over 10 minutes), one snapshot a
# check. A minute's p99 lost the rarer slow steps that the rule counts: a job with a 70 s step among every 40 of 2 s
# had its stacks dumped a minute into each as a hang, which the alert (its bound over 900 s) never saw.
WINDOW_SECONDS = 600.0
# The watches that hold SIGUSR2 in this process, oldest first (several jobs in one process: a notebook, tests).
# faulthandler keeps one file per signal: the newest watch's; closing it hands the signal back to the one before.
_holding: list["StackWatch"] = []
# Stacks files of watches closed off the main thread while faulthandler still wrote to them (StackWatch.close):
# closed once the signal goes elsewhere.
_left_open: list = []


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) is not the rank: the job server's stacks request, sent to every
    process of the job, must not have it append its own dump to the rank's file, nor kill it (ignored)."""
    if _holding or _left_open:
        faulthandler.cancel_dump_traceback_later()      # nor write the rank's hang dump (the parent's timer)
        _holding.clear()
        _left_open.clear()
        faulthandler.unregister(STACKS_SIGNAL)
        signal.signal(STACKS_SIGNAL, signal.SIG_IGN)


os.register_at_fork(after_in_child=_forget_in_child)


def _no_stacks_wanted(signum, frame) -> None:
    """SIGUSR2's handler under faulthandler's while a job holds the signal in a process that had none of its own."""


def _soften_default_action() -> None:
    """Before the first watch takes SIGUSR2: a process without a handler of its own gets _no_stacks_wanted.
    faulthandler puts back, when the last watch lets go of the signal, the action it found when it took it, and
    close() sets SIG_IGN only after that: with the default action there (terminate), a stacks request landing
    between the two (the job server's, as the trainer ends) killed the process. Not SIG_IGN: that would throw away
    a request that came while the signal was blocked (a job server's job, before this watch existed), which is
    answered once unblocked. Only the main thread sets a signal's handler: off it the default stays."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(STACKS_SIGNAL) != signal.SIG_DFL:
        return
    # A registration of the process's own (faulthandler.register(SIGUSR2) in a user's script) is dropped first: its
    # handler, replaced below, would not be installed again by ours (faulthandler only swaps the file).
    faulthandler.unregister(STACKS_SIGNAL)
    signal.signal(STACKS_SIGNAL, _no_stacks_wanted)


def _take_signal(file) -> None:
    """Dump every thread's stack to `file` on SIGUSR2. A handler the process set for it itself (submitit
    requeues on SIGUSR2 in some versions) still runs, after the dump: it was never called while a job lived."""
    faulthandler.register(STACKS_SIGNAL, file=file, all_threads=True, chain=_own_handler() is not None)
    _close_left_open()


def _own_handler():
    """The process's own Python handler for SIGUSR2, or None (none, or only _no_stacks_wanted)."""
    handler = signal.getsignal(STACKS_SIGNAL)
    return handler if callable(handler) and handler is not _no_stacks_wanted else None


def _close_left_open() -> None:
    while _left_open:
        _left_open.pop().close()


def _stderr():
    """Where stacks with no file of their own go: (stream, name, owned). faulthandler writes to a descriptor: a
    sys.stderr without one (contextlib.redirect_stderr to a StringIO, pytest's capsys, a notebook's stream) gives
    the process's own stderr, and a process without any (started with it closed: sys.stderr None) has its stacks
    dropped (os.devnull). Either failed the job's start (io.UnsupportedOperation, RuntimeError)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None and stream.fileno() >= 0:
                return stream, "stderr", False
        except (OSError, ValueError):       # (io.UnsupportedOperation is both)
            continue
    log.warning("thread stacks are dropped: this process has no stderr")
    return open(os.devnull, "a", encoding="utf-8"), os.devnull, True


def open_stacks_file(directory: Path | None, rank: int):
    """The file a rank's stacks go to: its file in `directory`, or stderr. Returns (file, name, owned).

    The directory may be shared, so its file is opened only if it is a regular file (jobfiles.open_regular):
    a FIFO planted there must not block the job's start, a symlink or a hard link must not have the stacks
    appended to whatever it names, nor another user's file have them (a shared /tmp). Stacks that cannot go to
    their file go to stderr (the job's log) instead: a dump must never stop the job."""
    if directory is None:
        return _stderr()
    path = stacks_path(directory, rank)
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND
        try:
            # One it creates is its own, whatever owner its filesystem reports (a FUSE mount's uid, NFS's squashed
            # one): only a file found at the name may be another user's.
            fd = open_regular(path, flags | os.O_CREAT | os.O_EXCL, one_name=True)
        except FileExistsError:
            fd = open_regular(path, flags, one_name=True)
            # Its own, or the directory's owner's (who controls the names there anyway: on a FUSE or squashing
            # mount every file shows the mount's uid, an earlier run's of this job too, which a resume refused).
            if os.fstat(fd).st_uid not in (os.geteuid(), os.stat(directory).st_uid):
                os.close(fd)
                raise OSError(errno.EPERM, "another user's file", str(path)) from None
    except OSError as error:
        log.warning("thread stacks go to stderr: cannot write %s (%s)", path, error)
        return _stderr()
    return os.fdopen(fd, "a", encoding="utf-8"), str(path), True


class StackWatch:
    """SIGUSR2 and the hang watchdog for one job process."""

    def __init__(self, metrics, directory: Path | None, rank: int, min_hang_seconds: float = MIN_HANG_SECONDS,
                 check_seconds: float = CHECK_SECONDS):
        self.metrics = metrics
        # Checked often enough to see a hang within a quarter of the bound (a short bound: a drill, a test).
        self.min_hang_seconds, self.check_seconds = min_hang_seconds, min(check_seconds, max(0.05, min_hang_seconds / 4))
        self.dumps = 0
        # Kept open: faulthandler writes to its descriptor from the signal handler.
        self._file, self.path, self._owns_file = open_stacks_file(directory, rank)
        self._stop = threading.Event()
        self._windows: deque[list[int]] = deque(maxlen=math.ceil(WINDOW_SECONDS / self.check_seconds) + 1)
        self._dumped_for: float | None = None      # the last step whose hang was dumped
        self._last_bound = self.min_hang_seconds
        # Faulthandler's timer armed by this watch: (when it fires (perf_counter), the progress and the phase it
        # was armed for), or None; under the lock, which close() and quiet() take to cancel it (a check in flight
        # must not arm it again after, to write into a closed file or during an evaluation).
        self._timer: tuple[float, float, str] | None = None
        self._fired: tuple[float, float, str] | None = None     # a timer that fired, not counted yet
        self._timer_lock = threading.Lock()
        # From any thread: faulthandler's registration is the process's. Only on the main thread, a job created in
        # another (a training function a framework runs in a thread) left SIGUSR2 at its default action, and a
        # request for its stacks killed the process.
        if not _holding and not _left_open:     # (else faulthandler holds it already: its handler must stay)
            _soften_default_action()
        _take_signal(self._file)
        _holding.append(self)
        # The job server spawns jobs with it blocked (a SIGUSR2 before this point would have killed us).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {STACKS_SIGNAL})
        self._thread = threading.Thread(target=self._watch, name="trainmetrics-watchdog", daemon=True)
        self._thread.start()

    def hang_bound(self) -> float:
        """Seconds without a step that mean a hang: MIN_HANG_SECONDS, or HANG_FACTOR x the p99 of the window. With no
        step in the window (steps longer than it, or a hang) the bound stays the last one found, as the
        TrainerHang rule's does: falling back to the minimum dumped the stacks on every long step."""
        if len(self._windows) < 2:
            return self._last_bound
        newest, oldest = self._windows[-1], self._windows[0]
        counts = [a - b for a, b in zip(newest, oldest)]
        total = sum(counts)
        if total == 0:
            return self._last_bound
        # The +Inf bucket (steps past the scale's last bound) counts as that bound, as the rule's
        # histogram_quantile takes it: an infinite bound never fired, and no checkpoint could carry it.
        bounds = (*self.metrics.step_times.bounds, self.metrics.step_times.bounds[-1])
        seen = 0
        for bound, count in zip(bounds, counts):
            seen += count
            if seen >= 0.99 * total:
                self._last_bound = max(self.min_hang_seconds, HANG_FACTOR * bound)
                break
        return self._last_bound

    @property
    def last_bound(self) -> float:
        """The bound last found (what a checkpoint carries to the resumed process)."""
        return self._last_bound

    def carry_bound(self, seconds: float) -> None:
        """Start from the bound a checkpoint carried, until this process's own steps give one: as the TrainerHang
        rule keeps it across a restart. From 60 s, the first step of a job with minutes-long steps was a hang a
        minute into it after every resume (its stacks dumped). Kept within what this process's steps could give
        (an old or hostile checkpoint's bound of days, or infinity, would keep a hang from ever being seen)."""
        if seconds == seconds:      # (not NaN)
            most = HANG_FACTOR * self.metrics.step_times.bounds[-1]
            self._last_bound = max(self.min_hang_seconds, min(seconds, most))

    def _watch(self) -> None:
        checked = time.perf_counter()
        while not self._stop.wait(self.check_seconds):
            try:
                now = time.perf_counter()
                # How much later than due this check runs: a hang that holds the GIL (native code) stops this
                # thread too, which then wakes when the hang is over.
                late, checked = now - checked - self.check_seconds, now
                self._check(now, late)
            except Exception:
                log.exception("job %s: the hang watchdog failed", self.metrics.job_id)

    def _check(self, now: float, late: float) -> None:
        """One look at the loop: dump the stacks of a hang past the bound, else arm the timer for when it passes."""
        self._windows.append(list(self.metrics.step_times.counts))
        clock = self.metrics.phases
        last = clock.progress
        self._disarm()
        if self._fired is not None:
            self._count_fired(now, late, last)
        if not self._in_loop() or last is None:
            return      # an evaluation, a checkpoint, a pause: no hang, whatever holds the GIL in it
        stuck, bound = now - last, self.hang_bound()
        if self._dumped_for == last:
            return      # dumped once for this hang already
        if stuck <= bound:
            # Past the bound by two checks: a watchdog that can run dumps first (with its header); one stopped by a
            # hang holding the GIL cannot, and the stacks of after the hang had lost the hung call.
            self._arm(bound - stuck + 2 * self.check_seconds, last, clock.phase)
            return
        self._dumped_for = last
        reason = f"no step completed for {stuck:.0f} s (phase {clock.phase})"
        if self._starved(late):
            reason += (f"; this watchdog could not run for {late:.0f} s of it (a hang holding the GIL, "
                       "in native code): the stacks below are from after it, not from the hang")
        self.dump(reason)

    def _in_loop(self) -> bool:
        return self.metrics.state == "running" and self.metrics.phases.phase in TRAINING_LOOP_PHASES

    def _starved(self, late: float) -> bool:
        """Whether this check came so late that the watchdog could not run meanwhile (a hang holding the GIL)."""
        return late > max(STARVED_SECONDS, 2 * self.check_seconds)

    def _count_fired(self, now: float, late: float, last: float | None) -> None:
        """Count the dump faulthandler's timer wrote, whether or not the hang is still on (a step that completed as
        the GIL was let go, before this check, ended it: its dump was left uncounted)."""
        due, hung_since, phase = self._fired
        self._fired, self._dumped_for = None, hung_since
        reason = f"no step completed for {due - hung_since:.0f} s (phase {phase})"
        if last != hung_since:
            reason += " until the loop moved on"
        if self._starved(late):
            self._count_dump(f"the stacks above (after 'Timeout') are this hang's: {reason}; faulthandler wrote them "
                             f"during it, this watchdog could not run for {late:.0f} s of it (a hang holding the "
                             "GIL, in native code)")
        else:
            self._count_dump(f"the stacks above (after 'Timeout'): {reason}")

    def _arm(self, seconds: float, last: float, phase: str) -> None:
        """Have faulthandler write every thread's stack in `seconds`, from its own thread, without the GIL. The
        timer is the process's: only the newest job's watch arms it (an older one's would replace it)."""
        with self._timer_lock:
            # The loop looked at again under the lock: an evaluation begun since the check's look has cancelled
            # the timer (quiet()) already, and must not have it armed again after.
            if self._stop.is_set() or not _holding or _holding[-1] is not self or not self._in_loop():
                return
            faulthandler.dump_traceback_later(seconds, repeat=False, file=self._file, exit=False)
            self._timer = (time.perf_counter() + seconds, last, phase)

    def _disarm(self) -> None:
        """Cancel this watch's timer; one that had fired already (its stacks are written) is kept in _fired, for
        the next check to count."""
        with self._timer_lock:
            timer, self._timer = self._timer, None
            if timer is None:
                return
            faulthandler.cancel_dump_traceback_later()      # (waits for a dump in progress)
            if time.perf_counter() >= timer[0]:
                self._fired = timer

    def quiet(self) -> None:
        """No hang from now (an evaluation, a checkpoint, the run's end begins): the timer is cancelled at once,
        not at the next check, which one holding the GIL keeps from running (its stacks were written as a hang's)."""
        self._disarm()

    def _count_dump(self, note: str) -> None:
        """Count the stacks faulthandler's timer wrote, and say after them what they are."""
        self._write_line(note)
        self._counted(note)

    def _counted(self, said: str) -> None:
        self.dumps += 1
        log.warning("job %s: %s; thread stacks written to %s", self.metrics.job_id, said, self.path)

    def _write_line(self, text: str, stacks: bytes = b"") -> None:
        # Straight to the descriptor, as faulthandler writes the stacks: through the file's buffer, a header whose
        # write failed (a full disk) stayed there, to make close() raise, or to be written at the file's end once
        # there was room, after later dumps, heading none. (Flushed first: stderr's own buffer, the log's lines.)
        # The header and its stacks in one write, which an append makes whole: a stacks request's dump (SIGUSR2,
        # which TrainerHang sends at the same moment) is written from the signal handler meanwhile, and the two
        # dumps, each written in hundreds of small pieces, were shuffled line into line.
        self._file.flush()
        line = f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {text}\n"
        os.write(self._file.fileno(), line.encode("utf-8", "replace") + stacks)

    def dump(self, reason: str) -> None:
        """Write every thread's stack now, under a header saying why and when, in one piece (_write_line)."""
        try:
            stacks = _every_stack()
        except OSError:     # no memory file nor temp file to gather them in: written as they come
            self._write_line(reason)
            faulthandler.dump_traceback(file=self._file, all_threads=True)
        else:
            self._write_line(reason, stacks)
        self._counted(reason)

    def close(self) -> None:
        """Stop watching; SIGUSR2 goes to another job's watch in this process, else to the process's own handler,
        else is ignored from now on."""
        self._stop.set()
        self._disarm()          # before its file closes: faulthandler's timer writes to its descriptor
        if self in _holding:
            _holding.remove(self)
            if _holding:
                _take_signal(_holding[-1]._file)
            elif threading.current_thread() is threading.main_thread():
                # The process's own handler back (faulthandler puts back the one from before the first watch,
                # which would undo one set since); without one, ignored: a late request must not kill a
                # finished job.
                handler = _own_handler()
                faulthandler.unregister(STACKS_SIGNAL)
                signal.signal(STACKS_SIGNAL, handler if handler is not None else signal.SIG_IGN)
                _close_left_open()
            elif self._owns_file:
                # Only the main thread sets a signal's handler: faulthandler goes on writing a late request's
                # stacks to this file's descriptor, so the file stays open until the signal goes elsewhere
                # (closed, its number went to the next file opened, a checkpoint say, and the stacks into it).
                _left_open.append(self._file)
                return
        if self._owns_file:
            self._file.close()


def _every_stack() -> bytes:
    """Every thread's stack as faulthandler writes them, gathered in memory (a memfd: a full or read-only temp
    directory must not cost a hang its stacks), else in a temp file."""
    with _memory_file() or tempfile.TemporaryFile() as scratch:
        faulthandler.dump_traceback(file=scratch, all_threads=True)
        scratch.seek(0)
        return scratch.read()


def _memory_file():
    """A file in memory; None where there is none to have (no memfd_create, or a kernel or sandbox refusing it:
    its OSError went past the temp file, and the stacks were written in pieces as they came)."""
    try:
        return os.fdopen(os.memfd_create("trainmetrics-stacks"), "w+b")
    except (AttributeError, OSError):
        return None
