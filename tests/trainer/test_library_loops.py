"""`JobMetrics` in the training loops people write: an evaluation or checkpoint in the middle of a step, a loader
wrapped in `timed()` twice, evaluation results given as text, a checkpoint written on a thread of its own."""

import itertools
import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from trainmetrics.trainer.histograms import DurationHistogram
from trainmetrics.trainer.metrics import JobMetrics

WAIT, COMPUTE = 0.1, 0.05


def batches(count: int, wait: float):
    """A loader whose every batch takes `wait` to arrive."""
    for index in range(count):
        time.sleep(wait)
        yield index


def run(metrics: JobMetrics, body, count: int = 4) -> dict[str, float]:
    metrics.start()
    try:
        for batch in metrics.timed(batches(count, WAIT)):
            time.sleep(COMPUTE)
            body(metrics)
            metrics.step(loss=1.0, samples=1)
        metrics.finish("completed")
        return metrics.phases.totals()
    finally:
        metrics.close()


# Each step's evaluation or checkpoint takes this long: a step counted with it would be over by more than a loaded
# host's oversleeping (0.03 s once: the 0.02 s these took before were within it).
INSIDE = 0.1


def in_eval(metrics):
    with metrics.phase("eval"):
        time.sleep(INSIDE)


def in_checkpoint(metrics):
    with metrics.checkpoint():
        time.sleep(INSIDE)


def nested_eval_pass(metrics):
    with metrics.phase("eval"):
        for _ in metrics.timed(batches(2, INSIDE / 2)):
            pass


@pytest.mark.parametrize("body", [in_eval, in_checkpoint, nested_eval_pass])
def test_an_evaluation_or_checkpoint_inside_a_step_leaves_the_rest_of_the_step_its_time(body):
    """The end of an evaluation or checkpoint restarted the step's clock: a step that evaluated or checkpointed
    before its step() call was timed from the end of that, its data wait and compute lost (steps of ~0 s, a
    data-wait fraction of step time far above 1), though trainer_step_duration_seconds is the step's wall time,
    data wait included. Only the evaluation's or checkpoint's own time is left out."""
    metrics = JobMetrics("loops-mid-step")
    run(metrics, body)
    steps = sum(metrics.step_times.counts)
    assert steps == 4
    assert metrics.step_times.sum >= metrics.data_waits.sum
    # Sleeps end late on a loaded host, never early: each step at least its wait and compute, and short of them
    # with its evaluation or checkpoint by more than any oversleeping seen.
    assert 4 * (WAIT + COMPUTE) - 0.01 <= metrics.step_times.sum < 4 * (WAIT + COMPUTE + INSIDE / 2)
    assert WAIT + COMPUTE - 0.01 <= metrics.step_duration_max < WAIT + COMPUTE + INSIDE / 2


def test_a_checkpoint_between_steps_is_still_left_out_of_the_next_step():
    metrics = JobMetrics("loops-between")
    metrics.start()
    try:
        metrics.step(loss=1.0, samples=1)
        with metrics.checkpoint():
            time.sleep(0.3)
        time.sleep(0.05)
        metrics.step(loss=1.0, samples=1)
    finally:
        metrics.close()
    assert metrics.step_duration_max == pytest.approx(0.05, abs=0.03)


def test_a_new_pass_still_leaves_the_time_between_passes_out_of_its_first_step():
    metrics = JobMetrics("loops-passes")
    metrics.start()
    try:
        for _ in range(2):
            for _ in metrics.timed(batches(2, 0.02)):
                metrics.step(samples=1)
            time.sleep(0.3)         # an evaluation between epochs, not marked
    finally:
        metrics.close()
    assert metrics.step_duration_max < 0.1


def test_a_loader_wrapped_in_timed_twice_counts_each_wait_once():
    """timed() over a generator that itself iterates timed(loader) (a helper that moves batches to the device):
    each wait was counted by both, the data wait doubled and the step's compute booked as data wait (compute
    ~0; past the loop's time compute is clamped at 0 and the phases exceed the process's life)."""
    metrics = JobMetrics("loops-wrapped")
    metrics.start()

    def to_device():
        for batch in metrics.timed(batches(4, WAIT)):
            yield batch

    began = time.perf_counter()
    for _ in metrics.timed(to_device()):
        time.sleep(COMPUTE)
        metrics.step(samples=1)
    loop = time.perf_counter() - began
    metrics.finish("completed")
    totals = metrics.phases.totals()
    metrics.close()
    assert metrics.data_waits.sum == pytest.approx(4 * WAIT, abs=0.04)
    assert sum(metrics.data_waits.counts) == 5          # four batches and the end of the pass, once each
    assert totals["data_wait"] == pytest.approx(4 * WAIT, abs=0.04)
    assert totals["compute"] == pytest.approx(4 * COMPUTE, abs=0.04)
    assert totals["data_wait"] + totals["compute"] == pytest.approx(loop, abs=0.02)


def test_text_is_no_evaluation_result_nor_learning_rate(caplog):
    """The README: a loss or evaluation result that is text is left out. step() refused loss="0.5", but
    eval(loss="0.5") and set_learning_rate("0.1") read the text as a number."""
    metrics = JobMetrics("loops-text")
    try:
        metrics.start()
        evaluation = metrics.eval(loss="0.5", accuracy=b"0.9")
        metrics.set_learning_rate("0.1")
        assert evaluation is not None and evaluation.loss is None and evaluation.accuracy is None
        assert metrics.eval_loss_min is None and metrics.learning_rate is None
        metrics.eval(loss=0.25, accuracy=0.5)
        assert metrics.eval_loss_min == 0.25 and metrics.evaluations.count == 2
    finally:
        metrics.close()


def test_a_checkpoint_written_on_a_thread_of_its_own_is_counted_and_leaves_the_loops_phases_alone():
    """An asynchronous save (torch.distributed.checkpoint's async_save, an executor) writes on a thread of its own
    while the loop trains on. Its checkpoint() block moved the loop's phase: begun in an evaluation it took the rest
    of the evaluation's seconds as checkpoint time (the loop never waited for the write: 0.35 s of eval, 0.15 s of
    checkpoint) and showed `checkpoint` while the loop evaluated; begun in training and ended in an evaluation, it
    cut that one short."""
    metrics = JobMetrics("loops-async-checkpoint")
    metrics.start()
    began, wrote = threading.Event(), []

    def write():
        with metrics.checkpoint():
            began.set()
            start = time.perf_counter()
            time.sleep(0.4)
            wrote.append(time.perf_counter() - start)

    writer = threading.Thread(target=write)
    evaluated = time.perf_counter()
    try:
        with metrics.phase("eval"):             # 0-0.2 s: the write begins 0.05 s in...
            time.sleep(0.05)
            writer.start()
            began.wait()
            shown = [s.labels["phase"] for s in samples_of(metrics, "trainer_phase") if s.value == 1]
            time.sleep(0.15)
        evaluated = time.perf_counter() - evaluated
        for _ in metrics.timed(batches(4, 0.02)):
            metrics.step(loss=1.0, samples=1)
        second = time.perf_counter()
        with metrics.phase("eval"):             # ...and ends in this one, 0.3 s long
            time.sleep(0.3)
        evaluated += time.perf_counter() - second
        writer.join()
        metrics.finish("completed")
        totals = metrics.phases.totals()
    finally:
        metrics.close()
    assert shown == ["eval"]
    assert totals["eval"] == pytest.approx(evaluated, abs=0.01) and totals["checkpoint"] == 0, totals
    assert (metrics.checkpoints, sum(metrics.checkpoint_durations.counts)) == (1, 1)
    assert metrics.checkpoint_durations.sum == pytest.approx(wrote[0], abs=0.01)
    # The loop trained through the write: a resume from it throws that training away (lost, not checkpoint time).
    assert metrics.phases.checkpointed is None


def test_a_state_taken_while_another_thread_ends_its_write_counts_that_checkpoint_once():
    """The writer's block took the write off the open ones, then recorded its time, then counted it: a state_dict()
    taken by the loop in between counted it not at all (a resume from it one checkpoint short)."""
    metrics = JobMetrics("loops-async-count")
    metrics.start()
    counted, recording, go_on = [], threading.Event(), threading.Event()

    class SlowToRecord(DurationHistogram):
        __slots__ = ()

        def observe(self, value: float) -> None:
            recording.set()
            go_on.wait(5)
            super().observe(value)

    metrics.checkpoint_durations = SlowToRecord(metrics.checkpoint_durations.bounds)

    def write():
        with metrics.checkpoint():
            pass

    writer = threading.Thread(target=write)
    try:
        writer.start()
        recording.wait(5)
        reader = threading.Thread(target=lambda: counted.append(metrics.state_dict()["checkpoints"]))
        reader.start()
        reader.join(0.2)
        go_on.set()
        writer.join()
        reader.join()
    finally:
        metrics.close()
    assert counted == [1] and metrics.checkpoints == 1


def samples_of(metrics: JobMetrics, name: str) -> list:
    return [sample for family in text_string_to_metric_families(metrics.collect().decode())
            for sample in family.samples if sample.name == name]


def test_a_loop_on_a_thread_other_than_starts_checkpoints_as_the_loop_from_its_first_step():
    """`with JobMetrics(...)` on the main thread, the loop on a thread of its own: the loop's thread was learnt at
    its first log interval only, so until then its own checkpoint() blocks were taken for an asynchronous writer's:
    no checkpoint phase (0 s), the write timed as the step it interrupted, no trainer_checkpointed_seconds."""
    metrics = JobMetrics("loops-thread", log_every=50)

    def loop():
        for index in range(4):
            metrics.step(loss=1.0, samples=1)
            if index == 1:
                with metrics.checkpoint():
                    time.sleep(0.3)

    with metrics:
        trainer = threading.Thread(target=loop)
        trainer.start()
        trainer.join()
    totals = metrics.phases.totals()
    assert totals["checkpoint"] >= 0.3 and metrics.phases.checkpointed is not None, totals
    assert (metrics.steps, metrics.checkpoints) == (4, 1)
    assert metrics.step_times.sum < metrics.checkpoint_durations.sum      # the write is no step's time


def test_a_step_whose_micro_batches_straddle_the_end_of_a_pass_keeps_its_whole_time():
    """Gradient accumulation over a loader started again mid-step (a loop counted in steps, not epochs): the new
    pass's first wait restarted the step's clock, so the step that straddled the end of the pass was timed from
    there, the compute of its micro-batches before it lost (0.1 s of a 0.2 s step)."""
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)     # 3 batches a pass
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = JobMetrics("loops-accumulation")
    metrics.start()
    try:
        began = time.perf_counter()
        batches_left = iter(metrics.timed(loader))
        for _ in range(3):              # two micro-batches a step: the second step's straddle the end of the pass
            for _ in range(2):
                try:
                    inputs, targets = next(batches_left)
                except StopIteration:
                    batches_left = iter(metrics.timed(loader))
                    inputs, targets = next(batches_left)
                nn.functional.mse_loss(model(inputs), targets).backward()
                time.sleep(0.1)
            optimizer.step()
            optimizer.zero_grad()
            metrics.step(samples=len(inputs) * 2)
        trained = time.perf_counter() - began
    finally:
        metrics.close()
    assert sum(metrics.step_times.counts) == 3
    # The steps follow one another: their times add up to the loop's (a lost micro-batch is at least 0.1 s).
    assert metrics.step_times.sum == pytest.approx(trained, abs=0.05)


def test_steps_counted_before_start_are_not_mixed_into_the_first_intervals_loss():
    """Losses of steps counted before start() stayed held when start() began a new log interval, and that
    interval's mean took them in: trainer_loss 4.0 for an interval whose every loss was 1.0."""
    model = nn.Linear(4, 1)
    inputs = torch.randn(8, 4)
    metrics = JobMetrics("loops-before-start", log_every=2)
    try:
        for _ in range(3):          # warm-up steps before start(): counted, their loss 10
            metrics.step(loss=model(inputs).sum() * 0 + 10.0, samples=8)
        metrics.start()
        for _ in range(2):
            metrics.step(loss=model(inputs).sum() * 0 + 1.0, samples=8)
        assert metrics.loss == 1.0
        assert metrics.steps == 5 and metrics.loss_intervals == 3
        assert metrics.loss_sum == pytest.approx(21.0)
    finally:
        metrics.close()


def test_a_step_over_two_zipped_loaders_keeps_the_first_loaders_wait():
    """`for a, b in zip(timed(first), timed(second))`: the second loader's pass began after the first's batch had
    arrived, and was taken for a new pass between steps, restarting the step's clock there: each pass's first step
    lost the first loader's wait (its workers' start), the step times short of the loop's by as much."""
    metrics = JobMetrics("loops-zip")
    metrics.start()
    try:
        began = time.perf_counter()
        for _ in range(2):
            for _ in zip(metrics.timed(batches(3, WAIT)), metrics.timed(batches(3, WAIT / 2))):
                time.sleep(COMPUTE)
                metrics.step(samples=2)
        trained = time.perf_counter() - began
    finally:
        metrics.close()
    assert sum(metrics.step_times.counts) == 6
    assert metrics.step_duration_max == pytest.approx(WAIT * 1.5 + COMPUTE, abs=0.03)
    # The steps follow one another: their times add up to the loop's, the data wait inside them.
    assert metrics.step_times.sum == pytest.approx(trained, abs=0.05)
    assert metrics.step_times.sum >= metrics.data_waits.sum


@pytest.mark.parametrize("leave", ["evaluation over its first batches", "pass left at a stop"])
def test_a_pass_the_loop_leaves_early_is_ended_and_the_time_after_it_is_no_steps(leave):
    """A pass left with a break (or through islice) never ended in timed(): its loader was taken for one whose pass
    is still open (a zipped loader's), and the next pass's first step was timed from the last batch of the pass
    left, an unmarked evaluation over an eval loader's first batches (or the time after a pass left at a stop)
    charged to that one step (0.3 s of a 0.02 s step)."""
    metrics = JobMetrics("loops-left")
    metrics.start()
    try:
        for _ in range(2):
            for index, _ in enumerate(metrics.timed(batches(4, 0.02))):
                if leave == "pass left at a stop" and index == 2:
                    break           # this batch is not trained: no step() after it
                metrics.step(samples=1)
            if leave == "evaluation over its first batches":
                for _ in itertools.islice(metrics.timed(batches(5, 0.01)), 2):     # an evaluation, not marked
                    pass
            time.sleep(0.3)
    finally:
        metrics.close()
    assert sum(metrics.step_times.counts) == (8 if leave == "evaluation over its first batches" else 4)
    assert metrics.step_duration_max < 0.15
