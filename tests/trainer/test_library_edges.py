"""`JobMetrics` in a user's own loop, off the happy path: stop signals at awkward moments (the final state is
never lost, the job can always be stopped), the user's own SIGUSR2 handler, a second job in one process, the
data wait of a real loader's start and end, start() twice, odd sample counts."""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
import torch

from trainmetrics.trainer.metrics import LOSS_FOLD_LIMIT, Diagnostics, JobInfo, JobMetrics
from tests.processes import finish_reading
from tests.trainer.test_metrics import samples_by_name, scraper_of_announced_job, state_of, value

PRELUDE = textwrap.dedent("""
    import os, signal, sys, threading, time
    from trainmetrics.trainer.metrics import JobMetrics
    from trainmetrics.trainer.telemetry import Publish

    def signal_in(seconds, signum=signal.SIGTERM):
        threading.Timer(seconds, os.kill, (os.getpid(), signum)).start()
""")


def run_script(body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), *args], capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def announced_script(body: str, targets: Path, jobs: Path):
    """The script run with the targets and job-mapping directories as its arguments, and a scraper of the job it
    announced, which has read it once (start() waits for a first scrape); the script killed if it still runs."""
    process = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(targets), str(jobs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        scraper = scraper_of_announced_job(targets)
        scraper.scrape()
        yield process, scraper
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


SWALLOWED = """
    class JoinsItsWorkers:          # a DataLoader iterator's __del__ joining its workers
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)        # the handler's KeyboardInterrupt is raised here: Python swallows it

    began = time.monotonic()
    try:
        with JobMetrics("swallowed") as m:
            for step in range(2000):                 # ~10 s
                if step == 10:
                    JoinsItsWorkers()
                    signal_in(0.5)                   # the user's second SIGTERM
                time.sleep(0.005)
                m.step(loss=1.0, samples=1)
    except KeyboardInterrupt:
        pass
    print(m.state, round(time.monotonic() - began, 1))
"""


def test_a_stop_signal_python_swallowed_does_not_make_the_job_unstoppable():
    """The first SIGTERM's KeyboardInterrupt was raised in a __del__ and swallowed ("Exception ignored in"); the
    handler had marked itself interrupted, so every later SIGTERM only 'hurried the linger': the loop trained
    on to its end and the job ended `completed`."""
    done = run_script(SWALLOWED)
    state, seconds = done.stdout.split()
    assert "Exception ignored in" in done.stderr
    assert state == "cancelled" and float(seconds) < 5, (done.stdout, done.stderr[-2000:])


# Announced for its files, which nothing scrapes: no linger (a 1 s one ran out twice, waiting for a first scrape
# and, cut to 1 s by the stop, for the final state's).
IN_FINISH = """
    def slow_log(stats):            # a tracker upload at the end of each interval, the last one in finish()
        if stats.step == 25:
            signal_in(0.2)
            time.sleep(0.6)

    with JobMetrics("in-finish", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=0),
                    log_every=10, on_log=slow_log) as m:
        for _ in range(25):
            m.step(loss=1.0, samples=1)
    print(m.state, m.loss_intervals, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_a_stop_signal_while_the_block_ends_keeps_the_final_state_and_cleans_up(tmp_path):
    """SIGTERM while finish() logged the last interval: its KeyboardInterrupt left finish() before the end was
    recorded: the job stayed `running` in Prometheus, its target file stayed (TargetDown), the handlers stayed."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    done = run_script(IN_FINISH, str(targets), str(jobs))
    assert done.stdout.split() == ["completed", "3", "True"], (done.stdout, done.stderr[-2000:])
    assert not list(targets.glob("*")) and not list(jobs.glob("*"))


RAISING_HANDLER = """
    def worker_died(signum, frame):     # torch's SIGCHLD handler when DataLoader workers die with the job
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")

    signal.signal(signal.SIGUSR1, worker_died)
    with JobMetrics("raising", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=20)) as m:
        print("training", flush=True)
        for _ in range(10):
            m.step(loss=1.0, samples=1)
        signal_in(0.3, signal.SIGUSR1)      # in the final linger
    print("ended", m.state, flush=True)
"""


def test_an_exception_from_a_signal_handler_does_not_end_the_final_linger(tmp_path):
    """The linger gave up at once: the files went and the scraper never read `completed`."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    with announced_script(RAISING_HANDLER, targets, jobs) as (process, scraper):
        assert process.stdout.readline() == "training\n"
        time.sleep(1.5)                                     # the handler raised 0.3 s into the linger
        assert process.poll() is None, process.communicate()
        states = [s.labels["state"] for s in scraper.scrape()["trainer_job_state"] if s.value == 1]
        scraper.close()
        out, err = finish_reading(process, timeout=20)
    assert states == ["completed"] and out.endswith("ended completed\n"), err[-2000:]
    assert "RuntimeError" in err and "it waits on" in err


NEVER_CLOSED = """
    m = JobMetrics("never-closed", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=20))
    m.start()
    for step in range(5):
        m.step(loss=1.0, samples=1)
    m.finish("completed")
    print("ended", flush=True)      # and the script exits: no close(), no `with`
"""


def test_a_job_finished_but_never_closed_is_closed_as_the_process_exits(tmp_path):
    """The process exited at once: its final state was never waited for, and its target and job-mapping files
    stayed (Prometheus went on scraping a dead port, and the completed job ended `vanished`)."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    with announced_script(NEVER_CLOSED, targets, jobs) as (process, scraper):
        assert process.stdout.readline() == "ended\n"
        try:
            states = [s.labels["state"] for s in scraper.scrape()["trainer_job_state"] if s.value == 1]
        except OSError:                                     # the process had gone
            states = []
        scraper.close()
        out, err = finish_reading(process, timeout=30)
    assert process.returncode == 0, err[-2000:]
    assert list(targets.glob("*.json")) == [] and list(jobs.glob("*.json")) == [], err[-2000:]
    assert states == ["completed"]


DIES_OF_AN_EXCEPTION = """
    m = JobMetrics("dies", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=20))
    m.start()
    for step in range(5):
        m.step(loss=1.0, samples=1)
    print("raising", flush=True)
    raise MemoryError("out of memory")      # unhandled: no finish(), no close(), no `with`
"""


def test_a_job_left_running_when_its_program_dies_of_an_exception_ends_failed_with_its_class(tmp_path):
    """Closed at the exit while still `running`, it published no final state and removed its files: an
    ordinary traceback ended the job `vanished`, as a kill -9 does (TargetDown fired), its error class nowhere."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    with announced_script(DIES_OF_AN_EXCEPTION, targets, jobs) as (process, scraper):
        assert process.stdout.readline() == "raising\n"
        found = {}
        while process.poll() is None and "trainer_job_end_timestamp_seconds" not in found:
            try:
                found = scraper.scrape()
            except OSError:                                 # the process had gone
                break
        scraper.close()
        out, err = finish_reading(process, timeout=30)
    assert process.returncode == 1 and "MemoryError: out of memory" in err, err[-2000:]
    states = [s.labels["state"] for s in found.get("trainer_job_state", []) if s.value == 1]
    assert states == ["failed"], err[-2000:]
    assert [s.labels["error_type"] for s in found["trainer_job_failure_info"]] == ["MemoryError"]
    assert list(targets.glob("*.json")) == [] and list(jobs.glob("*.json")) == [], err[-2000:]


TWO_LEFT_OPEN = """
    first = JobMetrics("first", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=30))
    second = JobMetrics("second", publish=Publish(targets_dir=sys.argv[1], job_dir=sys.argv[2], linger_timeout=30))
    for m in (first, second):
        m.start(give_up=lambda: True)       # nobody scrapes: no wait for a first scrape
        m.step(loss=1.0, samples=1)
        m.finish("completed")
    stop = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    stop.daemon = True                      # (a thread left running holds the exit before the exit hooks)
    stop.start()
    print("ended", flush=True)              # and the exit closes both: Ctrl-C in the first one's linger
"""


def test_ctrl_c_while_one_job_lingers_at_the_exit_still_removes_every_jobs_files(tmp_path):
    """The KeyboardInterrupt ended the exit hook in the first job's linger: the second job was never closed,
    its target and job-mapping files left for Prometheus to scrape a dead port (the job then `vanished`)."""
    targets, jobs = tmp_path / "targets", tmp_path / "jobs"
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(TWO_LEFT_OPEN), str(targets), str(jobs)],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "ended\n", done.stderr[-2000:]
    assert list(targets.glob("*.json")) == [] and list(jobs.glob("*.json")) == [], done.stderr[-2000:]


USERS_SIGUSR2 = """
    called = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))   # submitit's requeue, say
    m = JobMetrics("usr2", publish=Publish(targets_dir=None, job_dir=None))
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.2)
    during = len(called)
    m.close()
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.2)
    print(during, len(called), callable(signal.getsignal(signal.SIGUSR2)))
"""


def test_the_users_own_sigusr2_handler_runs_while_the_job_lives_and_is_put_back():
    """faulthandler took SIGUSR2 without chaining (the user's handler never ran while the job lived) and its
    end set it to SIG_IGN."""
    done = run_script(USERS_SIGUSR2)
    assert done.stdout.split() == ["1", "2", "True"], (done.stdout, done.stderr[-2000:])
    assert "most recent call first" in done.stderr        # the stacks were still dumped (to stderr: no dir)


LOSS_ON_A_DEVICE = """
    import torch

    class OnTheDevice(torch.Tensor):       # a loss on a GPU: the interval's read waits for the device
        is_cpu = False

        def item(self):
            time.sleep(0.3)
            return super().item()
"""

SLOW_LOSS_READ = LOSS_ON_A_DEVICE + """
    try:
        with JobMetrics("slow-read", log_every=10) as m:
            for step in range(1, 100):
                if step == 20:
                    signal_in(0.1)                  # lands in step 20's read of the interval's losses
                m.step(loss=torch.tensor(float(step)).as_subclass(OnTheDevice), samples=1)
    except KeyboardInterrupt:
        pass
    print(m.state, m.steps, m.loss_intervals, m.loss, m.loss_sum)
"""


def test_a_stop_signal_during_the_intervals_loss_read_loses_no_interval():
    """The interval was started anew and its losses emptied before the read: the KeyboardInterrupt raised after
    the device sync dropped the interval (loss 5.5 of the first, intervals 1)."""
    done = run_script(SLOW_LOSS_READ)
    state, steps, intervals, loss, loss_sum = done.stdout.split()
    assert (state, steps, intervals) == ("cancelled", "20", "2"), (done.stdout, done.stderr[-2000:])
    assert float(loss) == 15.5 and float(loss_sum) == 5.5 + 15.5


TWO_JOBS = """
    first = JobMetrics("first")
    with first:
        time.sleep(1.5)
        first.step(loss=1.0, samples=1)
    created = time.time()
    second = JobMetrics("second")
    with second:
        second.step(loss=1.0, samples=1)
    print(round(first.phases.totals()["init"], 2), round(second.phases.totals()["init"], 2),
          second.phases.process_start >= created)
"""


def test_a_second_job_in_one_process_starts_its_init_at_its_creation():
    """Its init counted from the process's start: the first job's whole life was the second's init."""
    done = run_script(TWO_JOBS)
    first_init, second_init, from_creation = done.stdout.split()
    assert float(first_init) > 0.1            # the process's imports (torch's): the first job's init
    assert float(second_init) < 0.5 and from_creation == "True", (done.stdout, done.stderr[-2000:])


BLOCKS_IN_ANY_ORDER = """
    STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    signal.signal(signal.SIGTERM, lambda signum, frame: print("users", flush=True))   # the user's own
    before = [signal.getsignal(signum) for signum in STOPS]

    def job(name):
        return JobMetrics(name, publish=Publish(targets_dir=None, job_dir=None))

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

    def stop_by_sigterm():
        try:
            sigterm()
        except KeyboardInterrupt as stop:
            return stop

    def handlers_back():
        return [signal.getsignal(signum) for signum in STOPS] == before

    a, b = job("fifo-a"), job("fifo-b")          # ended in the order they began
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    stop = stop_by_sigterm()
    b.__exit__(type(stop), stop, None)
    print("fifo", a.state, stop is not None, b.state, handlers_back())

    a, b = job("lifo-a"), job("lifo-b")
    try:
        with a:
            with b:
                pass
            sigterm()
        a_stopped = False
    except KeyboardInterrupt:
        a_stopped = True
    print("lifo", b.state, a_stopped, a.state, handlers_back())

    try:
        with job("raised") as c:
            raise RuntimeError("the loop broke")
    except RuntimeError:
        pass
    print("raised", c.state, handlers_back())

    d = job("twice")                             # one JobMetrics entered twice (its start(), then `with` twice)
    with d:
        with d:
            pass
    print("twice", d.state, handlers_back())

    def end_then_signal(stats):                   # a tracker upload in a's last interval, in a's end
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

    a = JobMetrics("ending-a", publish=Publish(targets_dir=None, job_dir=None), log_every=100,
                   on_log=end_then_signal)
    b = job("ending-b")
    a.__enter__()
    b.__enter__()
    a.step(loss=1.0, samples=1)
    try:
        a.__exit__(None, None, None)
        stop = None
    except KeyboardInterrupt as raised:           # b's stop, raised once a's end is over
        stop = raised
    b.__exit__(type(stop), stop, None)
    print("ending", a.state, stop is not None, b.state, handlers_back())
    print("after", stop_by_sigterm() is not None)
"""


def test_with_blocks_ending_in_any_order_give_the_stop_signals_back_and_stop_the_open_one():
    """Each block saved the handlers it found and put them back at its end: two that ended in the order they
    began (A in, B in, A out, B out) left A's handler for good, every later SIGTERM ignored (it only 'hurried'
    A's long-ended linger), and with B still open a SIGTERM went to the user's handler, past B. A stop signal
    while one block ends (its final interval's upload) hurries that one and stops the other once it ended (raised
    in the first one's end, it cut its linger, its final state unread)."""
    done = run_script(BLOCKS_IN_ANY_ORDER)
    assert done.stdout.splitlines() == [
        "fifo completed True cancelled True",
        "lifo completed True cancelled True",
        "raised failed True",
        "twice completed True",
        "ending completed True cancelled True",
        "users",
        "after False",
    ], (done.stdout, done.stderr[-3000:])


ENDED_OFF_THE_MAIN_THREAD = """
    signal.signal(signal.SIGTERM, lambda signum, frame: print("users", flush=True))
    m = JobMetrics("off-main", publish=Publish(targets_dir=None, job_dir=None))
    m.__enter__()
    ending = threading.Thread(target=m.__exit__, args=(None, None, None))
    ending.start()
    ending.join()
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    print(m.state, signal.getsignal(signal.SIGTERM).__name__)
"""


def test_a_block_ended_off_the_main_thread_gives_the_stop_signals_back():
    """Its end put the handlers back with signal.signal() off the main thread: a ValueError out of __exit__, and
    the block's handler left for good (every later SIGTERM swallowed: the user's handler never ran again)."""
    done = run_script(ENDED_OFF_THE_MAIN_THREAD)
    assert done.stdout.split() == ["users", "users", "completed", "<lambda>"], (done.stdout, done.stderr[-2000:])
    assert "Exception in thread" not in done.stderr, done.stderr[-2000:]


SIGNALS_AT_THE_HANDOVER = """
    import trainmetrics.trainer.metrics as metrics_module
    STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    signal.signal(signal.SIGTERM, lambda signum, frame: print("users", flush=True))   # the user's own
    before = [signal.getsignal(signum) for signum in STOPS]
    take = signal.signal

    def signalled_once(when, signum):
        # signal.signal, a signal coming the moment `when` says (a Ctrl-C, a SIGTERM from the terminal)
        sent = []

        def handover(number, handler):
            found = take(number, handler)
            if not sent and when(number, handler):
                sent.append(number)
                signal.raise_signal(signum)
            return found
        return handover

    def job(name):
        return JobMetrics(name, publish=Publish(targets_dir=None, job_dir=None))

    # A Ctrl-C once the block's SIGINT handler is taken, before the others are.
    signal.signal = signalled_once(lambda number, handler: number == signal.SIGINT and handler != before[0],
                                   signal.SIGINT)
    entered = job("entering")
    try:
        with entered:
            print("began")
    except KeyboardInterrupt:
        pass
    signal.signal = take
    print("entering", entered.state, [signal.getsignal(signum) for signum in STOPS] == before)

    # A SIGTERM while the block's end gives the handlers back, SIGINT's back already, SIGTERM's not yet.
    left = job("leaving")
    left.__enter__()
    signal.signal = signalled_once(lambda number, handler: number == signal.SIGINT and handler is before[0],
                                   signal.SIGTERM)
    try:
        left.__exit__(None, None, None)
        print("leaving", left.state)
    except BaseException as error:
        print("leaving", type(error).__name__)
    signal.signal = take
    print("back", [signal.getsignal(signum) for signum in STOPS] == before)
    with job("later") as later:         # a later block takes SIGTERM again
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        except KeyboardInterrupt:
            print("later stopped")
"""


def test_a_stop_signal_while_a_block_takes_or_gives_back_the_handlers_leaves_them_as_they_were():
    """A Ctrl-C just after a block took SIGINT raised in _BlockSignals.enter(), called outside __enter__'s try: the
    block never ended (queued, its handlers never given back), and no later block took SIGTERM (one was still
    open). A SIGTERM while the handlers were given back (forgotten before each was back) found none to give the
    signal to: deliver() raised it to itself without end, a RecursionError out of __exit__, the signal ours for
    good (SIGTERM never ended the process again)."""
    done = run_script(SIGNALS_AT_THE_HANDOVER)
    assert done.stdout.splitlines() == ["entering cancelled True", "users", "leaving completed", "back True",
                                        "later stopped"], (done.stdout, done.stderr[-3000:])


class SlowLoader:
    """A loader whose start (its workers) and end (joining them) take time, as a DataLoader's do."""

    def __init__(self, batches: int, start: float, end: float):
        self.batches, self.start, self.end = batches, start, end

    def __iter__(self):
        time.sleep(self.start)
        for index in range(self.batches):
            yield index
        time.sleep(self.end)


def test_a_loaders_start_and_end_are_data_wait():
    """iter() (workers started) ran before the wait's clock and the StopIteration's next() (workers joined)
    was never added: 42 % of a real DataLoader's wait was booked as compute."""
    metrics = JobMetrics("loader-edges")
    metrics.start()
    for _ in metrics.timed(SlowLoader(3, start=0.2, end=0.3)):
        metrics.step(loss=1.0, samples=1)
    totals = metrics.phases.totals()
    metrics.finish("completed")
    metrics.close()
    assert metrics.data_waits.sum == pytest.approx(0.5, abs=0.05)
    assert totals["data_wait"] == pytest.approx(0.5, abs=0.05) and totals["compute"] < 0.05
    assert sum(metrics.data_waits.counts) == 4          # three batches and the end of the pass


def test_start_twice_keeps_the_training_time_as_training():
    """start() then `with`: the second start reset the loop's clock, its first 0.3 s of training became init."""
    metrics = JobMetrics("started-twice")
    metrics.start()
    began = time.perf_counter()
    time.sleep(0.3)
    metrics.step(samples=1)
    before = metrics.phases.totals()
    with metrics:
        time.sleep(0.3)
        metrics.step(samples=1)
        trained = time.perf_counter() - began      # both sleeps, as long as a busy host made them
    after = metrics.phases.totals()
    assert after["init"] == pytest.approx(before["init"], abs=0.01)
    assert after["compute"] == pytest.approx(trained, abs=0.02) and trained >= 0.6


@pytest.mark.parametrize("samples", [np.float32(8.0), torch.tensor(8.0), torch.ones(8).sum(), np.float64(8.0)])
def test_whole_sample_counts_of_any_float_type_count(samples):
    """np.float32(8.0) and a 0-d float tensor (a mask's sum) were dropped with a warning."""
    metrics = JobMetrics("float-samples")
    metrics.start()
    metrics.step(samples=samples)
    metrics.finish("completed")
    assert value(metrics, "trainer_samples_total") == 8
    metrics.close()


def test_a_loss_read_that_fails_moves_on_instead_of_piling_the_losses_up():
    """Put back after any failure, losses that cannot be summed (shapes that do not stack) were read again at
    every step: the list grew and every step slowed, and no interval was ever counted again."""
    class OnTheDevice(torch.Tensor):
        is_cpu = False

    metrics = JobMetrics("unstackable", log_every=2)
    metrics.start()
    for step in range(10):
        metrics.step(loss=torch.ones(3 if step % 2 else 2).as_subclass(OnTheDevice), samples=1)
    assert len(metrics._losses.tensors) < 2 and metrics._next_log_step == 12
    metrics.finish("completed")
    metrics.close()


def test_start_after_set_state_running_starts_the_loop():
    """start() returned at once for a job set `running` by hand: its start time and the loop's clock never began."""
    metrics = JobMetrics("set-running")
    metrics.set_state("running")
    metrics.start()
    assert metrics.start_time is not None and metrics.phases.loop_began is not None
    metrics.finish("completed")
    metrics.close()


UNDER_NOHUP = """
    from trainmetrics.trainer.stopping import StopFlag

    flag = StopFlag.for_process()
    signal.raise_signal(signal.SIGHUP)
    with JobMetrics("nohup") as m:
        signal.raise_signal(signal.SIGHUP)
        m.step(loss=1.0, samples=1)
    print(flag.outcome, m.state, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)
"""


def test_under_nohup_sighup_stops_nothing():
    """A handler for SIGHUP undid `nohup`: closing the terminal cancelled the job it was meant to outlive."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(UNDER_NOHUP)], capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert done.stdout.split() == ["None", "completed", "True"], (done.stdout, done.stderr[-2000:])


def test_a_scrape_never_shows_more_step_durations_than_steps():
    """The step-time histogram was collected after the step counter: the loop stepped on between the two reads,
    and a scrape showed a count above the steps (467,806 against 467,124)."""
    metrics = JobMetrics("count-vs-steps")
    metrics.start()
    stepping = threading.Event()

    def loop():
        while not stepping.is_set():
            metrics.step(samples=1)

    stepper = threading.Thread(target=loop)
    stepper.start()
    try:
        seen = []
        for _ in range(300):
            found = samples_by_name(metrics)
            seen.append((found["trainer_step_duration_seconds_count"][0].value,
                         found["trainer_steps_total"][0].value))
    finally:
        stepping.set()
        stepper.join()
    metrics.finish("completed")
    metrics.close()
    assert seen[-1][1] > seen[0][1]                     # it stepped throughout
    assert all(count <= steps for count, steps in seen), [pair for pair in seen if pair[0] > pair[1]][:5]


class OnAccelerator(torch.Tensor):
    """A tensor that says it is not on the CPU, as a CUDA, MPS or XLA one does: step() keeps it to read once per
    interval (no GPU here)."""

    @property
    def is_cpu(self):
        return False


class OnMps(OnAccelerator):
    """A tensor on Apple's MPS as far as the library sees it (no Mac here): its device, and MPS's refusal of float64
    in its own words."""

    @property
    def device(self):
        return torch.device("mps")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if any(value is torch.float64 for value in (*args, *(kwargs or {}).values())):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64. Please use float32 instead.")
        return super().__torch_function__(func, types, args, kwargs)


def started(job_id: str, **kwargs) -> JobMetrics:
    metrics = JobMetrics(job_id, **kwargs)
    metrics.start()
    return metrics


def ended(metrics: JobMetrics) -> None:
    metrics.finish("completed")
    metrics.close()


@pytest.mark.parametrize("where", ["cpu", "accelerator", "numpy"])
def test_a_loss_of_many_values_is_refused_on_every_device(where, caplog):
    """A loss the loop forgot to reduce (32 per-sample losses): refused on the CPU (item()), but on an accelerator
    kept and summed (a loss of 16 the loop never had), and the interval's list, whose fold then failed, grew
    without bound. Refused alike everywhere, in words that say what to do."""
    def per_sample():
        losses = torch.full((32,), 0.5)
        return {"cpu": losses, "accelerator": losses.as_subclass(OnAccelerator), "numpy": losses.numpy()}[where]

    metrics = started(f"many-values-{where}", log_every=4)
    try:
        for _ in range(4):
            metrics.step(loss=per_sample(), samples=32)
        assert metrics.loss is None and metrics.steps == 4
        assert "a loss of 32 values (reduce it to one)" in caplog.text
    finally:
        ended(metrics)
    endless = started(f"many-values-{where}-endless", log_every=100_000)
    try:
        for _ in range(3 * LOSS_FOLD_LIMIT):
            endless.step(loss=per_sample(), samples=32)
        assert len(endless._losses.tensors) <= LOSS_FOLD_LIMIT
    finally:
        ended(endless)


def test_losses_on_apples_mps_are_summed_in_a_type_it_has(caplog):
    """Every interval's losses were summed on their device in float64, which MPS refuses: no trainer_loss was ever
    published on a Mac (the failure logged once). The fold of a long interval's losses (LOSS_FOLD_LIMIT) too."""
    steps = LOSS_FOLD_LIMIT + 4
    metrics = started("mps-losses", log_every=steps)
    try:
        for index in range(steps):
            metrics.step(loss=torch.tensor(1.0 + index % 2).as_subclass(OnMps), samples=8)
        assert metrics.loss == pytest.approx(1.5), caplog.text
    finally:
        ended(metrics)


def test_a_numpy_loss_of_one_element_is_read_as_a_tensor_of_one_is(caplog):
    """np.array([0.5]) (a one-element tensor's .detach().cpu().numpy()) was refused ("only 0-dimensional arrays can
    be converted to Python scalars"; numpy 1.25 to 2.3 warn) where torch.tensor([0.5]) was read: its losses, its
    evaluation and its sample counts were lost."""
    metrics = started("numpy-one-element", log_every=4)
    try:
        for loss in (np.array([0.5]), torch.tensor([1.5]).numpy(), np.array([[2.5]], np.float32), np.float32(3.5)):
            metrics.step(loss=loss, samples=np.array([8]))
        metrics.eval(loss=np.array([0.25]), accuracy=np.array([0.75]))
        metrics.set_learning_rate(np.array([0.01]))
        assert metrics.loss_intervals == 1 and metrics.loss == pytest.approx(2.0) and metrics.samples == 32
        assert (metrics.eval_loss_min, metrics.eval_accuracy_max, metrics.learning_rate) == (0.25, 0.75, 0.01)
        assert "cannot use" not in caplog.text and "ignoring" not in caplog.text, caplog.text
    finally:
        ended(metrics)


def test_a_phase_the_loop_cannot_mark_is_said_and_counts_as_compute(caplog):
    """`with m.phase("data_wait")` was taken without a word, its time went to compute, and a scrape in it left
    its seconds in data_wait too: the phases added up to more than the loop lived. init, paused and ended the
    same (trainer_phase said paused while the job ran). A name that is not text raised (no metric call does)."""
    metrics = started("marked-data-wait")
    began = time.perf_counter()
    try:
        with caplog.at_level("WARNING", logger="trainmetrics.trainer"):
            for index in range(3):
                with metrics.phase("data_wait"):
                    time.sleep(0.1)
                    if index == 1:
                        metrics.collect()           # a scrape in it
                metrics.step(loss=1.0, samples=1)
            with metrics.phase(["eval"]):
                pass
            with metrics.phase(np.array(["eval", "x"])):
                pass
        lived = time.perf_counter() - began
        totals = metrics.phases.totals()
        assert sum(totals.values()) - totals["init"] <= lived + 0.01, (totals, lived)
        assert totals["data_wait"] == 0 and "phase 'data_wait' is none of" in caplog.text
    finally:
        ended(metrics)


def test_a_jobinfo_rank_that_is_not_one_of_the_jobs_is_refused():
    """Rank 0 alone publishes the job's life: a rank read from the environment as text, or outside world_size
    (world_size forgotten), published no state, info, start or end, silently."""
    for info in (dict(rank="0", world_size=2), dict(rank=1), dict(rank=3, world_size=2), dict(rank=True)):
        with pytest.raises((TypeError, ValueError)):
            JobInfo(model="m", **info)


def test_running_set_without_start_is_said(caplog):
    """set_state("running") in place of start(): every step counted, the whole loop init (goodput 0), no start
    time, and not a word."""
    metrics = JobMetrics("set-running")
    try:
        with caplog.at_level("WARNING", logger="trainmetrics.trainer"):
            metrics.set_state("running")
        assert "before start()" in caplog.text
    finally:
        ended(metrics)


def test_phases_after_the_end_add_no_seconds_and_an_ended_job_cannot_be_entered_again():
    """After finish() the clock stops: a checkpoint or an evaluation after it still added their seconds, past the
    job's end. `with m as x` on an ended job gave x = None (its start's error swallowed)."""
    metrics = started("after-the-end")
    for _ in range(3):
        metrics.step(loss=1.0, samples=1)
    metrics.finish("completed")
    at_end = sum(metrics.phases.totals().values())
    with metrics.checkpoint():
        time.sleep(0.2)
    with metrics.phase("eval"):
        time.sleep(0.1)
    try:
        assert sum(metrics.phases.totals().values()) == pytest.approx(at_end, abs=1e-3)
        with pytest.raises(ValueError, match="already ended"):
            with metrics:
                pass
    finally:
        metrics.close()


def test_a_block_stopped_by_the_code_running_it_ends_cancelled_not_failed():
    """A `with JobMetrics` block in a generator its consumer stopped reading (a `break`: the generator closed,
    GeneratorExit), or in an asyncio task that was cancelled (CancelledError), ended the job `failed`, its
    error_type GeneratorExit or CancelledError: a failure alert for a loop that was only stopped."""
    def training(job_id):
        with JobMetrics(job_id) as metrics:
            jobs.append(metrics)
            for step in range(10):
                metrics.step(loss=1.0, samples=1)
                yield step

    async def training_task():
        with JobMetrics("cancelled-task") as metrics:
            jobs.append(metrics)
            metrics.step(loss=1.0, samples=1)
            await asyncio.sleep(60)

    async def cancel_it():
        task = asyncio.create_task(training_task())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    jobs: list[JobMetrics] = []
    for step in training("closed-generator"):
        if step == 2:
            break
    asyncio.run(cancel_it())
    assert [(job.state, job.error_type) for job in jobs] == [("cancelled", None)] * 2
    assert [state_of(job) for job in jobs] == ["cancelled"] * 2
    assert "trainer_job_failure_info" not in samples_by_name(jobs[0])


def test_a_loss_spike_callback_that_raises_loses_nothing_of_the_interval():
    """The callback ran before the interval was counted: one that raised (caught) left the spike out of the loss
    sum, count, last and minimum, and the interval's on_log call and throughput out (a non-finite loss's too)."""
    def on_spike(step, what):
        raise RuntimeError(what)

    logged = []
    metrics = started("raising-callback", log_every=1, on_log=lambda stats: logged.append(stats.step),
                      diagnostics=Diagnostics(on_loss_spike=on_spike, loss_spike_warmup=3))
    losses = [1.0, 1.0, 1.0, 1.0, 50.0, 1.0, float("nan")]
    try:
        for loss in losses:
            metrics.step(loss=loss, samples=1)
        assert metrics.spikes.spikes == 1 and logged == [1, 2, 3, 4, 5, 6, 7]
        assert (metrics.loss_intervals, metrics.loss_sum) == (len(losses) - 1, sum(losses[:-1]))
    finally:
        ended(metrics)


def test_odd_loss_spike_settings_are_refused_in_one_line_where_the_cli_and_spec_refuse_them():
    """Diagnostics took anything: loss_spike_z="6" failed every log interval after the warm-up (its on_log call,
    throughput and loss lost, a TypeError said once), NaN turned spike detection off in silence, and 0 or -1
    flagged every interval at or above the running mean. The watchdog's hang_seconds the same."""
    for fields in ({"loss_spike_z": "6"}, {"loss_spike_z": float("nan")}, {"loss_spike_z": float("inf")},
                   {"loss_spike_z": 0}, {"loss_spike_z": -1.0}, {"loss_spike_z": True}, {"loss_spike_warmup": 0},
                   {"loss_spike_warmup": 2.5}, {"loss_spike_warmup": "10"}, {"loss_spike_warmup": True},
                   {"hang_seconds": float("nan")}, {"hang_seconds": 0}, {"hang_seconds": "60"}):
        with pytest.raises(ValueError, match=f"^Diagnostics.{next(iter(fields))} must be "):
            Diagnostics(**fields)
    with pytest.raises(TypeError, match="^Diagnostics.on_loss_spike must be callable, not str$"):
        Diagnostics(on_loss_spike="pause")
    # Numbers of any type still do (numpy's, an int for the deviations).
    assert Diagnostics(loss_spike_z=np.float32(3), loss_spike_warmup=np.int64(5)).loss_spike_warmup == 5
    assert Diagnostics(loss_spike_z=4).loss_spike_z == 4


def test_an_intervals_throughput_and_mfu_leave_out_its_evaluation_and_checkpoint():
    """An interval's samples/s and MFU are the training's: an evaluation and a checkpoint inside it were counted as
    its time (a 0.5 s evaluation in 0.1 s of training showed a sixth of the throughput)."""
    logged = []
    metrics = started("interval-throughput", log_every=4, on_log=logged.append, flops_per_sample=1e6, peak_flops=1e9)
    try:
        outside = 0.0
        began = time.perf_counter()
        for step in range(4):
            time.sleep(0.02)
            metrics.step(loss=1.0, samples=10)
            if step == 1:
                block = time.perf_counter()
                with metrics.phase("eval"):
                    time.sleep(0.3)
                with metrics.checkpoint():
                    time.sleep(0.2)
                outside += time.perf_counter() - block
        training = time.perf_counter() - began - outside
        [stats] = logged
        assert stats.samples_per_second == pytest.approx(40 / training, rel=0.05)
        assert stats.mfu == pytest.approx(stats.samples_per_second * 1e6 / 1e9)
    finally:
        ended(metrics)



def test_a_loop_that_passes_no_samples_publishes_no_mfu_rather_than_zero():
    """MFU is samples x FLOPs per sample over the interval's time: a loop calling step() without samples counted
    none, and trainer_model_flops_utilization_ratio read 0, an idle device, for a device the loop kept busy."""
    logged = []
    metrics = started("no-samples-mfu", log_every=2, on_log=logged.append, flops_per_sample=1e6, peak_flops=1e9)
    try:
        for _ in range(4):
            time.sleep(0.01)
            metrics.step(loss=1.0)
        names = {sample.name for family in text_string_to_metric_families(metrics.collect().decode())
                 for sample in family.samples}
        assert [stats.mfu for stats in logged] == [None, None]
        assert "trainer_model_flops_utilization_ratio" not in names
        assert "trainer_steps_total" in names
    finally:
        ended(metrics)

def test_an_unusable_evaluation_or_learning_rate_is_said_once_per_kind(caplog):
    """README: a value the library cannot use "is left out and said once in the log". An evaluation result or a
    learning rate that is no number was said at every call: a loop passing one each interval filled the log."""
    metrics = JobMetrics("said-once")
    try:
        with caplog.at_level("WARNING", logger="trainmetrics.trainer"):
            for _ in range(3):
                metrics.eval(loss="low", accuracy=95)
                metrics.eval(loss=0.5, accuracy=True)
                metrics.set_learning_rate("fast")
        said = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
        assert len(said) == 4, said     # the loss, the accuracy out of range, the bool accuracy, the learning rate
        assert all("not said again" in message for message in said), said
        assert metrics.evaluations.count == 6 and metrics.eval_loss_min == 0.5     # each counts, its values or not
    finally:
        ended(metrics)


def test_a_learning_rate_that_is_not_finite_is_said_once(caplog):
    """set_learning_rate() promises a NaN or infinite one is "left out, said once": it was left out unsaid (a
    scheduler gone NaN showed its last finite rate, flat, and nothing in the log)."""
    metrics = JobMetrics("lr-nan")
    try:
        metrics.set_learning_rate(0.01)
        with caplog.at_level("WARNING", logger="trainmetrics.trainer"):
            for lr in (float("nan"), float("inf"), torch.tensor(float("nan"))):
                metrics.set_learning_rate(lr)
        said = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
        assert len(said) == 1 and "learning rate" in said[0] and "not said again" in said[0], said
        assert metrics.learning_rate == 0.01
    finally:
        ended(metrics)


SLOW_LOSS_READ_ON_A_THREAD = LOSS_ON_A_DEVICE + """
    def train():
        for step in range(1, 100):
            if m.ended:                             # the block ended: the loop stops too
                break
            if step == 20:
                signal_in(0.1)                      # lands in step 20's read of the interval's losses
            m.step(loss=torch.tensor(float(step)).as_subclass(OnTheDevice), samples=1)
            time.sleep(0.01)

    try:
        with JobMetrics("slow-read-thread", log_every=10) as m:
            trainer = threading.Thread(target=train)
            trainer.start()
            trainer.join()
    except KeyboardInterrupt:
        pass
    trainer.join()
    print(m.state, m.loss_intervals, m.loss)
"""


def test_a_stop_signal_held_through_a_loss_read_on_the_loops_own_thread_still_stops_the_block():
    """The loop on a thread of its own, the `with` block waiting on the main thread: a SIGTERM held through the
    interval's loss read was raised on the loop's thread once the losses were counted. It ended that thread (a
    traceback), not the block, which then ended `completed` though the job was stopped at step 20 of 99."""
    done = run_script(SLOW_LOSS_READ_ON_A_THREAD)
    state, intervals, loss = done.stdout.split()
    assert state == "cancelled", (done.stdout, done.stderr[-2000:])
    assert int(intervals) >= 2 and float(loss) >= 15.5          # step 20's interval was counted
    assert "Exception in thread" not in done.stderr, done.stderr[-2000:]


ENTERED_OFF_THE_MAIN_THREAD = """
    signal.signal(signal.SIGTERM, lambda signum, frame: print("users", flush=True))   # the process's own
    m = JobMetrics("entered-off-main", publish=Publish(targets_dir=None, job_dir=None))

    def run():
        with m:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
            print(m.state, flush=True)

    trainer = threading.Thread(target=run)
    trainer.start()
    trainer.join()
    print(m.state, signal.getsignal(signal.SIGTERM).__name__)
"""


def test_a_block_entered_off_the_main_thread_leaves_the_stop_signals_to_the_process():
    """README and docs/metrics.md: only a block entered on the main thread takes the stop signals (Python gives
    handlers to the main thread alone); one entered on another thread leaves them to the process's own handler,
    which runs, and the block trains on to end `completed`, its stop the process's to make."""
    done = run_script(ENTERED_OFF_THE_MAIN_THREAD)
    assert done.stdout.split() == ["users", "running", "completed", "<lambda>"], (done.stdout, done.stderr[-2000:])
    assert "Exception in thread" not in done.stderr, done.stderr[-2000:]


def test_a_loss_on_an_accelerator_overwritten_after_its_step_counts_as_it_was():
    """A loss tensor on an accelerator was kept by reference until the interval's read: one the loop overwrote in
    place after its step (a CUDA graph's static output, replayed each step by torch.compile's reduce-overhead; a
    buffer reused) read as its last value in every step's place (a mean of 4.0 for losses 1, 2, 3 and 4)."""
    output = torch.zeros(()).as_subclass(OnAccelerator)
    metrics = started("overwritten-loss", log_every=4)
    try:
        for loss_value in (1.0, 2.0, 3.0, 4.0):
            output.fill_(loss_value)             # the graph's replay writes this step's loss into the same tensor
            metrics.step(loss=output, samples=1)
        assert metrics.loss == 2.5
    finally:
        ended(metrics)


def test_a_pause_from_a_signal_handler_during_a_data_wait_ends_the_phase_clock_there():
    """A user's preemption handler that calls pause() and sets a flag, the loop stopping at its next batch: the
    wait in flight when the signal came stored its phase back as its batch arrived. The paused job showed
    trainer_phase `compute` for good, and its data wait went on growing after the end: the phases of the loop
    added up to more than the measured time from start() to pause() (0.18 s of data wait in 0.14 s)."""
    metrics = JobMetrics("paused-mid-wait")
    paused_at = []

    def preempted(signum, frame):
        metrics.pause()
        paused_at.append(time.perf_counter())

    def loader():
        for batch in range(12):
            time.sleep(0.02)
            if batch == 4:               # the signal comes while the loop waits for this batch
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.02)
            yield batch

    previous = signal.signal(signal.SIGUSR1, preempted)
    try:
        started = time.perf_counter()
        metrics.start()
        for batch in metrics.timed(loader()):
            time.sleep(0.01)
            metrics.step()
            if paused_at and batch >= 8:     # the loop goes on a few batches before it notices
                break
        time.sleep(0.05)
        phases = {s.labels["phase"]: s.value for s in samples_by_name(metrics)["trainer_phase_seconds_total"]}
        current = [s.labels["phase"] for s in samples_by_name(metrics)["trainer_phase"] if s.value == 1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        metrics.close()
    measured = paused_at[0] - started
    loop = sum(seconds for phase, seconds in phases.items() if phase != "init")
    assert current == ["paused"]
    assert loop <= measured * 1.01 + 0.002, (phases, measured)
    assert loop >= measured * 0.99 - 0.002, (phases, measured)
