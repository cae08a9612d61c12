"""JobMetrics: the instrumentation library for one training job, used by the built-in runner and by users'
own loops::

    from trainmetrics.trainer.metrics import JobInfo, JobMetrics
    from trainmetrics.trainer.telemetry import Publish

    with JobMetrics("resnet-7", JobInfo(model="resnet18", dataset="cifar10"),
                    Publish(targets_dir="/var/lib/trainmetrics/targets", job_dir="/var/lib/trainmetrics/jobs")) as m:
        for epoch in range(epochs):
            m.set_epoch(epoch)
            for x, y in m.timed(loader):            # measures data-loader wait
                loss = step(x, y)
                m.step(loss=loss, samples=len(x))   # no GPU sync: losses are read once per log interval
            m.eval(loss=val_loss, accuracy=val_acc)

This module records; trainer/telemetry.py publishes. The hot path (`step`, `timed`) appends to short Python
lists and bumps numbers; counters and held values are read when something collects, step times enter
their histograms in batches. Memory stays bounded whether or not anything scrapes, and no metric call
raises: a failure is logged once and training goes on.
"""

import _thread
import atexit
import functools
import logging
import math
import numbers
import operator
import os
import re
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from opentelemetry.metrics import Observation

from trainmetrics.contract import FINAL_STATES, JOB_STATES, TRAINING_LOOP_PHASES, validate_job_id
from trainmetrics.signals import signals_to_take
from trainmetrics.trainer import instruments as inst
from trainmetrics.trainer.evaluations import Evaluation, EvaluationHistory
from trainmetrics.trainer.histograms import DurationHistogram
from trainmetrics.trainer.phases import (CHECKPOINT, COMPUTE, CURRENT_PHASES, DATA, ENDED, EVAL, LOOP_PHASES, PAUSED,
                                         SUMMED as MARKED_PHASES, CARRIED_SECONDS_MAX, PhaseClock, carried_seconds)
from trainmetrics.trainer.spikes import LossSpikeDetector
from trainmetrics.trainer.stopping import CANCEL_SIGNALS
from trainmetrics.trainer.watchdog import StackWatch
from trainmetrics.trainer.telemetry import Publication, Publish, current_scrape

log = logging.getLogger("trainmetrics.trainer")

# With OTLP push on, step times and data waits also wait in a list for the OpenTelemetry histograms; past this
# many the loop moves them itself (a collection usually does it first).
PENDING_LIMIT = 1024
# Losses not yet read (device tensors or floats) are folded into one partial sum past this many.
LOSS_FOLD_LIMIT = 256
# A stop signal during the final linger shortens it: it ends once one scraper has read the final state, or
# this long after the signal (a double Ctrl-C still reaches a Prometheus scraping every 250 ms), or at once on
# one more signal.
HURRIED_LINGER_SECONDS = 1.0


@dataclass(frozen=True)
class JobInfo:
    """What the job is (the labels of trainer_job_info) and which of its processes this one is."""

    job_name: str | None = None
    model: str = ""
    dataset: str = ""
    owner: str | None = None
    device: str = "cpu"
    # What the model learns, so what its loss measures: "classification", "regression", "language" (data.Dataset's
    # task); "" when not said. Losses of two tasks are not comparable (cross-entropy against a mean squared error).
    task: str = ""
    rank: int = 0
    world_size: int = 1
    upload_seconds: float | None = None
    submitted_at: float | None = None      # unix time the job was submitted (the job server knows)

    def __post_init__(self):
        # Label values: a None or a number here failed deep in the exposition, or at the first scrape.
        for name in ("job_name", "model", "dataset", "owner", "device", "task"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name in ("job_name", "owner")):
                raise TypeError(f"JobInfo.{name} must be text, not {type(value).__name__}")
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"JobInfo.{name} must be an int, not {type(value).__name__}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"JobInfo.rank {self.rank} is not one of world_size {self.world_size}'s ranks")


@dataclass(frozen=True)
class Diagnostics:
    """What the job watches in itself: where thread stacks go (SIGUSR2, a hang), and loss spikes."""

    stacks_dir: Path | None = None          # None: stacks go to stderr
    hang_seconds: float = 60.0              # the watchdog's least hang (watchdog.py)
    loss_spike_z: float = 6.0
    loss_spike_warmup: int = 10
    # Called with the step and what happened ("loss spike", "non-finite loss") when an interval's loss is a
    # spike or not a number: the job may pause (on_loss_spike: pause).
    on_loss_spike: Callable[[int, str], None] | None = None

    def __post_init__(self):
        # As the CLI and the job spec refuse them: a string failed every log interval after the warm-up (its
        # figures, on_log and throughput lost), NaN turned detection off and 0 or less flagged every interval.
        # A hang bound of NaN or 0 or less the same: the watchdog never (or always) wrote the stacks.
        z, warmup, hang = self.loss_spike_z, self.loss_spike_warmup, self.hang_seconds
        if _is_bool(hang) or not isinstance(hang, numbers.Real) or not (math.isfinite(hang) and hang > 0):
            raise ValueError(f"Diagnostics.hang_seconds must be a finite number above 0, not {str(hang)[:40]!r}")
        if _is_bool(z) or not isinstance(z, numbers.Real) or not (math.isfinite(z) and z > 0):
            raise ValueError(f"Diagnostics.loss_spike_z must be a finite number above 0, not {str(z)[:40]!r}")
        if _is_bool(warmup) or not isinstance(warmup, numbers.Integral) or warmup < 1:
            raise ValueError(f"Diagnostics.loss_spike_warmup must be a whole number >= 1, not {str(warmup)[:40]!r}")
        if self.on_loss_spike is not None and not callable(self.on_loss_spike):
            raise TypeError(f"Diagnostics.on_loss_spike must be callable, not {type(self.on_loss_spike).__name__}")


@dataclass(frozen=True)
class IntervalStats:
    """What one log interval measured; handed to the on_log callback (progress bar, log line)."""

    step: int
    samples: int
    loss: float | None
    samples_per_second: float
    mfu: float | None


def _never_raises(method):
    """A metric call logs its failure (once per method and job) and returns None: telemetry never breaks
    training."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            failed = self.__dict__.setdefault("_failed_calls", set())
            if method.__name__ not in failed:
                failed.add(method.__name__)
                log.exception("job %s: metrics call %s failed (further failures of it are not logged)",
                              getattr(self, "job_id", "?"), method.__name__)
            return None

    return guarded


def _sum(values: list[float]) -> float:
    """math.fsum, which raises where a loss diverged (inf - inf, an overflow): there the plain sum, NaN or
    infinite, so the interval counts as non-finite instead of being lost."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return float(sum(values))


def _device_sum(tensors: list):
    """The sum of loss tensors in float64 (float32 on Apple's MPS, which has no float64: asked for one, it raised,
    and no interval's loss was ever published on a Mac), as a tensor where they live: on an accelerator one
    stacked sum (no host sync until it is read); on the CPU, where reading costs no sync, the values read one by
    one (cheaper than a stack)."""
    import torch

    if tensors[0].is_cpu:
        return torch.tensor(_sum([t.item() for t in tensors]), dtype=torch.float64)
    dtype = torch.float32 if tensors[0].device.type == "mps" else torch.float64
    try:
        return torch.stack(tensors).sum(dtype=dtype)
    except RuntimeError:     # losses of different shapes (a scalar and a one-element tensor): one by one
        return torch.stack([t.reshape(()) for t in tensors]).sum(dtype=dtype)


class _LossAccumulator:
    """The losses of the current log interval, read once at its end (the one device sync per interval).
    JobMetrics.step appends to `tensors` or `floats` and counts them itself (the hot path)."""

    def __init__(self):
        self.tensors: list = []
        self.floats: list[float] = []
        self.count = 0

    def fold(self) -> None:
        """One partial sum for the losses so far (on the device: asynchronous, no sync), so an endless
        interval holds a bounded list."""
        if self.tensors:
            self.tensors = [_device_sum(self.tensors)]
        if self.floats:
            self.floats = [_sum(self.floats)]

    def mean(self) -> float | None:
        """The interval's mean loss (None without losses); starts a new interval. A read cut short (an
        exception, a KeyboardInterrupt in the sync) puts the losses back for the next one."""
        tensors, floats, count = self.tensors, self.floats, self.count
        self.tensors, self.floats, self.count = [], [], 0
        if count == 0:
            return None
        try:
            total = _sum(floats)
            if tensors:     # the library works without torch for float losses: only tensors need it
                total += _device_sum(tensors).item()
        except Exception:       # the losses cannot be read (shapes that do not stack): the interval goes
            raise
        except BaseException:   # interrupted (a KeyboardInterrupt in the sync): they are read again
            self.tensors[:0], self.floats[:0], self.count = tensors, floats, self.count + count
            raise
        return total / count


class _BlockSignals:
    """The stop signals of the process's open `with JobMetrics` blocks: SIGTERM and SIGHUP (the terminal closed) stop
    a block like Ctrl-C (its job ends `cancelled`, its files removed); in a block that is ending, a signal cuts the
    final linger short. Taken once, when the first block enters, and given back to whatever handled them before when
    the last one ends, in whatever order the blocks end: each block saved the handlers it found and put them back
    at its end, so blocks that ended in the order they began (A in, B in, A out, B out) left A's handler for good
    (B put it back), a SIGTERM then ignored, and while B was still open a SIGTERM went past it. Main thread only
    (Python's rule for handlers)."""

    def __init__(self):
        self.blocks: list["JobMetrics"] = []        # the open blocks, in the order they entered
        self.previous: dict[int, object] = {}       # the handlers from before the first of them
        self.held: int | None = None                # a stop for an open block, held while another one ends

    def enter(self, block: "JobMetrics") -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.blocks.append(block)
        if len(self.blocks) == 1:
            for signum in signals_to_take(CANCEL_SIGNALS):
                # Noted before it is taken: a signal right after signal.signal() (a Ctrl-C in the block's start)
                # runs deliver() before signal.signal()'s answer could be noted, and the handler was never given back.
                found = signal.getsignal(signum)
                if found != self.deliver:       # (still ours when the last block ended off the main thread)
                    self.previous[signum] = found
                signal.signal(signum, self.deliver)

    def leave(self, block: "JobMetrics") -> None:
        """The block's end; with the last one, the handlers go back (off the main thread they cannot: deliver()
        puts them back at the next signal). A stop held for an open block while this one ended is raised now."""
        if block not in self.blocks:
            return
        del self.blocks[len(self.blocks) - 1 - self.blocks[::-1].index(block)]     # (entered twice: once out)
        if not self.blocks:
            self.held = None
            if threading.current_thread() is threading.main_thread():
                self.give_back()
            return
        held, self.held = self.held, None
        if held is not None and threading.current_thread() is threading.main_thread():
            self.stop_open(held)

    def give_back(self) -> None:
        """Each handler back, then forgotten: forgotten first, a signal before its handler was back found no
        handler to give it to, and deliver() raised it to itself again, without end (RecursionError in the block's
        end, the signal ours for good: SIGTERM never ended the process again)."""
        for signum in list(self.previous):
            handler = self.previous.get(signum)     # (None: given back by a signal meanwhile, deliver())
            if handler is not None:
                signal.signal(signum, handler)
                self.previous.pop(signum, None)

    def deliver(self, signum: int, frame) -> None:
        """A stop signal: the linger of every block that ended cut short, every open one stopped."""
        if not self.blocks:     # the last one ended off the main thread: the handlers go back, the signal to them
            self.give_back()
            if signal.getsignal(signum) == self.deliver:    # none known to give it to: Python's own
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        for block in list(self.blocks):
            if block._block_ending or block.ended:
                block.cut_linger_short()
        if any(block._block_ending for block in self.blocks):
            # A block's end is under way on this thread: the others' stop is raised once it is over (raised in its
            # linger, it gave the wait up, that job's final state unread).
            if any(not (block._block_ending or block.ended) for block in self.blocks):
                self.held = signum
            return
        self.stop_open(signum)

    def stop_open(self, signum: int) -> None:
        """Stop the open blocks (not ending, not ended): a KeyboardInterrupt, held while the losses of one's interval
        are read (raised once they are counted: _log_interval)."""
        open_blocks = [block for block in self.blocks if not (block._block_ending or block.ended)]
        for block in open_blocks:
            if block._stop_signal is None:
                block._stop_signal = signum
        reading = [block for block in open_blocks if block._reading_interval]
        for block in reading:
            block._held_stop = signum
        if open_blocks and not reading:
            # Every signal until the block ends interrupts: Python swallows a KeyboardInterrupt raised in a
            # __del__ or an at-fork callback ("Exception ignored in ..."; a DataLoader iterator's __del__
            # joining its workers), and a job that took only the first signal as its stop could not be stopped.
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


_BLOCK_SIGNALS = _BlockSignals()

# The jobs of this process not closed yet. A loop that never called close() (finish() and no `with`) left its
# final state unread and its target and job-mapping files behind at its exit: Prometheus scraped a dead port,
# and a job that had completed ended `vanished`. They are closed as the interpreter exits (a job that ended
# lingers for its final scrape first, as close() does).
_UNCLOSED: "weakref.WeakSet[JobMetrics]" = weakref.WeakSet()


@atexit.register
def _close_left_open() -> None:
    """Close every job left open, each one whatever happened to the others: a Ctrl-C during one's linger ended
    the loop, and the jobs after it kept their target and job-mapping files (Prometheus scraped a dead port).
    After such a stop the others are closed without their linger, as a second stop signal cuts one short."""
    ending = _exit_error()
    stopped = False
    for metrics in list(_UNCLOSED):
        if ending is not None and metrics.start_time is not None and not metrics.ended:
            metrics.finish("cancelled" if isinstance(ending, KeyboardInterrupt) else "failed", ending)
        if stopped:
            metrics.cut_linger_short()
            metrics.cut_linger_short()
        try:
            metrics.close()
        except KeyboardInterrupt:       # (close() released the job's files in its finally)
            stopped = True


def _exit_error() -> BaseException | None:
    """The exception the program ends with, when one went unhandled (Python keeps it as sys.last_value before
    sys.excepthook prints it, and runs the exit hooks after). A job still running then ended `vanished`, as after
    a kill, its files removed: an ordinary traceback fired TargetDown, and the error's class was published
    nowhere. None in an interactive session, where sys.last_value is an earlier prompt's error."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return None
    error = getattr(sys, "last_value", None)
    return error if isinstance(error, BaseException) else None


class JobMetrics:
    """Records one job process's progress and publishes it as trainer_* series."""

    def __init__(self, job_id: str, info: JobInfo | None = None, publish: Publish | None = None, *,
                 log_every: int = 50, on_log: Callable[[IntervalStats], None] | None = None,
                 flops_per_sample: float | None = None, peak_flops: float | None = None,
                 diagnostics: Diagnostics | None = None, resuming: bool = False):
        self.job_id = validate_job_id(job_id)
        self.info = info or JobInfo()
        self.diagnostics = diagnostics or Diagnostics()
        # Step times, data waits and checkpoint writes: our own histograms (histograms.py says why).
        self.step_times = DurationHistogram(inst.DURATION_BUCKETS)
        self.data_waits = DurationHistogram(inst.DURATION_BUCKETS)
        self.checkpoint_durations = DurationHistogram(inst.CHECKPOINT_BUCKETS)
        self.phases = PhaseClock()
        self.spikes = LossSpikeDetector(self.diagnostics.loss_spike_z, self.diagnostics.loss_spike_warmup)
        self.log_every = max(1, int(log_every))
        self.on_log = on_log
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self._cuda = self.info.device.startswith("cuda")
        # The GPU whose peak trainer_gpu_memory_peak_bytes shows: the one the job's device names (cuda:1), else the
        # current one. Read as the current one, a job on cuda:1 (a model.to("cuda:1"), --device cuda:1: neither makes
        # it current) published GPU 0's peak.
        self._cuda_index = _cuda_index(self.info.device)
        # In a multi-process job only rank 0 publishes the job's lifecycle (info, state, start/end, failure,
        # upload): the state is the job's, not a rank's. Every rank publishes its own progress.
        self._lifecycle = self.info.rank == 0
        self._labels = {"job_name": self.info.job_name or job_id, "model": self.info.model,
                        "dataset": self.info.dataset, "owner": self.info.owner or "", "device": self.info.device,
                        "task": self.info.task, "world_size": str(self.info.world_size)}
        self.state = "queued"
        self.error_type: str | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self._end_monotonic: float | None = None
        # Counters and held values of the whole job: a resumed process takes them over from the checkpoint
        # (load_state_dict). Until it has (resuming), the job's counters are not published: a scrape during
        # init would read them from zero, and the jump to the checkpoint's totals would count as the
        # process's own growth (the fleet's phases and throughput count each process from its first scrape).
        # When they became known (time.monotonic): wait_for_first_scrape() waits for a scrape after it.
        self._carried_known_at: float | None = None if resuming else time.monotonic()
        self._first_scrape_waited = False
        self.steps = 0
        self.samples = 0
        self.checkpoints = 0
        self.loss_first: float | None = None
        self.loss_min: float | None = None
        # The finite intervals' loss sum and their count: one tuple, stored whole and read once per scrape. As two
        # attributes, a scrape that read one before an interval ended and the other after it (or between
        # their two stores) showed a sum and a count of different intervals, and a mean over a window that was not.
        self._loss_totals: tuple[float, int] = (0.0, 0)
        self.nonfinite_losses = 0
        # This process's own counts of those two and of the spikes, from 0 whatever a resume carries over (what the
        # alerts read: a rise is a new one). Counted as they happen: the job's less the checkpoint's, read while
        # load_state_dict() set one and not yet the other, showed a carried count for a moment.
        self.process_nonfinite_losses = self.process_loss_spikes = 0
        self.last_loss: float | None = None         # the last interval's mean, finite or not
        self.loss: float | None = None              # the last finite one: trainer_loss
        self.epoch: int | None = None
        self.learning_rate: float | None = None
        self.mfu: float | None = None
        self.gpu_memory_peak: int | None = None
        self.eval_loss_min: float | None = None
        self.eval_accuracy_max: float | None = None
        self.last_evaluation: Evaluation | None = None
        self.step_duration_max = 0.0
        self._warned_bad_step = False
        self._warned_phases: set = set()
        self._warned_epoch = False
        self._warned_values: set[str] = set()       # the kinds of value said to be unusable (said once each)
        self._warned_outside_run = False
        self._checkpoints_writing = 0       # checkpoint() blocks open: state_dict() counts them as written
        # thread id -> the blocks open that it entered (a block ended on another thread, an asynchronous save's
        # callback, is taken off its entering thread's: a threading.local raised there and lost the count)
        self._checkpoints_opened_on: dict[int, int] = {}
        # checkpoint() may run on a writer thread of its own (an asynchronous save): its counts change under this
        # lock, and state_dict() reads them under it (between the two changes it counted the write not at all).
        self._checkpoint_lock = threading.Lock()
        # The loop's thread (start()'s, then step()'s at each log interval): a checkpoint() block on another thread
        # (an asynchronous save's writer) is no part of the loop, which goes on training meanwhile.
        self._loop_thread = threading.get_ident()
        self._warned_interval = False
        self._closed = False
        self.evaluations = EvaluationHistory()
        self._pushed_evaluations: list[Evaluation] = []     # what the OTLP push being collected shows
        self._losses = _LossAccumulator()
        self._pending_lock = threading.Lock()
        self._pending_step_durations: list[float] = []
        self._pending_data_waits: list[float] = []
        self._last_step_end: float | None = None
        # The loader a batch came from (timed()) since the last step(), else None: a new pass over the same one
        # begins inside a step (gradient accumulation across the end of a pass), whose time so far stays the step's.
        self._fed_by: Iterable | None = None
        # The loader whose pass ended last (timed(), or the loop left it: a break), until a pass begins: a batch
        # since the last step from a loader whose pass is still open (the other of two zipped loaders) is the step's
        # too, as is one from the same loader begun again; only one from another loader's ended pass (an unmarked
        # evaluation's) is not.
        self._ended_pass: Iterable | None = None
        self._new_interval(time.perf_counter())
        self._hurried_at: float | None = None      # when a stop signal came during the final linger
        # When a checkpoint written after the end (a pause's last save, an asynchronous writer's) was counted:
        # the final state the linger waits to be read includes it.
        self._counted_after_end: float | None = None
        self._carried_base: dict[str, float] = {}     # the carried counters' values at load_state_dict()
        self._carried_phases: dict[str, float] = {}
        self._linger_cut_short = threading.Event()  # one more came: stop waiting at once
        # The `with` block's stop signals (_BlockSignals): the first one's number, once one came; the
        # block's end has begun; the interval's losses are being read; a signal held until they are counted.
        self._stop_signal: int | None = None
        self._block_ending = False
        self._reading_interval = False
        self._held_stop: int | None = None
        self._owner_pid = os.getpid()     # the process that publishes (close() in a forked child leaves it be)

        self._publication = Publication(job_id, self.info.rank, self.info.world_size, publish,
                                        delivered=self._scrape_delivered)
        self._create_instruments()
        self._stack_watch: StackWatch | None = None
        try:
            self._publication.open()
            self._stack_watch = StackWatch(self, self.diagnostics.stacks_dir, self.info.rank,
                                           min_hang_seconds=self.diagnostics.hang_seconds)
        except BaseException:
            self._publication.shutdown()
            raise
        _UNCLOSED.add(self)

    # ----- instruments -------------------------------------------------------------------------------
    def _create_instruments(self) -> None:
        """Every instrument as /metrics shows it (Publication.series, reading the job's state) and, when OTLP push is
        on, as the SDK's observable instruments with the same readers."""
        series = self._publication.series
        push_provider = self._publication.push_provider
        push_meter = push_provider.get_meter("trainmetrics.trainer") if push_provider is not None else None

        def pushed_too(spec, counter, observations):
            if push_meter is not None:
                factory = push_meter.create_observable_counter if counter else push_meter.create_observable_gauge
                factory(spec.name, callbacks=[lambda options: observations()], unit=spec.unit,
                        description=spec.description)

        def observe(spec, read, counter=False, carried=False, labels=None):
            """One series showing read() (a number, or None for no series); a `carried` one (the job's totals, taken
            over by a resumed process) only once they are known, and as this process's own count to an OTLP push
            (OTLP stamps a cumulative counter with the process's start: job totals there would count a resumed job's
            earlier runs again in a collector that turns cumulative into delta)."""
            def shown():
                return None if carried and self._carried_known_at is None else read()

            def observations() -> list[Observation]:
                value = shown()
                if value is None:
                    return []
                if counter and carried:
                    value -= self._carried_base.get(spec.name, 0)
                return [Observation(value, labels)]

            series.value(spec, shown, counter, labels)
            pushed_too(spec, counter, observations)

        def observe_each(spec, label, read, counter=False, pushed=None):
            """A series per value of `label`: read() -> [(label value, number)]; `pushed()` those an OTLP push shows
            when they differ."""
            series.labelled(spec, label, read, counter)
            pushed_too(spec, counter, lambda: [Observation(value, {label: key}) for key, value in (pushed or read)()])

        def histogram(spec, values):
            """A histogram the job fills itself (DurationHistogram), and the SDK's for a push (in batches)."""
            series.histogram(spec, values)
            if push_meter is not None:
                return push_meter.create_histogram(spec.name, unit=spec.unit, description=spec.description)
            return None

        # Every gauge is read when something collects: setting one costs the loop an attribute store.
        observe(inst.EPOCH, lambda: self.epoch)
        observe(inst.LOSS, lambda: self.loss)
        observe(inst.LOSS_FINITE, lambda: None if self.last_loss is None else int(math.isfinite(self.last_loss)))
        observe(inst.EVAL_LOSS, lambda: self.last_evaluation.loss if self.last_evaluation else None)
        observe(inst.EVAL_ACCURACY, lambda: self.last_evaluation.accuracy if self.last_evaluation else None)
        observe(inst.LEARNING_RATE, lambda: self.learning_rate)
        observe(inst.GPU_MEMORY_PEAK, lambda: self.gpu_memory_peak)
        observe(inst.MFU, lambda: self.mfu)
        self._pushed = push_meter is not None
        self._step_duration = histogram(inst.STEP_DURATION, self.step_times)
        self._data_wait = histogram(inst.DATA_WAIT, self.data_waits)
        self._checkpoint_duration = histogram(inst.CHECKPOINT_DURATION, self.checkpoint_durations)
        if self._lifecycle:
            observe(inst.JOB_INFO, lambda: 1, labels=self._labels)
            observe_each(inst.JOB_STATE, "state", lambda: _one_of(self.state, JOB_STATES))
            observe_each(inst.JOB_FAILURE, "error_type", lambda: [(self.error_type, 1)] if self.error_type else [])
            observe(inst.JOB_START, lambda: self.start_time)
            observe(inst.JOB_END, lambda: self.end_time)
            observe(inst.UPLOAD_DURATION, lambda: self.info.upload_seconds)
            observe(inst.JOB_SUBMITTED, lambda: self.info.submitted_at)
            observe(inst.PROCESS_START, lambda: self.phases.process_start)
        observe(inst.HEARTBEAT, time.time)
        observe(inst.STEPS, self._steps_at_collection, counter=True, carried=True)
        observe(inst.SAMPLES, lambda: self.samples, counter=True, carried=True)
        observe(inst.CHECKPOINTS, lambda: self.checkpoints, counter=True, carried=True)
        observe(inst.LOSS_NONFINITE, lambda: self.nonfinite_losses, counter=True, carried=True)
        observe(inst.LOSS_SUM, lambda: self._loss_totals_shown()[0], carried=True)    # a gauge: losses may be negative
        observe(inst.LOSS_INTERVALS, lambda: self._loss_totals_shown()[1], counter=True, carried=True)
        observe(inst.LOSS_FIRST, lambda: self.loss_first)
        observe(inst.LOSS_MIN, lambda: self.loss_min)
        observe(inst.STEP_DURATION_MAX, lambda: self.step_duration_max if self.step_times.count else None)
        observe(inst.EVALUATIONS, lambda: self.evaluations.count, counter=True, carried=True)
        observe(inst.EVAL_LOSS_MIN, lambda: self.eval_loss_min)
        observe(inst.EVAL_ACCURACY_MAX, lambda: self.eval_accuracy_max)
        observe_each(inst.PHASE, "phase", lambda: _one_of(self.phases.phase, CURRENT_PHASES))
        observe(inst.PHASE_SINCE, lambda: self.phases.unix(self.phases.since))
        observe(inst.LAST_STEP, self.phases.last_step_unix)
        observe(inst.PROGRESS, self.phases.progress_unix)

        def phase_seconds(base: dict[str, float]) -> list[tuple[str, float]]:
            if self._carried_known_at is None:
                return []
            # (Never below 0: a process's own init may read a few µs below none, its start read from /proc to the
            # kernel's clock tick, and a pushed counter must not start negative.)
            totals = self.phases.totals()
            return [(phase, max(seconds - base.get(phase, 0.0), 0.0)) for phase, seconds in totals.items()]

        # To an OTLP push, this process's own seconds (as observe's carried counters).
        observe_each(inst.PHASE_SECONDS, "phase", lambda: phase_seconds({}), counter=True,
                     pushed=lambda: phase_seconds(self._carried_phases))
        observe(inst.CHECKPOINTED_SECONDS, lambda: self.phases.checkpointed)
        observe(inst.LOSS_SPIKES, lambda: self.spikes.spikes, counter=True, carried=True)
        # This process's own counts, from 0 in each process: a rise is a new one (what the alerts read).
        observe(inst.PROCESS_LOSS_NONFINITE, lambda: self.process_nonfinite_losses, counter=True)
        observe(inst.PROCESS_LOSS_SPIKES, lambda: self.process_loss_spikes, counter=True)
        observe(inst.STACK_DUMPS, lambda: self._stack_watch.dumps if self._stack_watch else None, counter=True)
        observe(inst.HANG_MIN, lambda: self.diagnostics.hang_seconds)
        for spec, field in ((inst.EVAL_HISTORY_INDEX, "index"), (inst.EVAL_HISTORY_STEP, "step"),
                            (inst.EVAL_HISTORY_TIME, "time"), (inst.EVAL_HISTORY_LOSS, "loss"),
                            (inst.EVAL_HISTORY_ACCURACY, "accuracy")):
            observe_each(spec, "slot", functools.partial(self._evaluation_history, field),
                         pushed=functools.partial(self._pushed_evaluation_history, field))

    def _steps_at_collection(self) -> int:
        # Callbacks run at the start of every collection, before the histograms are read: the step times
        # and data waits buffered by the loop enter their histograms here, off the hot path.
        self._flush_pending()
        return self.steps

    @property
    def loss_sum(self) -> float:
        """The sum of the finite log intervals' mean losses (trainer_loss_accumulated)."""
        return self._loss_totals[0]

    @property
    def loss_intervals(self) -> int:
        """The log intervals with a finite mean loss (trainer_loss_intervals_total)."""
        return self._loss_totals[1]

    @staticmethod
    def _read_once_per_scrape(key: str, read: Callable):
        """read(the scrape) as the scrape under way first read it (every series of one scrape shows the same
        reading, kept in its `shown` under `key`), or read(None) now outside a scrape."""
        scrape = current_scrape.get()
        if scrape is None:
            return read(None)
        if key not in scrape.shown:
            scrape.shown[key] = read(scrape)
        return scrape.shown[key]

    def _loss_totals_shown(self) -> tuple[float, int]:
        # Both series of one scrape show the same intervals.
        return self._read_once_per_scrape("loss_totals", lambda scrape: self._loss_totals)

    def _evaluation_history(self, field: str) -> list[tuple[int, float]]:
        # The five history series of one scrape show the same evaluations.
        shown = self._read_once_per_scrape(
            "evaluations", lambda scrape: self.evaluations.shown(None if scrape is None else scrape.scraper))
        return [(record.slot, getattr(record, field)) for record in shown if getattr(record, field) is not None]

    def _pushed_evaluation_history(self, field: str) -> list[tuple[int, float]]:
        # An OTLP push reads the five history series one callback after another, in the order they were created
        # (index first), while the loop may evaluate in between: each read afresh, a slot showed one evaluation's
        # number with the next one's step and loss. The first takes the push's evaluations, the others reuse them.
        if field == "index":
            self._pushed_evaluations = self.evaluations.shown(None)
        return [(record.slot, getattr(record, field)) for record in self._pushed_evaluations
                if getattr(record, field) is not None]

    def _scrape_delivered(self, scrape) -> None:
        shown = scrape.shown.get("evaluations")
        if shown is not None:
            self.evaluations.delivered(scrape.scraper, shown, self._publication.scrapers.active() | {scrape.scraper})

    def _flush_pending(self) -> None:
        if not self._pushed:
            return
        with self._pending_lock:
            durations, self._pending_step_durations = self._pending_step_durations, []
            waits, self._pending_data_waits = self._pending_data_waits, []
        for value in durations:
            self._step_duration.record(value)
        for value in waits:
            self._data_wait.record(value)

    # ----- the job's state carried across processes --------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed process must take over for the job's series to carry on (goes into checkpoints). Taken
        inside `with checkpoint():` it counts the checkpoint being written (a resume from it finds it written)."""
        with self._checkpoint_lock:
            checkpoints = self.checkpoints + self._checkpoints_writing
        loss_sum, loss_intervals = self._loss_totals
        return {"steps": self.steps, "samples": self.samples, "checkpoints": checkpoints,
                "loss_first": self.loss_first, "loss_min": self.loss_min, "loss_sum": loss_sum,
                "loss": self.loss, "last_loss": self.last_loss,
                "loss_intervals": loss_intervals, "nonfinite_losses": self.nonfinite_losses,
                "evaluations": self.evaluations.count, "eval_loss_min": self.eval_loss_min,
                # The last evaluation's results: a resumed run that evaluates no more still publishes them.
                "last_eval_loss": None if self.last_evaluation is None else self.last_evaluation.loss,
                "last_eval_accuracy": None if self.last_evaluation is None else self.last_evaluation.accuracy,
                "last_eval_step": None if self.last_evaluation is None else self.last_evaluation.step,
                "last_eval_time": None if self.last_evaluation is None else self.last_evaluation.time,
                "eval_accuracy_max": self.eval_accuracy_max, "step_duration_max": self.step_duration_max,
                "loss_spikes": self.spikes.spikes, "loss_spike_detector": self.spikes.state_dict(),
                "phases": self.phases.state_dict(),
                "hang_bound": None if self._stack_watch is None else self._stack_watch.last_bound}

    @_never_raises
    def load_state_dict(self, state: dict) -> None:
        """Take over a previous process's state_dict() (before start(), so no series restarts). A state that is
        not one (a count that is negative or not whole, a loss that is not a finite number, phases that are not
        a mapping of seconds) is refused whole, said once: nothing of it is taken."""
        if self.start_time is not None:
            raise ValueError("load_state_dict() after start(): the job's counters would go back")
        self._take(self._checked(state))

    def refusal(self, state) -> str | None:
        """Why load_state_dict() would refuse `state` whole (nothing of it taken), or None: a trainer resuming
        from a checkpoint asks before it takes the checkpoint's position in the data."""
        try:
            self._checked(state)
        except Exception as error:      # (what load_state_dict's guard would have logged)
            return f"{type(error).__name__}: {str(error)[:200]}"
        return None

    def _checked(self, state: dict) -> dict:
        """What load_state_dict() takes of `state`, every value checked (ValueError for one that is none)."""
        if not isinstance(state, dict):
            raise ValueError(f"a state is a mapping, not {type(state).__name__}")

        def count(key: str) -> int:
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
                raise ValueError(f"{key} must be a whole number >= 0, got {str(value)[:40]!r}")
            return int(value)

        def number(key: str, default: float | None = None) -> float | None:
            value = state.get(key, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {str(value)[:40]!r}")
            return float(value)

        loss_sum = state.get("loss_sum", 0.0)
        # Infinite when finite interval means overflowed their sum (1.5e308 three times), as state_dict() wrote it:
        # refused, the job's own checkpoint lost every counter it carries. No sum of finite losses is NaN.
        if isinstance(loss_sum, bool) or not isinstance(loss_sum, (int, float)) or math.isnan(loss_sum):
            raise ValueError(f"loss_sum must be a number, got {str(loss_sum)[:40]!r}")
        last_loss = state.get("last_loss")     # the last interval's mean: NaN or infinite for a diverged job
        if last_loss is not None and (isinstance(last_loss, bool) or not isinstance(last_loss, (int, float))):
            raise ValueError(f"last_loss must be a number, got {str(last_loss)[:40]!r}")
        phases = state.get("phases") or {}
        if not isinstance(phases, dict):
            raise ValueError("phases must map phase names to seconds")
        for phase, seconds in phases.items():
            if carried_seconds(seconds) is None:     # (1e308 twice overflowed the totals' sum: every phase NaN)
                raise ValueError(f"phases: {str(phase)[:40]!r} holds {str(seconds)[:40]!r}, not seconds from 0 to "
                                 f"{CARRIED_SECONDS_MAX:g}")
        taken = {"steps": count("steps"), "samples": count("samples"), "checkpoints": count("checkpoints"),
                 "loss_first": number("loss_first"), "loss_min": number("loss_min"),
                 "_loss_totals": (float(loss_sum), count("loss_intervals")),
                 # A resumed run that trains no step (paused or killed at the last one) still has a final loss.
                 "loss": number("loss"), "last_loss": None if last_loss is None else float(last_loss),
                 "nonfinite_losses": count("nonfinite_losses"), "eval_loss_min": number("eval_loss_min"),
                 "eval_accuracy_max": number("eval_accuracy_max"),
                 "step_duration_max": number("step_duration_max") or 0.0}
        evaluations, spikes = count("evaluations"), count("loss_spikes")
        # Not refused when infinite (a checkpoint of steps past the histogram's scale held one): carry_bound caps it.
        hang_bound = state.get("hang_bound")
        if isinstance(hang_bound, bool) or not isinstance(hang_bound, (int, float)):
            hang_bound = None
        last_evaluation = None
        if evaluations and state.get("last_eval_step") is not None:
            last_evaluation = Evaluation(evaluations, count("last_eval_step"), number("last_eval_time") or 0.0,
                                         number("last_eval_loss"), number("last_eval_accuracy"))
        detector = state.get("loss_spike_detector")
        if detector is not None:     # checked whole before anything is taken (a checkpoint from before has none)
            if not isinstance(detector, dict):
                raise ValueError("loss_spike_detector must be a mapping")
            probe = type(self.spikes)()
            probe.load_state_dict(detector)
        return {"taken": taken, "evaluations": evaluations, "spikes": spikes, "hang_bound": hang_bound,
                "last_evaluation": last_evaluation, "detector": detector, "phases": phases}

    def _take(self, checked: dict) -> None:
        """Take over a state _checked() passed: nothing in here refuses it."""
        taken, evaluations, spikes = checked["taken"], checked["evaluations"], checked["spikes"]
        hang_bound, last_evaluation, detector = checked["hang_bound"], checked["last_evaluation"], checked["detector"]
        phases = checked["phases"]
        for name, value in taken.items():
            setattr(self, name, value)
        self.evaluations = EvaluationHistory(first_index=evaluations + 1)
        self.last_evaluation = last_evaluation
        self.spikes.spikes = spikes
        if detector is not None:
            self.spikes.load_state_dict(detector)
        # What an OTLP push leaves out of the carried counters (it counts this process's own).
        self._carried_base = {inst.STEPS.name: self.steps, inst.SAMPLES.name: self.samples,
                              inst.CHECKPOINTS.name: self.checkpoints, inst.LOSS_NONFINITE.name: self.nonfinite_losses,
                              inst.LOSS_INTERVALS.name: self.loss_intervals, inst.EVALUATIONS.name: evaluations,
                              inst.LOSS_SPIKES.name: spikes}
        self._carried_phases = {phase: float(seconds) for phase, seconds in phases.items()}
        self.phases.load_state_dict(phases)
        if hang_bound is not None and self._stack_watch is not None:
            self._stack_watch.carry_bound(hang_bound)
        self._new_interval(time.perf_counter())
        self._carried_known_at = time.monotonic()

    # ----- lifecycle ---------------------------------------------------------------------------------
    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (None when not serving)."""
        return self._publication.port

    @property
    def metrics_url(self) -> str | None:
        """Where /metrics is served, as Prometheus is told (the address it listens on; None when not serving)."""
        return self._publication.url

    def collect(self) -> bytes:
        """The exposition text now, as a reader that does not count sees it."""
        return self._publication.collect()

    @_never_raises
    def wait_for_first_scrape(self, give_up: Callable[[], bool] = lambda: False) -> None:
        """When the job was announced to Prometheus, wait (up to the publication's linger timeout, or until
        give_up() holds) for a scrape that read the job's totals (a resumed process's after load_state_dict),
        so Prometheus holds the job from its first step. Once: start() waits unless this was called first (a
        multi-process job's ranks meet in between: both waits are init)."""
        if self._first_scrape_waited:
            return
        self._first_scrape_waited = True
        publication = self._publication
        if self._carried_known_at is None:            # resuming, but no checkpoint was found: a fresh start
            self._carried_known_at = time.monotonic()
        known_at = self._carried_known_at
        if publication.announced and self.start_time is None:
            if not publication.scrapers.wait(lambda: publication.scrapers.any_since(known_at),
                                             publication.publish.linger_timeout, give_up) and not give_up():
                log.warning("job %s: not scraped within %gs of announcing itself; starting anyway",
                            self.job_id, publication.publish.linger_timeout)

    @_never_raises
    def start(self, give_up: Callable[[], bool] = lambda: False) -> "JobMetrics":
        """Mark the job running: training starts (init is over), after wait_for_first_scrape(give_up)."""
        if self.ended:
            raise ValueError(f"the job already ended {self.state}: start() cannot run it again")
        if self.start_time is not None:      # started already (start(), then `with`): the loop's clock runs on
            return self
        # Steps counted before start() end their own interval: the new one began at start() with their losses
        # still held, and its mean took them in (trainer_loss 4 for an interval of losses of 1).
        self._log_interval()
        self.wait_for_first_scrape(give_up)
        if self.start_time is None:
            self.start_time = time.time()
        self.state = "running"
        self._loop_thread = threading.get_ident()
        self._last_step_end = time.perf_counter()
        self._new_interval(self._last_step_end)
        # The first step leaves the hot path to note the loop's thread (_reached_log_step): a loop on a thread of its
        # own is then the loop from its first step, not from its first log interval on.
        self._next_log_step = self.steps + 1
        self.phases.start_loop(self._last_step_end)
        return self

    @property
    def totals_known(self) -> bool:
        """False while a resuming job has not read its totals (steps, samples, checkpoints, evaluations) from its
        checkpoint, and for good when its restore failed: its series then publish none of them."""
        return self._carried_known_at is not None

    @property
    def ended(self) -> bool:
        """This process's run has ended (finish() or pause()): its state stays as it ended."""
        return self._end_monotonic is not None

    @_never_raises
    def set_state(self, state: str) -> None:
        """Move to a non-final state (queued, running, paused); final states go through finish()."""
        if state not in JOB_STATES or state in FINAL_STATES:
            raise ValueError(f"unknown or final state {state!r}; use finish() for final states")
        if self.ended:
            raise ValueError(f"the job already ended {self.state}: its state stays")
        if state == "running" and self.start_time is None:
            log.warning("job %s: set_state('running') before start(): call start() (the loop's clock, its start "
                        "time and its step times begin there; until then its time is init)", self.job_id)
        self.state = state

    @_never_raises
    def finish(self, state: str, error: BaseException | None = None) -> None:
        """Enter a final state (completed, failed, cancelled) and note the end time; a run that already ended
        (finish() or pause()) keeps its state."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state!r} is not a final state")
        if self.ended:      # finished, or paused: the run's state stays as it ended (the `with` block's end too)
            return
        self._log_interval()
        self.error_type = type(error).__name__ if error is not None and state == "failed" else None
        self._ended(state)

    @_never_raises
    def pause(self) -> None:
        """Mark the job paused before its process exits (it resumes later, from a checkpoint, in a new one).

        Like finish(), the state is held until every scraper has read it (close() lingers for it); a job that
        already ended stays as it ended."""
        if self.ended:
            return
        self._log_interval()
        self._ended("paused")

    def _ended(self, state: str) -> None:
        self.phases.end_loop(PAUSED if state == "paused" else ENDED)
        self._quiet_hang_timer()
        self.end_time = time.time()
        self.state = state
        self._end_monotonic = time.monotonic()

    def __enter__(self) -> "JobMetrics":
        try:
            # In the try: a stop signal once the first handler is taken raises in enter() (outside it, the block
            # never ended: its handlers never given back, no later block took SIGTERM).
            _BLOCK_SIGNALS.enter(self)
            if self.ended:
                raise ValueError(f"job {self.job_id} already ended {self.state}: a JobMetrics runs one job once")
            self.start()
            return self
        except BaseException as error:     # Ctrl-C or SIGTERM while waiting for the first scrape: the block never
            self.__exit__(type(error), error, error.__traceback__)      # begins, so end it here (files, handlers)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self._block_ending = True       # from here a stop signal only hurries the exit
        if exc_type is None:
            state = "completed"
        elif issubclass(exc_type, KeyboardInterrupt) or self._stop_signal is not None or _stopped_by_caller(exc_type):
            # After a stop signal, whatever ended the block came of the stop: DataLoader workers killed by the
            # same process-group SIGTERM make torch's SIGCHLD handler raise a RuntimeError in the loop.
            state = "cancelled"
        elif issubclass(exc_type, SystemExit) and exc.code in (0, None):     # sys.exit() that says success
            state = "completed"
        else:
            state = "failed"
        try:
            self.finish(state, exc)
        finally:
            try:
                if not self.ended:      # finish() cut short (a BaseException from elsewhere): the run still ends
                    self._ended(state)
                self.close()
            finally:
                _BLOCK_SIGNALS.leave(self)

    def cut_linger_short(self) -> None:
        """A stop signal during the final linger: wait for one scraper only, at most HURRIED_LINGER_SECONDS
        more; a second one stops the wait at once (close() then cleans up)."""
        if self._hurried_at is None:
            self._hurried_at = time.monotonic()
        else:
            self._linger_cut_short.set()

    def _hurried_enough(self) -> bool:
        """The linger was shortened by a signal, and one scraper has read the final state since the end, or
        the short wait is over, or another signal came."""
        hurried, end = self._hurried_at, self._end_monotonic
        if hurried is None:
            return False
        since = max(hurried, end) if end is not None else hurried     # a signal before the end: from the end
        return (self._linger_cut_short.is_set() or time.monotonic() - since >= HURRIED_LINGER_SECONDS
                or self._publication.scrapers.any_since(end))

    def final_state_read(self) -> bool:
        """True when the end has been read: some scraper scraped after it, and every active scraper did and
        has every evaluation."""
        end, scrapers = self._end_monotonic, self._publication.scrapers
        if end is None:
            return False
        # The count of a checkpoint written after the end and its moment, read together: read between the two,
        # the count's scrape took the count as read without it. A write still open on another thread (an
        # asynchronous writer's) will count into the final state: not read yet (one open on this thread, the
        # one that waits, cannot end meanwhile).
        with self._checkpoint_lock:
            writing, counted = self._checkpoints_writing, self._counted_after_end
            here = self._checkpoints_opened_on.get(threading.get_ident(), 0)
        if writing > here:
            return False
        end = max(end, counted or end)
        if not scrapers.any_since(end):
            return False
        return all(scrapers.delivered_since(scraper, end) and self.evaluations.complete_for(scraper)
                   for scraper in scrapers.active())

    @property
    def final_state_scraped(self) -> bool:
        """True once some scraper read the final state (a scrape begun after the end was delivered): the
        linger's verdict, for the result file. False, the job server publishes the end itself (Prometheus down
        through the whole linger never read it, and kept the job `running`, then `vanished`). One scraper is
        enough: an end the server published beside one that was read moves the job's end later."""
        end = self._end_monotonic
        return end is not None and self._publication.scrapers.any_since(end)

    def _linger(self, timeout: float) -> bool:
        """Wait up to `timeout` for every scraper to read the final state (final_state_read), or less when a
        stop signal hurried it; True when they did. An exception raised inside the wait by a signal handler
        (torch's SIGCHLD handler, when DataLoader workers die with the job) gave the wait up at once, the final
        state unread: the wait goes on."""
        deadline, said = time.monotonic() + timeout, False
        while True:
            try:
                return self._publication.scrapers.wait(self.final_state_read, max(0.0, deadline - time.monotonic()),
                                                       self._hurried_enough)
            except Exception as error:
                if not said:
                    said = True
                    log.warning("job %s: %s: %s raised during the final linger; it waits on", self.job_id,
                                type(error).__name__, error)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)        # (an exception that repeats must not spin)

    def close(self) -> None:
        """Linger until every scraper has read the final state (when announced), then remove the job's files
        and stop serving. Never raises; a second call does nothing. One never called runs as the interpreter
        exits (not after os._exit() or a kill)."""
        if self._closed:
            return
        self._closed = True
        _UNCLOSED.discard(self)
        if os.getpid() != self._owner_pid:
            # A forked child (its copy of this object): the endpoint, the files and the scrapers' connections
            # are the parent's, which goes on training and publishing.
            return
        try:
            self._flush_pending()
            publication = self._publication
            if self.start_time is not None and self._end_monotonic is None:
                log.warning("job %s: closed while %s, without finish() or pause(): Prometheus keeps its last state "
                            "until its series go stale (call finish(), or use `with JobMetrics(...)`)", self.job_id,
                            self.state)
            if publication.announced and self._end_monotonic is not None:
                timeout = publication.publish.linger_timeout
                if not self._linger(timeout):
                    if self._hurried_at is None:
                        log.warning("job %s: its final state was not read by every scraper within %gs; it may be "
                                    "missing from Prometheus", self.job_id, timeout)
                    else:       # (not "within 15s": the wait was cut short)
                        read = publication.scrapers.any_since(self._end_monotonic)
                        log.warning("job %s: stopped waiting for %s to read its final state on a stop signal",
                                    self.job_id, "the other scrapers (one read it)" if read else "every scraper")
        except Exception:
            log.exception("job %s: lingering for the final scrape failed", self.job_id)
        finally:
            if self._stack_watch is not None:     # kept: the last OTLP push reads its trainer_stack_dumps_total
                self._stack_watch.close()
            try:
                self._publication.shutdown()
            except Exception:
                log.exception("job %s: releasing the metrics endpoint failed", self.job_id)

    # ----- the hot path ------------------------------------------------------------------------------
    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, recording how long each batch took to arrive (data-loader wait): every wait
        on the loader is one, its start (iter(): a DataLoader starts its workers) in the first batch's and the
        wait that ends the pass (the loader joins its workers) one of its own. A wait that begins in a phase the
        loop marked (an evaluation's loader iterated in `phase("eval")`) is that phase's time, not data wait. A wait
        ends in the phase it began in: compute, or init before start() (the time is init's, so is the phase)."""
        clock, waits, pushed, phases = time.perf_counter, self.data_waits, self._pushed, self.phases
        began = clock()
        back = phases.mark[0]
        ours = back in LOOP_PHASES
        if ours:
            fed_by = self._fed_by
            if fed_by is None or (fed_by is not batches and fed_by is self._ended_pass):
                self._last_step_end = began     # the time between passes (an evaluation's) is no step's
            self._ended_pass = None
            phases.mark = (DATA, began, waits.sum, phases.mark[3])
        iterator = None
        while True:
            try:
                if iterator is None:
                    iterator = iter(batches)
                batch = next(iterator)
            except BaseException as error:      # the pass ended, or the loader failed: its wait was data wait
                if ours:
                    self._ended_pass = batches
                    self._waited_without_batch(began, back)
                if isinstance(error, StopIteration):
                    return
                raise
            if ours:
                arrived = clock()
                waited = arrived - began
                waits.observe(waited)
                phases.mark = (back, arrived, waits.sum, phases.mark[3])
                self._fed_by = batches
                if pushed:
                    self._buffer(self._pending_data_waits, waited)
            try:
                yield batch
            except GeneratorExit:       # the loop left the pass (a break, islice): it ended there, as a finished one
                # Unmarked, an evaluation over a loader's first batches, or a pass left at a stop, made the time up
                # to the next pass's first step that step's (its whole evaluation in one step's time).
                if self._fed_by is batches:
                    self._ended_pass = batches
                raise
            began = clock()
            back = phases.mark[0]
            ours = back in LOOP_PHASES
            if ours:
                phases.mark = (DATA, began, waits.sum, phases.mark[3])

    def _waited_without_batch(self, began: float, back: str) -> None:
        """A wait on the loader that brought no batch (the end of the pass, or its failure): data wait all the
        same; what follows it is not (it is `back`, the phase the wait began in)."""
        ended = time.perf_counter()
        waits, phases = self.data_waits, self.phases
        waits.observe(ended - began)
        phases.mark = (back, ended, waits.sum, phases.mark[3])
        if self._pushed:
            self._buffer(self._pending_data_waits, ended - began)

    def _buffer(self, pending: list[float], value: float) -> None:
        with self._pending_lock:
            pending.append(value)
            full = len(pending) >= PENDING_LIMIT
        if full:
            self._flush_pending()

    def step(self, loss=None, samples: int = 0) -> None:
        """Record one optimizer step. `loss` may be a tensor on any device: it is not read here.

        The hot path, written for its cost (~1 µs in a tight loop; 9-13 µs between a CPU model's torch ops, whose
        kernels leave its data out of cache: bench/README.md): no call it can avoid, every failure caught here
        (a metric call never raises)."""
        try:
            if self.state != "running" and not self._counts_outside_run():
                return
            now = time.perf_counter()
            last = self._last_step_end
            self._last_step_end = now
            self._fed_by = None
            phases = self.phases
            # Leaving the optimizer or a collective the loop marked; before start() the time is init's, and so
            # is the phase.
            if phases.mark[0] != COMPUTE and phases.loop_began is not None:
                phases.enter(COMPUTE, now)
            phases.last_step = phases.progress = now
            # The step is counted before its time: a scrape reads the histogram first, then the steps, so its count
            # never exceeds them (counted after, a scrape at the call to enter() above read count = steps + 1).
            self.steps += 1
            if last is not None:
                duration = now - last
                if duration > self.step_duration_max:
                    self.step_duration_max = duration
                self.step_times.observe(duration)
                if self._pushed:
                    self._buffer(self._pending_step_durations, duration)
            if samples.__class__ is int and samples >= 0:
                self.samples += samples
            else:       # a counter only grows, and by whole samples: one NaN would stay in it for good
                self._odd_samples(samples)
            if loss is not None:
                losses = self._losses
                if getattr(loss, "is_cpu", False):      # a CPU tensor: read now, no sync to avoid, no tensor kept
                    try:
                        value = loss.item()
                    except RuntimeError:
                        if loss.numel() != 1:           # refused in the words the other devices' losses are
                            raise TypeError(f"a loss of {loss.numel()} values (reduce it to one)") from None
                        raise
                    if value.__class__ is bool:          # a tensor of bools: True would be a loss of 1
                        raise TypeError("a bool is not a loss")
                    pending = losses.floats
                    pending.append(value)
                elif hasattr(loss, "detach"):            # on an accelerator: copied, read once per interval
                    if _is_bool(loss):
                        raise TypeError("a bool is not a loss")
                    if loss.numel() != 1:                # metadata, no sync: refused as on the CPU (.item())
                        raise TypeError(f"a loss of {loss.numel()} values (reduce it to one)")
                    pending = losses.tensors
                    # A copy on the device (one asynchronous kernel, no sync): the loop may overwrite its tensor
                    # after the step (a CUDA graph's static output, replayed by torch.compile's reduce-overhead).
                    pending.append(loss.detach().clone())
                else:
                    if _is_bool(loss):                   # numpy's too: True would be a loss of 1
                        raise TypeError("a bool is not a loss")
                    if isinstance(loss, (str, bytes)):                   # float("2.0") would read it
                        raise TypeError("text is not a loss")
                    pending = losses.floats
                    pending.append(loss if loss.__class__ is float else float(_one_value(loss, "a loss")))
                losses.count += 1
                if len(pending) >= LOSS_FOLD_LIMIT:      # an endless interval still holds a bounded list
                    losses.fold()
            if self.steps >= self._next_log_step:
                self._reached_log_step()
        except Exception as error:
            self._step_failed(error, loss, samples)
            if self.steps >= self._next_log_step:       # the step counted: its interval still ends on time
                self._reached_log_step()

    def _reached_log_step(self) -> None:
        """step() at _next_log_step: the loop's thread noted (a loop on another thread than start()'s: its own
        checkpoint() blocks are the loop's, not an asynchronous writer's), and the log interval ended when it is due;
        the first step after start() comes here for its thread alone."""
        self._loop_thread = threading.get_ident()
        due = self._interval_start[1] + self.log_every
        if self.steps >= due:
            self._log_interval()
        else:
            self._next_log_step = due

    def _finite_float(self, value, what: str, said_if_not_finite: bool = False) -> float | None:
        """value as a finite float, or None (None, NaN, infinity, or not a number at all: said once per kind of
        value, as README promises; a loop passing one every interval would fill the log). A NaN or infinite
        number is said only where asked (an evaluation's is a diverged model's result: eval() leaves it out)."""
        if value is None:
            return None
        try:
            number = _as_float(value)
        except (TypeError, ValueError):
            self._said_once(what, f"ignoring {what} that is not a number: {value!r}")
            return None
        if not math.isfinite(number) and said_if_not_finite:
            self._said_once(f"{what} not finite", f"ignoring {what} of {number!r}")
        return number if math.isfinite(number) else None

    def _said_once(self, kind: str, message: str) -> None:
        if kind not in self._warned_values:
            self._warned_values.add(kind)
            log.warning("job %s: %s (such values are ignored; not said again)", self.job_id, message)

    def _counts_outside_run(self) -> bool:
        """step() when the job is not running: after the run ended (finish(), pause()) the step is not counted
        (the job's totals and its end stay as published); before start() it is, the job still `queued`. Said
        once."""
        ended = self.ended
        if ended:
            self.phases.keep_ended()
        if not self._warned_outside_run:
            self._warned_outside_run = True
            log.warning("job %s: step() while the job is %s: %s", self.job_id, self.state,
                        "not counted (the run ended)" if ended else "counted" if self.start_time is not None else
                        "counted, but call start() first (the job shows as waiting until then and the time as init)")
        return not ended

    def _odd_samples(self, samples) -> None:
        """step()'s samples when not a plain non-negative int: another integer type (numpy's, a 0-d integer
        tensor) or a whole float (8.0) counts; a negative number, a fraction, NaN, a bool or anything else is left
        out, said once."""
        try:
            count = _whole_count(samples)
        except (TypeError, ValueError) as error:
            self._step_failed(error, None, samples)
            return
        self.samples += count

    def _step_failed(self, error: Exception, loss, samples) -> None:
        """A bad value in step(): say so once, go on."""
        if not self._warned_bad_step:
            self._warned_bad_step = True
            log.warning("job %s: step() got a value it cannot use (%s: %s; loss %r, samples %r); such values "
                        "are ignored", self.job_id, type(error).__name__, error, loss, samples)

    # ----- once per log interval / eval / checkpoint ---------------------------------------------------
    @_never_raises
    def end_interval(self) -> None:
        """End the current log interval now (before a checkpoint: its state then holds every loss so far)."""
        self._log_interval()

    def _new_interval(self, now: float) -> None:
        # (time, steps, samples, seconds in eval and checkpoint) at its start
        self._interval_start = (now, self.steps, self.samples, self.phases.outside_training(now))
        self._next_log_step = self.steps + self.log_every

    def _log_interval(self) -> None:
        """End the log interval: its losses read (the one device sync per interval), its figures published,
        on_log called. A stop signal while the losses are read is raised once they are counted: on an
        accelerator that read is where the loop waits, and the interval was lost."""
        self._reading_interval = True
        try:
            stats = self._close_interval()
        finally:
            self._reading_interval = False
        held, self._held_stop = self._held_stop, None
        if held is not None:
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt(f"signal {signal.Signals(held).name}")
            # A loop on a thread of its own: the signal goes where it would have gone unheld, to the `with` block's
            # (main) thread, whose handler raises there. Raised here it ended the loop's thread alone, and the block,
            # waiting for it, ended `completed`.
            _thread.interrupt_main(held)
        if stats is not None and self.on_log:
            try:
                self.on_log(stats)
            except Exception:
                self._interval_failed()

    def _interval_failed(self) -> None:
        # Telemetry must never break the training loop (said once: it fails every interval).
        if not self._warned_interval:
            self._warned_interval = True
            log.exception("job %s: metrics log interval failed (further failures are not logged)", self.job_id)

    def _close_interval(self) -> IntervalStats | None:
        """The interval's figures, counted into the job's; None when it had no step (or failed)."""
        try:
            now = time.perf_counter()
            began, steps_before, samples_before, outside_before = self._interval_start
            if self.steps == steps_before:
                return None
            try:
                loss = self._losses.mean()
            except Exception:       # a read that fails: its losses are gone, the next interval starts (read
                self._new_interval(now)     # again at every step, they piled up and slowed every step)
                raise
            self._new_interval(now)  # after the read: an interrupted one leaves the interval to finish()
            if loss is not None:
                self.last_loss = loss
                if math.isfinite(loss):
                    # Judged by its length: one a checkpoint or the run's end cut short has a noisier mean. In
                    # steps, not losses: a loop passing its loss every few steps (loss=None between) has fewer
                    # in each full interval too, and those were judged as cut short (a spread √k too wide).
                    spike = self.spikes.observe(loss, (self.steps - steps_before) / self.log_every)
                    self.loss = loss
                    if self.loss_first is None:
                        self.loss_first = loss
                    self.loss_min = loss if self.loss_min is None else min(self.loss_min, loss)
                    total, intervals = self._loss_totals
                    self._loss_totals = (total + loss, intervals + 1)     # one store: a scrape sees both or neither
                    if spike:       # after the interval is counted: a callback that raises loses nothing
                        self.process_loss_spikes += 1
                        self._loss_spike(loss)
                else:
                    self.nonfinite_losses += 1
                    self.process_nonfinite_losses += 1
                    if self.diagnostics.on_loss_spike is not None:     # diverged: worse than a spike
                        self._tell_loss_spike("non-finite loss")
            # Training throughput: an evaluation or checkpoint inside the interval is not its time.
            elapsed = max(now - began - (self.phases.outside_training(now) - outside_before), 1e-9)
            throughput = (self.samples - samples_before) / elapsed
            mfu = None
            # An interval that counted no samples (step() without them) measured no FLOPs: its utilisation is
            # unknown, not 0 (published as 0, a loop that never passed samples read as an idle device).
            if self.flops_per_sample and self.peak_flops and self.samples > samples_before:
                mfu = self.mfu = throughput * self.flops_per_sample / self.peak_flops
            if self._cuda:
                import torch

                self.gpu_memory_peak = torch.cuda.max_memory_allocated(self._cuda_index)
            return IntervalStats(self.steps, self.samples, loss, throughput, mfu)
        except Exception:
            self._interval_failed()
            return None

    @_never_raises
    def set_epoch(self, epoch: int) -> None:
        """Publish the current epoch: a whole number >= 0 (8.0 and numpy's integers too); anything else (2.7 was
        published as 2) is left out, said once."""
        try:
            self.epoch = _whole_count(epoch)
        except (TypeError, ValueError) as error:
            if not self._warned_epoch:
                self._warned_epoch = True
                log.warning("job %s: set_epoch() got %r (%s): the epoch stays %s", self.job_id, epoch, error,
                            self.epoch)

    @_never_raises
    def set_learning_rate(self, lr: float) -> None:
        """Publish the current learning rate (a NaN or infinite one is left out, said once)."""
        value = self._finite_float(lr, "a learning rate", said_if_not_finite=True)
        if value is not None:
            self.learning_rate = value

    @_never_raises
    def eval(self, loss: float | None = None, accuracy: float | None = None) -> Evaluation | None:
        """Record an evaluation (accuracy as a 0..1 ratio). Each one reaches every scraper, in order, however
        fast they come (the eval history series); non-finite values are left out. One after the run's end
        (finish(), pause(): the final model's evaluation on a test set) is recorded as well, and the final linger
        waits for it to be read, as for a checkpoint written then."""
        loss = self._finite_float(loss, "an evaluation loss")
        accuracy = self._finite_float(accuracy, "an evaluation accuracy")
        if accuracy is not None and not 0.0 <= accuracy <= 1.0:     # 95 for 95 %: it would be the max for good
            self._said_once("an accuracy out of range", f"ignoring an accuracy of {accuracy!r}: a ratio from 0 to "
                                                       f"1 is expected")
            accuracy = None
        if loss is not None:
            self.eval_loss_min = loss if self.eval_loss_min is None else min(self.eval_loss_min, loss)
        if accuracy is not None:
            self.eval_accuracy_max = accuracy if self.eval_accuracy_max is None else max(self.eval_accuracy_max,
                                                                                           accuracy)
        self.last_evaluation = self.evaluations.add(self.steps, time.time(), loss, accuracy)
        return self.last_evaluation

    @contextmanager
    def checkpoint(self):
        """Time a checkpoint write (the checkpoint phase); counts it only when the block succeeds. On a thread other
        than the loop's (an asynchronous save's writer) the write is counted and timed but is no phase of the loop,
        which trains on meanwhile: the loop's phase, its step times and trainer_checkpointed_seconds are left alone
        (a writer's block took the rest of an evaluation it began in as checkpoint time, cut one it ended in short,
        and took its time off the loop's step in progress). One that ends after the run's end (finish(), pause()) is
        counted and timed too, its time in no phase (the job's clock stopped at the end), and the final linger waits
        for one open on another thread to end and for a scrape that reads its count."""
        began = time.perf_counter()
        in_loop = threading.get_ident() == self._loop_thread
        previous = self.phases.phase
        if in_loop:
            self.phases.enter(CHECKPOINT, began)
            self._quiet_hang_timer()
        opener, opened = threading.get_ident(), self._checkpoints_opened_on
        with self._checkpoint_lock:
            self._checkpoints_writing += 1
            opened[opener] = opened.get(opener, 0) + 1
        written = False
        try:
            yield
            written = True
        finally:
            seconds = time.perf_counter() - began
            with self._checkpoint_lock:     # one change: a state_dict() meanwhile counts the write once
                self._checkpoints_writing -= 1
                if opened[opener] > 1:
                    opened[opener] -= 1
                else:
                    del opened[opener]
                if written:
                    self.checkpoints += 1
                    self.checkpoint_durations.observe(seconds)
                    if self.ended:      # part of the final state: the linger waits for a scrape that reads it
                        self._counted_after_end = time.monotonic()
            if in_loop:
                self.phases.enter(_resumed_phase(previous))
                # The time spent checkpointing is not a training step's time, nor is a write that failed (a loop
                # that goes on after it timed the failed write as its next step).
                self._leave_out_of_step(began, previous)
        try:
            if self._checkpoint_duration is not None:
                self._checkpoint_duration.record(seconds)
            if in_loop:
                self.phases.checkpointed = sum(self.phases.totals().values())
        except Exception:
            log.exception("job %s: recording a checkpoint failed", self.job_id)

    @contextmanager
    def phase(self, name: str):
        """Mark a part of the loop as its own phase: "eval", "optimizer", "collective" (docs/metrics.md), or
        "restore" before training starts. Time outside every marked phase and the data wait is compute."""
        began, previous = time.perf_counter(), self.phases.phase
        markable = isinstance(name, str) and (name in MARKED_PHASES or name == COMPUTE)
        if not markable and repr(name) not in self._warned_phases:     # a typo would hide in compute
            self._warned_phases.add(repr(name))
            log.warning("job %s: phase %r is none of %s: its time counts as compute", self.job_id, name,
                        ", ".join(MARKED_PHASES))
        self.phases.enter(name if markable else COMPUTE)
        if self.phases.phase not in TRAINING_LOOP_PHASES:     # (eval, checkpoint, restore)
            self._quiet_hang_timer()
        try:
            yield
        finally:
            self.phases.enter(_resumed_phase(previous))
            if markable and name in (EVAL, CHECKPOINT):     # nor is an evaluation or a wait for rank 0's write
                self._leave_out_of_step(began, previous)

    def _quiet_hang_timer(self) -> None:
        """The loop leaves its phases (no hang from now): the watchdog's timer must not write the stacks of this
        phase as a hang's before its next check, which a phase that holds the GIL keeps from running."""
        if self._stack_watch is not None:
            self._stack_watch.quiet()

    def _leave_out_of_step(self, began: float, previous: str) -> None:
        """An evaluation or checkpoint (or the wait for rank 0's) that began at `began` is not a training step's
        time: the step in progress is timed without it, and keeps what came before it (its data wait and
        compute, where the loop evaluates or checkpoints before its step() call). Restarting the step's clock at
        its end timed such a step from there: ~0 s, its data wait counted but not its time. One nested in
        another (a checkpoint inside an evaluation) is left out by the outer one."""
        last = self._last_step_end
        if last is None or previous in (EVAL, CHECKPOINT):
            return
        # From the later of its start and the step clock's (a step() inside the block restarted it there).
        self._last_step_end = last + (time.perf_counter() - max(began, last))

    def _loss_spike(self, loss: float) -> None:
        log.warning("job %s: loss spike at step %d: %.4g against a running mean of %.4g", self.job_id, self.steps,
                    loss, self.spikes.mean)
        if self.diagnostics.on_loss_spike is not None:
            self._tell_loss_spike("loss spike")

    def _tell_loss_spike(self, what: str) -> None:
        """The job's on_loss_spike callback: one that raises loses nothing of the interval (its on_log call, its
        throughput), said once as any failure of the interval's figures is."""
        try:
            self.diagnostics.on_loss_spike(self.steps, what)
        except Exception:
            self._interval_failed()


def _whole_count(value) -> int:
    """`value` as a count: an int of any integer type (numpy's, a 0-d integer tensor) or a whole float of any type
    (8.0, numpy's float32, a 0-d float tensor: a mask's sum);
    TypeError or ValueError for a bool, a fraction, a negative number, NaN or anything else."""
    if _is_bool(value):
        raise TypeError("a bool")
    if isinstance(value, (str, bytes)):          # float("8") would read it
        raise TypeError("text")
    value = _one_value(value, "a count")         # np.array([32]), as a tensor of one element counts
    try:
        count = operator.index(value)
    except TypeError:       # a float of any type: numpy's float32, a 0-d float tensor (a mask's sum)
        try:
            number = float(value)
        except (RuntimeError, ValueError) as error:     # a tensor of several elements
            raise TypeError(str(error)) from None
        if not number.is_integer():
            raise ValueError("not a whole number") from None
        count = int(number)
    if count < 0:
        raise ValueError("a negative count")
    return count


def _cuda_index(device: str) -> int | None:
    """The index of the GPU a device label names (`cuda:1`: 1); None for the current one (`cuda`, or a label that
    names no GPU of torch's)."""
    match = re.fullmatch(r"cuda:([0-9]+)", device)      # ([0-9]: \d takes every script's digits)
    return int(match.group(1)) if match else None


def _stopped_by_caller(exc_type: type) -> bool:
    """The block was stopped by the code that ran it, no error of its own: a generator training in the block closed
    by its consumer (a `break`, or collected: GeneratorExit), or an asyncio task running it cancelled. Both ended the
    job `failed`, error_type GeneratorExit or CancelledError, and a failure alert for a loop that was only stopped."""
    if issubclass(exc_type, GeneratorExit):
        return True
    asyncio = sys.modules.get("asyncio")        # not imported: nothing raised its CancelledError
    return asyncio is not None and issubclass(exc_type, asyncio.CancelledError)


def _one_of(current: str, names: tuple[str, ...]) -> list[tuple[str, int]]:
    """1 for `current`, 0 for the other names: read once by the caller, so that a scrape while it changes shows
    one of them at 1, not two or none."""
    return [(name, int(name == current)) for name in names]


def _resumed_phase(previous: str) -> str:
    """The phase to go back to when a marked one ends: the one it was marked in (init before training, an
    evaluation around a collective), compute where the loop was waiting for data."""
    return COMPUTE if previous == DATA else previous


def _is_bool(value) -> bool:
    """True for a bool, numpy's bool_, or a tensor or array of bools: float() reads True as 1, no measure of
    anything."""
    if value.__class__.__name__ in ("bool", "bool_"):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype) in ("torch.bool", "bool")


def _as_float(value) -> float:
    """value as a float; TypeError or ValueError when it is no number (a bool or text is none)."""
    if _is_bool(value):
        raise TypeError("a bool")
    if isinstance(value, (str, bytes)):       # float("0.5") would read it (step() refuses text too)
        raise TypeError("text")
    return float(_one_value(value, "an array"))


def _one_value(value, what: str):
    """value, or the one number of a numpy array of one element (np.array([0.5]), a one-element tensor's .numpy()),
    read as a tensor of one element is: float() refuses it (numpy 2.4; 1.25 to 2.3 warn). TypeError for an array of
    more, in the words step() refuses a tensor's. Duck-typed (an integer `size` and item()), numpy not imported."""
    size = getattr(value, "size", None)
    if size.__class__ is not int or not hasattr(value, "item"):     # a tensor's size is a method (float() reads it)
        return value
    if size != 1:
        raise TypeError(f"{what} of {size} values (reduce it to one)")
    number = value.item()
    if isinstance(number, (str, bytes)):        # np.array(["0.5"]): float() would read it
        raise TypeError("text")
    return number
