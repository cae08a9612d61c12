"""Where a job's time goes and what it watches in itself: the phase clock, loss spikes, the hang watchdog and
the stacks signal, and the faults used to drill them. Real loops, real training, real signals."""

import bisect
import contextlib
import errno
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainmetrics.trainer import faults
from trainmetrics.trainer.metrics import Diagnostics, JobMetrics
from trainmetrics.trainer.spikes import LossSpikeDetector


def loop(metrics: JobMetrics, steps: int, data_seconds: float = 0.0, compute_seconds: float = 0.0):
    """A training loop of sleeps: each batch takes data_seconds to arrive and compute_seconds to train."""
    def batches():
        for _ in range(steps):
            time.sleep(data_seconds)
            yield None

    for _ in metrics.timed(batches()):
        time.sleep(compute_seconds)
        metrics.step(loss=1.0, samples=1)


def test_the_phases_add_up_to_the_process_life_and_each_phase_is_where_its_time_went():
    metrics = JobMetrics("phases-job", log_every=5)
    try:
        metrics.start()
        started = time.time()
        loop(metrics, 10, data_seconds=0.02, compute_seconds=0.01)
        with metrics.phase("eval"):
            time.sleep(0.15)
        with metrics.checkpoint():
            time.sleep(0.1)
        loop(metrics, 5, compute_seconds=0.01)
        before = time.time() - metrics.phases.process_start
        totals = metrics.phases.totals()
        after = time.time() - metrics.phases.process_start
    finally:
        metrics.close()
    # The process's age read just before and after: a loaded host's preemption between two reads is no error.
    assert before - 0.005 <= sum(totals.values()) <= after + 0.005, (before, totals, after)
    # A sleep may overrun on a loaded host (a run beside other tests failed at 0.02), never fall short.
    assert 10 * 0.02 - 0.005 <= totals["data_wait"] <= 10 * 0.02 + 0.05
    assert 0.15 - 0.005 <= totals["eval"] <= 0.15 + 0.05
    assert 0.1 - 0.005 <= totals["checkpoint"] <= 0.1 + 0.05
    assert totals["compute"] == pytest.approx(15 * 0.01, abs=0.05)
    # From the clock's start (the process's for its first job, else the job's creation) to the loop's.
    assert totals["init"] == pytest.approx(started - metrics.phases.process_start, abs=0.02)


def test_published_totals_never_fall_and_a_checkpoint_carries_them_into_the_next_process():
    first = JobMetrics("carried-job")
    try:
        first.start()
        loop(first, 5, compute_seconds=0.01)
        seen = [first.phases.totals() for _ in range(3)]
        state = first.state_dict()
    finally:
        first.close()
    assert all(later[name] >= earlier[name] for earlier, later in zip(seen, seen[1:]) for name in later)
    second = JobMetrics("carried-job")
    try:
        second.load_state_dict(state)
        resumed = second.phases.totals()
    finally:
        second.close()
    # Everything the first process counted, plus the second's own age so far (its init).
    assert resumed["compute"] == pytest.approx(state["phases"]["compute"])
    assert resumed["init"] > state["phases"]["init"]


def test_a_run_that_ends_before_its_first_step_stops_its_clock_at_its_end():
    """A restore that fails or a cancel in init: the run's init ends with it, not with its final linger."""
    metrics = JobMetrics("ended-in-init")
    try:
        with metrics.phase("restore"):
            time.sleep(0.05)
        metrics.finish("failed", RuntimeError("the checkpoint does not fit"))
        at_end = metrics.phases.totals()
        time.sleep(0.2)                     # the linger, waiting for the final scrape
        later = metrics.phases.totals()
    finally:
        metrics.close()
    assert at_end["restore"] == pytest.approx(0.05, abs=0.02)
    assert later == at_end


def test_the_current_phase_and_the_last_progress_follow_the_loop():
    metrics = JobMetrics("where-job")
    try:
        assert metrics.phases.phase == "init" and metrics.phases.progress_unix() is None
        metrics.start()
        loop(metrics, 3, compute_seconds=0.01)
        after_steps = metrics.phases.progress_unix()
        assert metrics.phases.last_step_unix() == after_steps
        with metrics.phase("eval"):
            assert metrics.phases.phase == "eval"
            time.sleep(0.05)
        assert metrics.phases.phase == "compute"
        # The end of an evaluation is progress (the hang clock starts again), not a step.
        assert metrics.phases.progress_unix() > after_steps == metrics.phases.last_step_unix()
        metrics.finish("completed")
        assert metrics.phases.phase == "ended"
    finally:
        metrics.close()


def test_published_times_follow_a_wall_clock_stepped_after_the_start(monkeypatch):
    """perf_counter readings were published as unix times with the offset of the clock's creation: a wall clock
    stepped later (an NTP correction, a suspended VM's clock catching up) left every progress timestamp that far
    behind Prometheus's time() for the rest of the run, and TrainerHang fired on a healthy job (time() - the last
    progress > 60 s at every step). The phase totals do not move with it."""
    from trainmetrics.trainer.phases import PhaseClock

    clock = PhaseClock()
    now = time.perf_counter()
    clock.start_loop(now)
    totals = clock.totals()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 120.0)        # the wall clock stepped 2 minutes ahead
    clock.last_step = clock.progress = time.perf_counter()
    assert abs(clock.progress_unix() - time.time()) < 5.0
    assert abs(clock.last_step_unix() - time.time()) < 5.0
    after = clock.totals()
    assert after["init"] == pytest.approx(totals["init"], abs=1.0)
    assert sum(after.values()) == pytest.approx(sum(totals.values()), abs=1.0)


def test_a_phase_change_dated_before_a_collection_never_makes_the_totals_outrun_the_process():
    """The loop dates a phase change from a clock read before its store (a checkpoint from its start): a
    collection between the two counted that time as compute, the new mark then gave it to the checkpoint, and
    compute, held at what was published, kept it too: the totals added up to more than the process had lived, for
    good (3.8 ms; the loop preempted between its read and its store on a busy host). Found as a flaky
    test_scrapes_while_phases_change_never_count_more_than_the_process_lived."""
    from trainmetrics.trainer.phases import CHECKPOINT, COMPUTE, PhaseClock

    clock = PhaseClock()
    clock.start_loop(time.perf_counter())

    def ahead() -> float:       # the totals less the process's age, by the clock's own offset
        return sum(clock.totals().values()) - (clock._start_epoch + time.perf_counter() - clock.process_start)

    # Each reading is low by however long this thread was preempted between the totals and the clock read (4 ms on
    # a loaded host made the baseline 4 ms low): the highest of a few is the baseline.
    at_start = max(ahead() for _ in range(5))
    time.sleep(0.02)
    began = time.perf_counter()              # the checkpoint's start, read...
    time.sleep(0.05)
    collected = clock.totals()               # ...a collection...
    clock.enter(CHECKPOINT, began)           # ...then the store
    time.sleep(0.01)
    clock.enter(COMPUTE)
    assert ahead() <= at_start + 1e-3
    assert all(seconds >= collected[name] for name, seconds in clock.totals().items())    # none went back
    time.sleep(0.1)                           # once compute has grown back past its published total: exact
    totals = clock.totals()
    assert totals["checkpoint"] == pytest.approx(clock.mark[3][CHECKPOINT], abs=1e-9)
    assert ahead() <= at_start + 1e-3


def test_a_loss_jump_is_a_spike_a_falling_noisy_loss_is_not_and_a_spike_does_not_hide_the_next():
    detector = LossSpikeDetector(z=6.0, warmup=10)
    losses = [2.0 * 0.97 ** i + 0.02 * ((-1) ** i) for i in range(60)]
    assert not any(detector.observe(loss) for loss in losses)
    assert detector.observe(losses[-1] + 5.0)              # far above the running mean
    assert not detector.observe(losses[-1])                # back to normal
    assert detector.observe(losses[-1] + 5.0)              # the first spike did not widen the spread
    assert detector.spikes == 2
    early = LossSpikeDetector(z=6.0, warmup=10)
    assert not any(early.observe(loss) for loss in [1.0] * 5 + [100.0])     # still warming up


def test_a_spike_in_the_warmup_does_not_blind_the_detector_to_the_next_and_survives_a_resume():
    """A bad first shard: its interval entered the running variance, and a second spike of the same size went
    unflagged for 25 intervals past the warm-up (the trainer's own interval losses of such a run)."""
    losses = [2.3 * 0.98 ** i + 0.02 * ((-1) ** i) for i in range(40)]
    detector = LossSpikeDetector(z=6.0, warmup=10)
    assert not detector.observe(32.5)                      # the first interval: nothing to judge it by yet
    assert not any(detector.observe(loss) for loss in losses[:12])
    resumed = LossSpikeDetector(z=6.0, warmup=10)
    resumed.load_state_dict(detector.state_dict())
    for watching in (detector, resumed):
        assert watching.observe(32.5) and watching.spikes == 1
    # Mid warm-up, carried over a checkpoint: the resumed process starts from the same warm-up intervals.
    half, carried = LossSpikeDetector(z=6.0, warmup=10), LossSpikeDetector(z=6.0, warmup=10)
    for loss in [32.5, *losses[:4]]:
        half.observe(loss)
    carried.load_state_dict(half.state_dict())
    assert [half.observe(loss) for loss in [*losses[4:12], 32.5]] == \
        [carried.observe(loss) for loss in [*losses[4:12], 32.5]] == [False] * 8 + [True]


def test_a_loss_that_falls_fast_in_its_warmup_leaves_the_detector_watching_at_its_level():
    """A loss falling from 10 to 2.5 in its 10 warm-up intervals (a language model's first minutes), its interval
    means +- 0.014: the detector learnt its running mean and spread from the warm-up in order, from the first
    interval on, so it started at a mean of 5.5 and a spread of 2.8 (the fall, not the wobble): a rise to 10 was
    below the 22 a spike took, and was no spike for the 24 intervals after the warm-up."""
    import random

    rng = random.Random(0)
    metrics = JobMetrics("falling-warmup", log_every=50)
    try:
        metrics.start()
        for step in range(1, 15 * 50 + 1):          # 10 warm-up intervals, then 5 watched ones
            metrics.step(loss=2.0 + 8.0 * math.exp(-step / 150) + rng.gauss(0.0, 0.1), samples=1)
        assert metrics.spikes.spikes == 0           # a falling loss is no spike
        for _ in range(50):
            metrics.step(loss=10.0 + rng.gauss(0.0, 0.1), samples=1)
        assert metrics.spikes.spikes == 1
        for step in range(1, 20 * 50 + 1):          # back at its level: no spike, and none in the noise after
            metrics.step(loss=2.0 + rng.gauss(0.0, 0.1), samples=1)
        assert metrics.spikes.spikes == 1
        metrics.finish("completed")
    finally:
        metrics.close()


def test_a_lasting_rise_that_falls_back_is_watched_at_its_level_once_learnt():
    """A learning-rate restart: the loss jumps from 2 to 6 and falls back towards 3. Its 10 intervals in a row are
    the new level, learnt again in order from the first (6): 5 intervals later the running mean was 4.1 and the
    deviation 1.2, and the loss doubling from 3.1 to 6.1 was no spike (nor 15 intervals later)."""
    detector = LossSpikeDetector(z=6.0, warmup=10)
    assert not any(detector.observe(2.0 + 0.01 * ((-1) ** i)) for i in range(40))
    restart = [3.0 + 3.0 * math.exp(-i / 4) + 0.01 * ((-1) ** i) for i in range(15)]
    assert [detector.observe(loss) for loss in restart] == [True] * 10 + [False] * 5
    assert detector.observe(2 * restart[-1])


def test_a_lasting_rise_is_flagged_for_warmup_intervals_then_learnt_as_the_new_level():
    # Before, every interval after a lasting shift (a new data mix, a learning-rate restart) was a spike until
    # the job ended: a warning per interval and TrainerLossSpike firing for ever.
    detector = LossSpikeDetector(z=6.0, warmup=10)
    assert not any(detector.observe(1.0 + 0.01 * ((-1) ** i)) for i in range(40))
    shifted = [3.0 + 0.01 * ((-1) ** i) for i in range(60)]
    flagged = [detector.observe(loss) for loss in shifted]
    assert flagged[:10] == [True] * 10 and not any(flagged[10:])
    assert detector.spikes == 10
    assert 2.9 < detector.mean < 3.1
    assert detector.observe(8.0)                           # a spike above the new level is still caught


def test_a_loss_with_no_spread_is_judged_against_a_floor_relative_to_its_level():
    """A loss flat to the last digit (0.0 on a memorised set, a frozen model) had spread 0: no jump after it was a
    spike. A warm-up mostly flat had a median deviation of 0: its values above the median were dropped as outliers
    and a rise of 1 in 10,000 was a spike (and paused a job that asked)."""
    flat = LossSpikeDetector(z=6.0, warmup=10)
    assert not any(flat.observe(0.0) for _ in range(12))
    assert flat.observe(50.0)
    wobbling = LossSpikeDetector(z=6.0, warmup=10)
    for value in [2.0] * 6 + [2.0001] * 4:
        wobbling.observe(value)
    assert not any(wobbling.observe(value) for value in (2.0001, 2.0, 2.0002, 2.0, 2.0003))
    assert wobbling.observe(2.5)


def test_a_loss_of_huge_magnitude_leaves_the_detector_finite_watching_and_its_state_loadable():
    """A finite loss of -1e200 (learnt: only rises are spikes) squared past a float: the running variance became
    infinite for good, no later spike was flagged, and a resume refused the checkpoint's state whole (its steps,
    samples and counts back to 0). Losses of 1e308 and -1e308 in one warm-up made the running mean infinite."""
    first = JobMetrics("huge-loss", log_every=1)
    first.start()
    for step in range(30):
        first.step(loss=1.0 + 0.01 * (step % 3), samples=1)
    first.step(loss=-1e200, samples=1)
    for step in range(20):      # back at 1: a rise above -1e200, flagged until learnt as the level again
        first.step(loss=1.0 + 0.01 * (step % 3), samples=1)
    flagged = first.spikes.spikes
    first.step(loss=100.0, samples=1)
    assert first.spikes.spikes == flagged + 1
    saved = json.loads(json.dumps(first.state_dict()))
    first.pause()
    first.close()
    second = JobMetrics("huge-loss", log_every=1)
    second.load_state_dict(saved)
    assert second.steps == 52
    second.start()
    second.step(loss=100.0, samples=1)
    assert second.spikes.spikes == flagged + 2
    second.close()
    extremes = LossSpikeDetector(z=6.0, warmup=10)
    for loss in [-1e308] * 5 + [1e308] * 5:
        extremes.observe(loss)
    assert math.isfinite(extremes.mean) and math.isfinite(extremes.deviation)
    LossSpikeDetector().load_state_dict(extremes.state_dict())


def test_a_loss_whose_wobble_squares_past_a_float_is_no_spike_every_interval():
    """The running variance squared the losses' deviations: for losses near 1e200 wobbling by 1 % (2e198, squared
    past a float) it saturated at a float's largest, a standard deviation of 1e154, and half the intervals of a
    steady loss were spikes. A checkpoint from before (its variance alone) still loads."""
    detector = LossSpikeDetector(z=6.0, warmup=10)
    steady = [1e200 * (1.0 + 0.01 * ((-1) ** i)) for i in range(60)]
    assert [step for step, loss in enumerate(steady) if detector.observe(loss)] == []
    assert detector.observe(1.5e200)                       # a rise of 50 % still is one
    older = {key: value for key, value in detector.state_dict().items() if key != "deviation"}
    resumed = LossSpikeDetector(z=6.0, warmup=10)
    resumed.load_state_dict({**older, "variance": 4.0})
    assert resumed.deviation == 2.0


def test_an_interval_far_below_the_loss_neither_hides_the_next_spike_nor_makes_its_return_one():
    """A drop is learnt (only rises are spikes), and was learnt whole: one interval at 0 (a shard of padding) in a
    loss of 2.0 +- 0.02 widened the spread to 0.6, and a rise to 3.0 ten intervals later went unflagged. One at -10
    pulled the running mean to 0.8: the loss's return to 2.0 was a spike for 10 intervals."""
    for dropped_to in (0.0, -10.0):
        detector = LossSpikeDetector(z=6.0, warmup=10)
        steady = [2.0 + 0.02 * ((-1) ** i) for i in range(30)]
        assert not any(detector.observe(loss) for loss in steady)
        assert not detector.observe(dropped_to)
        assert not any(detector.observe(loss) for loss in steady[:10])
        assert detector.observe(3.0) and detector.spikes == 1


def test_a_checkpoints_short_interval_is_judged_by_its_length_not_as_a_full_one():
    """A checkpoint that ends a log interval early (every 1001 steps at log_every=50) leaves an interval of one
    step, whose mean is as noisy as one batch's loss: judged against the spread of 50-step means, a clean run
    flagged a spike at 4 of its 20 checkpoints (and a job with on_loss_spike: pause paused there, for good: a
    resume replays the same batches)."""
    import random

    rng = random.Random(0)
    metrics = JobMetrics("short-intervals", log_every=50)
    try:
        metrics.start()
        for step in range(1, 20021):
            metrics.step(loss=1.0 + rng.gauss(0.0, 0.1), samples=1)
            if step % 1001 == 0:
                metrics.end_interval()          # as the runner does before each checkpoint
        assert metrics.spikes.spikes == 0
        metrics.step(loss=3.0, samples=1)       # a real spike in a one-step interval is still one
        metrics.end_interval()
        assert metrics.spikes.spikes == 1
        for _ in range(50):                     # and one in a full interval, the short ones learnt at their size
            metrics.step(loss=1.3 + rng.gauss(0.0, 0.1), samples=1)
        assert metrics.spikes.spikes == 2
        metrics.finish("completed")
    finally:
        metrics.close()


def test_a_loop_passing_its_loss_every_few_steps_has_its_full_intervals_judged_as_full():
    """step()'s loss is optional: a loop that reads it every 5th step (loss=None between) has 10 losses in each
    50-step interval. Its intervals were judged by their losses over log_every (a share of 0.2, each one as if
    cut short): the spread was taken √5 times wider until the running variance, learnt at a fifth of the rate,
    caught up (~100 intervals), and a rise of 8 of its intervals' standard deviations in its first thousand
    steps was a spike in 3 of 20 runs (the loop passing every step: in 19)."""
    import random

    flagged = 0
    for seed in range(20):
        rng = random.Random(seed)
        metrics = JobMetrics(f"sparse-losses-{seed}", log_every=50)
        try:
            metrics.start()
            for step in range(1, 15 * 50 + 1):
                metrics.step(loss=1.0 + rng.gauss(0.0, 0.1) if step % 5 == 0 else None, samples=1)
            clean = metrics.spikes.spikes
            for step in range(1, 51):           # a rise of 0.25: 8 of the intervals' standard deviations
                metrics.step(loss=1.25 + rng.gauss(0.0, 0.1) if step % 5 == 0 else None, samples=1)
            flagged += clean == 0 and metrics.spikes.spikes == 1
            metrics.finish("completed")
        finally:
            metrics.close()
    assert flagged >= 15, flagged


def test_the_hang_watchdog_writes_every_threads_stack_once_per_hang(tmp_path):
    metrics = JobMetrics("hung-job", diagnostics=Diagnostics(stacks_dir=tmp_path, hang_seconds=0.4))
    try:
        metrics.start()
        loop(metrics, 3, compute_seconds=0.01)
        for _ in metrics.timed([None]):
            time.sleep(1.5)                  # a step that hangs: in compute, no progress
            metrics.step(loss=1.0, samples=1)
        loop(metrics, 2)
        dumps = metrics._stack_watch.dumps
    finally:
        metrics.close()
    text = (tmp_path / "stacks.rank0.txt").read_text()
    assert dumps == 1 and text.count("no step completed for") == 1
    assert "(phase compute)" in text
    assert "test_the_hang_watchdog_writes_every_threads_stack_once_per_hang" in text     # this very frame


def test_the_jobs_hang_seconds_is_published_for_the_hang_alert_to_read(tmp_path):
    """TrainerHang's least bound was a fixed 60 s: a job told to wait 10 minutes for a first step that compiles
    (--hang-seconds 600) kept its watchdog quiet and was paged all the same. The trainer publishes its own."""
    for diagnostics, published in ((Diagnostics(stacks_dir=tmp_path, hang_seconds=600), 600.0), (Diagnostics(), 60.0)):
        metrics = JobMetrics("hang-floor", diagnostics=diagnostics)
        try:
            found = [sample.value for family in text_string_to_metric_families(metrics.collect().decode())
                     for sample in family.samples if sample.name == "trainer_hang_min_seconds"]
        finally:
            metrics.close()
        assert found == [published]


HUNG_WITH_THREADS = """
import sys, threading, time
from pathlib import Path
from trainmetrics.trainer.metrics import Diagnostics, JobMetrics

def deep(depth):
    return deep(depth - 1) if depth else time.sleep(60)

for _ in range(20):
    threading.Thread(target=deep, args=(30,), daemon=True).start()
metrics = JobMetrics("hung-asked", diagnostics=Diagnostics(stacks_dir=Path(sys.argv[1]), hang_seconds=0.4))
metrics.start()
for _ in metrics.timed([None]):
    time.sleep(3)                    # a hang, its stacks asked for meanwhile
    metrics.step(loss=1.0, samples=1)
metrics.close()
"""


def test_the_hang_watchdogs_dump_is_whole_while_stacks_requests_are_written_beside_it(tmp_path):
    """The watchdog wrote its header and then its dump in hundreds of small writes, as faulthandler's signal
    handler writes a stacks request's (TrainerHang's comes at the same moment): the two were shuffled line into
    line, the same thread twice in the watchdog's dump and lines cut in two. Here requests come every few
    milliseconds until the watchdog has written."""
    (tmp_path / "hung_with_threads.py").write_text(HUNG_WITH_THREADS)
    path = tmp_path / "stacks.rank0.txt"
    job = subprocess.Popen([sys.executable, "-m", "hung_with_threads", str(tmp_path)], cwd=tmp_path,
                           stderr=subprocess.DEVNULL)
    try:
        while not path.exists():
            time.sleep(0.01)
        time.sleep(0.3)
        while b"=== " not in path.read_bytes() and job.poll() is None:
            os.kill(job.pid, signal.SIGUSR2)
            time.sleep(0.003)
    finally:
        job.wait(timeout=120)
    text = path.read_text()
    begun = text.index("\n=== ")
    watchdogs = text[begun:text.index(" in _run_module_as_main\n", begun) + 23].splitlines()[2:]
    threads = re.findall(r"(?:Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\)", "\n".join(watchdogs))
    cut = [line for line in watchdogs if line and not re.fullmatch(
        r'(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):|  File ".*", line \d+ in \S+', line)]
    assert len(threads) >= 22 and len(set(threads)) == len(threads) and cut == [], watchdogs[:40]


def run_a_step_holding_the_gil(metrics: JobMetrics, then: float) -> None:
    """Start, three steps, then one in which native code holds the GIL for 2.5 s (the watchdog having looked at the
    step before the hang), ending `then` seconds after the GIL is let go."""
    metrics.start()
    loop(metrics, 3, compute_seconds=0.01)
    for _ in metrics.timed([None]):
        time.sleep(0.3)
        hold_the_gil(2.5)
        if then:        # (not sleep(0): it lets the GIL go, and the watchdog waiting for it would run first)
            time.sleep(then)
        metrics.step(loss=1.0, samples=1)


def test_a_hang_that_holds_the_gil_has_its_own_stacks_written_once_during_it(tmp_path):
    """A hang in native code that holds the GIL stops the watchdog too: it woke when the hang was over and wrote
    the stacks of then, the hung call gone from them, as the hang's (and a hang that never let go had none at all).
    faulthandler's timer, armed by the watchdog, writes them from C during the hang; the watchdog counts that dump
    and writes no second one."""
    metrics = JobMetrics("gil-job", diagnostics=Diagnostics(stacks_dir=tmp_path, hang_seconds=0.4))
    try:
        run_a_step_holding_the_gil(metrics, then=0.5)    # the watchdog runs again, the step not yet done
        dumps = metrics._stack_watch.dumps
    finally:
        metrics.close()
    text = (tmp_path / "stacks.rank0.txt").read_text()
    assert dumps == 1 and text.count("Timeout (") == 1 and text.count("no step completed for") == 1, text[:500]
    assert "hold_the_gil" in text and "faulthandler wrote them during it" in text, text[:500]     # the hung call


def hold_the_gil(seconds: float) -> None:
    """Hold the GIL for `seconds`, as a native call does: a switch interval longer than the hold keeps the loop from
    letting go of it. (A sum() over a range sized by a speed measured before it held it for less on a loaded host,
    where the measure was preempted: the watchdog ran in the sleep after it and dumped a hang it saw in time.)"""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(seconds + 60)
    try:
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends:
            pass
    finally:
        sys.setswitchinterval(interval)


def test_an_evaluation_that_holds_the_gil_past_the_hang_bound_gets_no_hang_dump(tmp_path):
    """faulthandler's timer, armed at the last check before an evaluation, was cancelled only at the next check:
    an evaluation holding the GIL (which stops the watchdog) past the bound had a `Timeout` dump written in it, a
    hang that the watchdog's rule leaves out, counted nowhere."""
    metrics = JobMetrics("eval-job", diagnostics=Diagnostics(stacks_dir=tmp_path, hang_seconds=0.4))
    try:
        metrics.start()
        loop(metrics, 30, compute_seconds=0.01)     # checks in the loop arm the timer (the bound stays 0.4 s)
        with metrics.phase("eval"):
            hold_the_gil(1.5)
        loop(metrics, 30, compute_seconds=0.01)
        dumps = metrics._stack_watch.dumps
    finally:
        metrics.close()
    text = (tmp_path / "stacks.rank0.txt").read_text()
    assert dumps == 0 and "Timeout (" not in text, text[:500]


def test_a_hang_holding_the_gil_whose_step_ends_before_the_watchdog_runs_has_its_dump_counted(tmp_path):
    """The timer's dump was counted only by a check that still saw the hang: a step completed as the GIL was let go,
    before the watchdog ran, left the hang's `Timeout` dump in the file with no note and trainer_stack_dumps_total
    at 0."""
    metrics = JobMetrics("gil-step-job", diagnostics=Diagnostics(stacks_dir=tmp_path, hang_seconds=0.4))
    try:
        run_a_step_holding_the_gil(metrics, then=0.0)    # the step ends at once: no watchdog run since the hang
        loop(metrics, 3, compute_seconds=0.2)
        dumps = metrics._stack_watch.dumps
    finally:
        metrics.close()
    text = (tmp_path / "stacks.rank0.txt").read_text()
    assert dumps == 1 and text.count("Timeout (") == 1 and text.count("no step completed for") == 1, text[:500]


def seen_steps(metrics: JobMetrics, seconds: float, count: int = 5) -> None:
    """`count` steps of `seconds` each in the step histogram (its +Inf bucket past the scale's last bound), within the
    watchdog's window."""
    watch, times = metrics._stack_watch, metrics.step_times
    before = list(times.counts)
    times.counts[times.bounds.index(seconds) if seconds in times.bounds else -1] += count
    watch._windows.clear()
    watch._windows.extend([before, list(times.counts)])


def test_the_hang_bound_of_a_job_with_two_minute_steps_is_twenty_minutes(tmp_path):
    """10 x the p99 step, which the step histogram must resolve: its scale reaches 10 minutes."""
    metrics = JobMetrics("slow-steps", diagnostics=Diagnostics(stacks_dir=tmp_path))
    try:
        seen_steps(metrics, 120.0)             # five 2-minute steps
        watch, times = metrics._stack_watch, metrics.step_times
        assert watch.hang_bound() == 1200.0
        # The next step takes longer than the window (10 minutes of checks): no step in it, and the bound
        # stays 20 minutes (it fell to 60 s, and the stacks were dumped a minute into every such step).
        watch._windows.extend([list(times.counts)] * (watch._windows.maxlen or 1))
        assert watch.hang_bound() == 1200.0
    finally:
        metrics.close()


def test_the_hang_bound_is_ten_times_the_p99_of_the_last_ten_minutes_as_the_alerts(tmp_path):
    """docs/alerts.md: the watchdog applies TrainerHang's rule, 10 x the p99 step time over 10 minutes. It took the
    p99 of the last minute only: a job with 2 s steps and a 70 s one after every 40 (a data shard fetched), 2.4 %
    of its steps, had a bound of 60 s whenever the minute before held none of them, and the watchdog dumped the
    stacks a minute into every slow step: a hang every 2.5 minutes that the alert (its bound over 900 s) never saw."""
    metrics = JobMetrics("periodic-slow-steps", diagnostics=Diagnostics(stacks_dir=tmp_path))
    try:
        watch, bounds = metrics._stack_watch, metrics.step_times.bounds
        ended, now = [], 0.0                    # (end, duration) of each step
        while now < 700:
            for _ in range(40):
                now += 2.0
                ended.append((now, 2.0))
            now += 70.0
            ended.append((now, 70.0))
        slow_began = ended[-2][0]               # the last slow step: 65 s into it
        watch._windows.clear()
        for check in range(int((slow_began + 65) // watch.check_seconds) + 1):    # one snapshot per check
            counts = [0] * (len(bounds) + 1)
            for end, seconds in ended:
                if end <= check * watch.check_seconds:
                    counts[bisect.bisect_left(bounds, seconds)] += 1
            watch._windows.append(counts)
        assert watch.hang_bound() == 1200.0     # 10 x the bucket of the p99 (60, 120]: the slow step is no hang
    finally:
        metrics.close()


def test_a_resumed_process_keeps_the_hang_bound_its_checkpoint_had(tmp_path):
    """docs/alerts.md: the bound stays what it last was across a pause or a restart, the watchdog's as the
    TrainerHang rule's. The watchdog of a resumed process started from 60 s: the first step of a job with
    two-minute steps was a hang a minute into it, its stacks dumped on every resume."""
    first = JobMetrics("slow-resume", diagnostics=Diagnostics(stacks_dir=tmp_path))
    try:
        seen_steps(first, 120.0)               # five 2-minute steps
        assert first._stack_watch.hang_bound() == 1200.0
        state = first.state_dict()
    finally:
        first.close()
    resumed = JobMetrics("slow-resume", diagnostics=Diagnostics(stacks_dir=tmp_path), resuming=True)
    try:
        resumed.load_state_dict(state)
        assert resumed._stack_watch.hang_bound() == 1200.0          # no step yet in this process
    finally:
        resumed.close()


def test_a_job_with_steps_past_the_histograms_scale_resumes_with_its_counters_and_a_finite_hang_bound(tmp_path):
    """Steps past the step histogram's last bound (10 minutes) put its p99 in the +Inf bucket: the watchdog's bound
    was infinite (the rule's histogram_quantile takes the last finite bound: 100 minutes), the checkpoint carried
    `hang_bound: inf`, and the resumed process refused the whole state as not a finite number: its steps,
    samples and phase seconds started again from 0 (a counter reset in Prometheus)."""
    first = JobMetrics("endless-steps", diagnostics=Diagnostics(stacks_dir=tmp_path))
    try:
        seen_steps(first, 900.0)               # five 15-minute steps
        first.steps = 5
        times = first.step_times
        assert first._stack_watch.hang_bound() == 10 * times.bounds[-1]
        state = first.state_dict()
    finally:
        first.close()
    state["hang_bound"] = float("inf")          # as a checkpoint written before this fix holds it
    resumed = JobMetrics("endless-steps", diagnostics=Diagnostics(stacks_dir=tmp_path), resuming=True)
    try:
        resumed.load_state_dict(state)
        assert resumed.steps == 5
        assert resumed._stack_watch.hang_bound() == 10 * times.bounds[-1]
        state["hang_bound"] = 1e12              # nor does a hostile one keep the watchdog from ever firing
        resumed._stack_watch.carry_bound(state["hang_bound"])
        assert resumed._stack_watch.hang_bound() == 10 * times.bounds[-1]
    finally:
        resumed.close()


def test_sigusr2_writes_the_stacks_even_while_the_loop_sleeps(tmp_path):
    metrics = JobMetrics("asked-job", diagnostics=Diagnostics(stacks_dir=tmp_path))
    path = tmp_path / "stacks.rank0.txt"
    try:
        metrics.start()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
        text = path.read_text()
    finally:
        metrics.close()
    assert "Current thread" in text and "test_sigusr2_writes_the_stacks_even_while_the_loop_sleeps" in text
    # After the job, a late request is ignored instead of killing the process.
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.1)


def test_closing_one_of_two_jobs_in_a_process_leaves_sigusr2_to_the_other(tmp_path):
    first = JobMetrics("first-job", diagnostics=Diagnostics(stacks_dir=tmp_path / "first"))
    second = JobMetrics("second-job", diagnostics=Diagnostics(stacks_dir=tmp_path / "second"))
    try:
        second.close()                          # the newest goes first: the signal goes back to the first
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
        assert "Current thread" in (tmp_path / "first" / "stacks.rank0.txt").read_text()
    finally:
        first.close()
        second.close()


def test_a_forked_child_neither_dumps_into_the_ranks_file_nor_dies_of_the_stacks_signal(tmp_path):
    """A DataLoader worker is a fork of its rank with the same command line, so the job server's stacks request
    reaches it too: it inherited faulthandler's registration and the rank's open file, and appended its own dump
    to the rank's stacks (served as the rank's, the last one in the file)."""
    metrics = JobMetrics("forking-job", diagnostics=Diagnostics(stacks_dir=tmp_path))
    try:
        child = os.fork()
        if child == 0:                           # as a worker: asked for its stacks, then done
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
            os._exit(0)
        _, status = os.waitpid(child, 0)
    finally:
        metrics.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "stacks.rank0.txt").read_text() == ""


def test_a_job_closed_off_the_main_thread_leaves_no_later_file_to_the_stacks_signal(tmp_path):
    """Closed from another thread, the watch closed its file and left faulthandler writing to its descriptor
    number: the next file opened took it, and a later SIGUSR2 wrote thread stacks into that file."""
    metrics = JobMetrics("closed-elsewhere", diagnostics=Diagnostics(stacks_dir=tmp_path / "diagnostics"))
    closer = threading.Thread(target=metrics.close)
    closer.start()
    closer.join()
    other = tmp_path / "weights.bin"
    try:
        with open(other, "wb") as file:
            file.write(b"WEIGHTS")
            file.flush()
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
        assert other.read_bytes() == b"WEIGHTS"
        assert "Current thread" in (tmp_path / "diagnostics" / "stacks.rank0.txt").read_text()
    finally:
        JobMetrics("takes-the-signal-back", diagnostics=Diagnostics(stacks_dir=tmp_path / "last")).close()


def test_a_job_created_off_the_main_thread_writes_its_stacks_on_sigusr2_and_lives(tmp_path):
    """A training function that a framework runs in a thread (Ray Train's and Tune's workers, a notebook's
    background thread) creates its JobMetrics there: SIGUSR2 was left at its default action, and asking for the
    stacks as README says killed the process. In its own process: the signal must reach the whole process."""
    script = """
import os, signal, sys, threading, time
from pathlib import Path
from trainmetrics.trainer.metrics import Diagnostics, JobMetrics

signal.signal(signal.SIGUSR2, signal.SIG_DFL)     # as a process starts (this test's may have ignored it)

def train_in_a_thread():
    metrics = JobMetrics("threaded-job", diagnostics=Diagnostics(stacks_dir=Path(sys.argv[1])))
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.3)
    finally:
        metrics.close()

worker = threading.Thread(target=train_in_a_thread)
worker.start()
worker.join()
os.kill(os.getpid(), signal.SIGUSR2)       # after the job: nothing to kill the process either
time.sleep(0.2)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "in train_in_a_thread" in (tmp_path / "stacks.rank0.txt").read_text()


def test_a_stacks_request_landing_as_the_job_closes_does_not_kill_the_process(tmp_path):
    """close() let faulthandler go of SIGUSR2, which put back the action it found (the default: terminate), then set
    SIG_IGN: a request landing between the two (the job server's, as the trainer ends) killed the process, exit -12
    (13 and 17 of 40 processes, in two runs, sent SIGUSR2 without pause while they closed). Here the request lands
    in that gap, sent by faulthandler.unregister itself."""
    script = """
import faulthandler, os, signal, sys, time
from pathlib import Path
from trainmetrics.trainer.metrics import Diagnostics, JobMetrics

signal.signal(signal.SIGUSR2, signal.SIG_DFL)     # as a process starts (this test's may have ignored it)
metrics = JobMetrics("closing-job", diagnostics=Diagnostics(stacks_dir=Path(sys.argv[1])))
unregister = faulthandler.unregister

def unregister_as_a_request_lands(signum):
    let_go = unregister(signum)
    os.kill(os.getpid(), signal.SIGUSR2)
    return let_go

faulthandler.unregister = unregister_as_a_request_lands
metrics.close()
time.sleep(0.1)
print("lived on")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "lived on\n"), (done.returncode, done.stderr[-2000:])


def test_a_stacks_request_held_while_the_job_started_is_answered_once_it_lives(tmp_path):
    """A job server's job starts with SIGUSR2 blocked: a request before its watch existed waits, and is answered once
    the watch takes the signal (what the job's start does to the signal's action must not throw it away, as
    SIG_IGN would)."""
    script = """
import os, signal, sys, time
from pathlib import Path

signal.signal(signal.SIGUSR2, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})      # as the job server spawns it
os.kill(os.getpid(), signal.SIGUSR2)                            # asked while it starts
from trainmetrics.trainer.metrics import Diagnostics, JobMetrics
metrics = JobMetrics("asked-early", diagnostics=Diagnostics(stacks_dir=Path(sys.argv[1])))
time.sleep(0.2)
metrics.close()
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "most recent call first" in (tmp_path / "stacks.rank0.txt").read_text()


@pytest.mark.parametrize("room_again", [False, True], ids=["disk-still-full", "disk-freed"])
def test_a_hang_dump_on_a_full_disk_neither_makes_close_raise_nor_leaves_its_header_for_later(tmp_path, room_again):
    """The watchdog's `=== TIME reason` header went through the file's buffer: on a full disk its flush failed and
    the header stayed buffered. The disk still full at the end, close() raised OSError (JobMetrics.close "never
    raises"; the job's endpoint and files were left, and `trainmetrics train` exited 1 after a completed job); freed
    by then, the stale header was written at the file's end, after later dumps, heading none. RLIMIT_FSIZE 0 is a
    file that may grow no further, as on a full disk (EFBIG where a disk says ENOSPC)."""
    script = """
import os, resource, signal, sys, time
from pathlib import Path
from trainmetrics.trainer.metrics import Diagnostics, JobMetrics

metrics = JobMetrics("full-disk", diagnostics=Diagnostics(stacks_dir=Path(sys.argv[1]), hang_seconds=0.4))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # (its default action: a core dump)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))     # the disk is full
metrics.start()
for _ in metrics.timed([None]):
    time.sleep(1.5)                                 # a hang: its dump cannot be written
    metrics.step(loss=1.0, samples=1)
metrics.finish("completed")
if sys.argv[2] == "freed":
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    os.kill(os.getpid(), signal.SIGUSR2)            # a stacks request, answered now there is room
    time.sleep(0.2)
metrics.close()
print("closed")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), "freed" if room_again else "full"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "closed\n"), (done.returncode, done.stderr[-2000:])
    assert "the hang watchdog failed" in done.stderr        # said, as any failure of the watchdog
    written = (tmp_path / "stacks.rank0.txt").read_text()
    if room_again:
        assert "no step completed" not in written and written.rstrip().endswith("in <module>"), written[-500:]
    else:
        assert written == ""


def test_a_job_whose_stderr_has_no_descriptor_starts_and_its_stacks_go_to_the_processs_own(capfd):
    """Without a stacks file the stacks go to stderr, which faulthandler writes to by its descriptor: a job started
    where sys.stderr has none (contextlib.redirect_stderr to a StringIO, pytest's capsys, a notebook's stream) failed
    to start, io.UnsupportedOperation: fileno."""
    with contextlib.redirect_stderr(io.StringIO()):
        metrics = JobMetrics("redirected-stderr")
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
        finally:
            metrics.close()
    assert "test_a_job_whose_stderr_has_no_descriptor" in capfd.readouterr().err


def test_a_job_in_a_process_without_stderr_starts_and_lives_through_a_stacks_request(tmp_path):
    """A process started with its stderr closed (sys.stderr None) could not start a job: RuntimeError."""
    script = """
import os, signal, time
from trainmetrics.trainer.metrics import JobMetrics

metrics = JobMetrics("no-stderr")
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.2)
metrics.close()
print("lived on")
"""
    done = subprocess.run(["sh", "-c", 'exec "$0" -c "$1" 2>&-', sys.executable, script], stdout=subprocess.PIPE,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "lived on\n"), done.returncode


def test_a_slow_write_of_the_final_model_is_a_checkpoints_time_not_a_hang(tmp_path, monkeypatch):
    """model.pt was written in `compute`: a large model written to slow storage at the job's end was a hang to the
    watchdog (and to TrainerHang, which reads the same phase), and training time to the goodput ledger."""
    from trainmetrics.trainer import runner
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.stopping import StopFlag

    save = runner.atomic_save

    def slow_save(state, path, *args, **kwargs):
        if path.name == runner.FINAL_MODEL_NAME:
            time.sleep(2.0)                      # past the 1 s hang bound below
        return save(state, path, *args, **kwargs)

    monkeypatch.setattr(runner, "atomic_save", slow_save)
    config = TrainConfig(job_id="final-save", model="mlp", dataset="blobs", epochs=1, log_every=5,
                         checkpoint_every=20, checkpoint_dir=tmp_path / "checkpoints",
                         result_file=tmp_path / "result.json", diagnostics_dir=tmp_path, hang_seconds=1)
    assert runner.run_job(config, StopFlag()) == 0
    stacks = tmp_path / "stacks.rank0.txt"
    assert "no step completed" not in (stacks.read_text() if stacks.exists() else "")


def test_faults_apply_to_the_rank_and_job_they_name(monkeypatch):
    monkeypatch.setenv(faults.VARIABLE, '{"stall": {"rank": 1, "step": 3, "seconds": 9}, '
                                        '"slow_data": {"job": "other", "seconds": 1}}')
    assert faults.from_environment(0, "this") is None
    mine = faults.from_environment(1, "this")
    assert mine.stall == {"rank": 1, "step": 3, "seconds": 9} and mine.slow_data is None
    assert faults.from_environment(0, "other").slow_data == {"job": "other", "seconds": 1}
    began = time.monotonic()
    mine.before_forward(3, stopping=lambda: time.monotonic() - began > 0.2)     # a stop ends the stall
    assert time.monotonic() - began < 2
    monkeypatch.setenv(faults.VARIABLE, "{not json")
    assert faults.from_environment(0, "this") is None


def test_a_corrupted_batch_is_flagged_on_its_interval_and_pauses_a_job_that_asked(tmp_path, monkeypatch):
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import run_job
    from trainmetrics.trainer.stopping import StopFlag
    from trainmetrics.jobfiles import list_checkpoints, read_result

    monkeypatch.setenv(faults.VARIABLE, '{"corrupt_batch": {"step": 81, "scale": 1000}}')
    config = TrainConfig(job_id="spiky", model="mlp", dataset="blobs", epochs=3, log_every=5, checkpoint_every=20,
                         checkpoint_dir=tmp_path / "ckpt", result_file=tmp_path / "result.json",
                         on_loss_spike="pause")
    assert run_job(config, StopFlag()) == 4                      # paused
    result = read_result(tmp_path / "result.json")
    assert result["state"] == "paused" and result["reason"] == "loss spike at step 85"     # the interval 81..85
    # No checkpoint after the spike: the newest is from before it.
    assert max(c.step for c in list_checkpoints(tmp_path / "ckpt")) == 80


def test_a_pause_asked_for_in_a_spikes_interval_keeps_the_checkpoint_from_before_the_spike(tmp_path, monkeypatch):
    """A pause (SIGUSR1, the job server's pause) asked for between the corrupted batch and the end of its interval:
    the stop's checkpoint ended the interval, found the spike, and was written all the same, with the spiked
    weights (a resume went on from them), and the result named no reason."""
    import logging
    import signal

    from trainmetrics.jobfiles import list_checkpoints, read_result
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import run_job
    from trainmetrics.trainer.stopping import StopFlag

    flag = StopFlag()

    class PauseWhenStalled(logging.Handler):
        def emit(self, record):         # the stall before step 83 is where the pause comes in
            if "stalling" in record.getMessage():
                flag.request(signal.SIGUSR1)

    handler = PauseWhenStalled()
    logging.getLogger("trainmetrics").addHandler(handler)
    monkeypatch.setenv(faults.VARIABLE, '{"corrupt_batch": {"step": 81, "scale": 1000}, '
                                        '"stall": {"step": 83, "seconds": 60}}')
    config = TrainConfig(job_id="spiky", model="mlp", dataset="blobs", epochs=3, log_every=5, checkpoint_every=20,
                         checkpoint_dir=tmp_path / "ckpt", result_file=tmp_path / "result.json",
                         on_loss_spike="pause")
    try:
        assert run_job(config, flag) == 4
    finally:
        logging.getLogger("trainmetrics").removeHandler(handler)
    result = read_result(tmp_path / "result.json")
    assert (result["state"], result["reason"], result["steps"]) == ("paused", "loss spike at step 83", 83)
    assert max(c.step for c in list_checkpoints(tmp_path / "ckpt")) == 80


@pytest.mark.parametrize("corrupt,checkpoint_every,log_every,reason,kept", [
    # The spike's interval (83..84) is ended by the checkpoint at 84, which was written after it.
    ({"corrupt_batch": {"step": 83, "scale": 1000}}, 12, 5, "loss spike at step 84", 72),
    # An overflow: non-finite from step 81 on; the job went on to the end, its good checkpoints rotated out.
    ({"corrupt_batch": {"step": 81, "scale": 1e39}}, 20, 5, "non-finite loss at step 85", 80),
    # In the steps after the last checkpoint (120) and the last interval (148): the job completed, its final
    # model non-finite, its result naming a reason for a stop that did not happen.
    ({"corrupt_batch": {"step": 149, "scale": 1e39}}, 40, 7, "non-finite loss at step 150", 120)],
    ids=["spike-ended-by-a-checkpoint", "non-finite", "in-the-last-steps"])
def test_a_job_that_pauses_on_spikes_writes_no_checkpoint_after_one(tmp_path, monkeypatch, corrupt, checkpoint_every,
                                                                    log_every, reason, kept):
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import run_job
    from trainmetrics.trainer.stopping import StopFlag
    from trainmetrics.jobfiles import list_checkpoints, read_result

    monkeypatch.setenv(faults.VARIABLE, json.dumps(corrupt))
    config = TrainConfig(job_id="spiky", model="mlp", dataset="blobs", epochs=3, log_every=log_every,
                         checkpoint_every=checkpoint_every, checkpoint_dir=tmp_path / "ckpt",
                         result_file=tmp_path / "result.json", on_loss_spike="pause")
    assert run_job(config, StopFlag()) == 4
    result = read_result(tmp_path / "result.json")
    assert (result["state"], result["reason"]) == ("paused", reason)
    assert max(c.step for c in list_checkpoints(tmp_path / "ckpt")) == kept
    assert not (tmp_path / "ckpt" / "model.pt").exists()


@pytest.mark.parametrize("model,dataset,batch_size,epochs", [("mlp", "blobs", 64, 3), ("cnn", "digits", 32, 2),
                                                             ("transformer", "corpus", 16, 1)])
def test_clean_seeded_runs_of_every_built_in_model_raise_no_spike(make_trainer, model, dataset, batch_size, epochs):
    for seed in (0, 1, 2):
        trainer = make_trainer(model=model, dataset=dataset, epochs=epochs, batch_size=batch_size, seed=seed,
                               log_every=4, lr=3e-3 if model == "transformer" else 1e-3)
        trainer.run()
        assert trainer.metrics.loss_intervals > 20           # enough intervals past the warm-up to look
        assert trainer.metrics.spikes.spikes == 0, (model, seed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, True, "12", 10 ** 400, 1e300],
                         ids=["nan", "inf", "negative", "bool", "text", "int-past-floats", "past-the-most"])
def test_a_checkpoints_phase_total_that_is_no_seconds_is_left_out_by_name(bad, caplog):
    """PhaseClock.load_state_dict took any int or float: a NaN made that phase's published total NaN, an infinity
    every phase's (_grown spreads the growth by a ratio of sums), a negative one held every total at 0 until the
    others outgrew it, and True carried 1 s. The others are taken; the one left out is said with its phase."""
    from trainmetrics.trainer.phases import PhaseClock

    clock = PhaseClock()
    with caplog.at_level("WARNING", logger="trainmetrics.trainer"):
        clock.load_state_dict({"eval": bad, "compute": 3.0, "checkpoint": 2})
    clock.start_loop(time.perf_counter())
    totals = clock.totals()
    assert all(seconds == seconds and 0 <= seconds < 1e6 for seconds in totals.values()), totals
    assert (totals["eval"], totals["checkpoint"]) == (0.0, 2.0) and totals["compute"] >= 3.0
    assert "ignoring the checkpoint's eval seconds" in caplog.text


def test_a_state_whose_phase_totals_overflow_their_sum_is_refused_naming_the_phase(caplog):
    """Two finite carried totals near the float limit (1e308 each, a corrupt checkpoint) passed load_state_dict's
    check: their sum overflowed, and every published phase total was NaN for the rest of the job."""
    metrics = JobMetrics("phases-overflow", resuming=True)
    try:
        metrics.load_state_dict({"steps": 3, "phases": {"compute": 1e308, "eval": 1e308}})
        assert metrics.steps == 0 and "'compute' holds '1e+308'" in caplog.text      # refused whole, as any bad state
        metrics.load_state_dict({"steps": 3, "phases": {"compute": 5.0, "eval": 2.0}})
        metrics.start()
        totals = metrics.phases.totals()
    finally:
        metrics.close()
    assert metrics.steps == 3 and totals["eval"] == 2.0 and 5.0 <= totals["compute"] < 6.0, totals


def test_the_hang_watchdog_gathers_its_dump_in_a_temp_file_where_memfd_is_refused(monkeypatch):
    """A kernel or sandbox refusing memfd_create (ENOSYS, EPERM) raised past the temp file the dump was to be
    gathered in otherwise: the watchdog wrote its stacks in pieces, to be shuffled with a request's."""
    from trainmetrics.trainer import watchdog

    def refused(*args, **kwargs):
        raise OSError(errno.ENOSYS, "memfd_create refused")

    monkeypatch.setattr(os, "memfd_create", refused)
    stacks = watchdog._every_stack().decode()
    assert "test_the_hang_watchdog_gathers_its_dump_in_a_temp_file_where_memfd_is_refused" in stacks
