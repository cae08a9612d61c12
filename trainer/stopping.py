"""Stop signals of `trainmetrics train`, caught from the first moment of the process (before torch is
imported) to its last: SIGINT, SIGTERM and SIGHUP cancel, SIGUSR1 pauses, each at the next step boundary after a
checkpoint. A handler only records the request; the loop acts on it. A signal after the outcome is decided
shortens the final linger (JobMetrics.cut_linger_short); a repeat before that changes nothing (a double Ctrl-C must not keep the final
state from the scrapers). Once the outcome is reported and the job's files removed, the stop signals are
ignored to the end of the process. Imports nothing heavy.

The job server starts jobs with these signals blocked (its spawning thread blocks them, and a child inherits
the mask): one sent before the handlers exist stays pending until install() unblocks it, so no moment of a
job's life is left to the default action, which would kill it with no result."""

import signal
import threading
from typing import Callable

from trainmetrics.signals import signals_to_take

# The state each stop signal leads to: SIGUSR1 pauses (resumable with --resume), the others cancel (SIGHUP: the
# terminal closed; its default action killed the job with no checkpoint, result or clean-up, its Prometheus
# target left behind for TargetDown to fire on).
STOP_SIGNALS = {signal.SIGINT: "cancelled", signal.SIGTERM: "cancelled", signal.SIGHUP: "cancelled",
                signal.SIGUSR1: "paused"}
# The signals that cancel: `with JobMetrics(...)` stops its block on these (trainer/metrics.py, _BlockSignals).
CANCEL_SIGNALS = tuple(signum for signum, outcome in STOP_SIGNALS.items() if outcome == "cancelled")


_process_flag: "StopFlag | None" = None


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP (cancel) or SIGUSR1 (pause); the loop checks it at each step boundary."""

    @classmethod
    def for_process(cls) -> "StopFlag":
        """The process's one flag, installed on first use (`python -m trainmetrics train` does it first)."""
        global _process_flag
        if _process_flag is None:
            _process_flag = cls().install()
        return _process_flag

    def __init__(self):
        self.outcome: str | None = None      # "cancelled" or "paused"
        self.decided = False                 # the job's outcome is known: later signals only hurry the exit
        self.hurry = False                   # a signal came that changed nothing: cut the final linger short
        self.on_late_signal: Callable[[], None] | None = None
        self.reason: str | None = None       # why the job stopped by itself
        self.keep_last_checkpoint = False    # stop without writing one (a loss spike: keep the one before it)
        self._installed = False              # the stop signals are routed here (install())

    def __bool__(self) -> bool:
        return self.outcome is not None

    def request(self, signum: int) -> None:
        """Record a stop request; a cancel overrides an earlier pause, never the reverse. Once the outcome is
        decided (the final linger) a signal asks for a quick exit instead; before that a repeat changes
        nothing: the job still lingers until its final state is read."""
        outcome = STOP_SIGNALS[signum]
        if not self.decided:
            if self.outcome is None or (outcome == "cancelled" and self.outcome == "paused"):
                self.outcome = outcome
            return
        self.hurry = True
        if self.on_late_signal is not None:
            self.on_late_signal()

    def pause_for_loss_spike(self, step: int, what: str = "loss spike") -> None:
        """The job asked to be paused on a loss spike (or a non-finite loss): pause at once, its last
        checkpoint from before it kept (no new one). A pause or cancel asked for already, not yet acted on,
        stops as asked, and without a checkpoint of the spiked weights too (one signalled in the spike's
        interval wrote them, and a resume went on from them)."""
        if self.decided:
            return
        self.keep_last_checkpoint = True
        self.outcome = self.outcome or "paused"
        if self.outcome == "paused":
            self.reason = f"{what} at step {step}"

    def stand_down(self) -> None:
        """The outcome is reported and the job's files removed: nothing is left for a stop signal to stop, so
        from now on they are ignored. Else one could still end the exiting process by its default action
        (Python's finalization puts its handlers back to SIG_DFL, and torch's teardown takes about a second
        more), with 143 or 130 instead of the job's exit code. Only the flag the signals were routed to
        (install()), on the main thread."""
        if self._installed and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    def install(self) -> "StopFlag":
        """Route the stop signals to this flag, then unblock them (a signal that came while they were blocked
        is handled now). Main thread only; elsewhere nothing changes."""
        if threading.current_thread() is threading.main_thread():
            for signum in signals_to_take(STOP_SIGNALS):
                signal.signal(signum, lambda signum, frame: self.request(signum))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            self._installed = True
        return self
