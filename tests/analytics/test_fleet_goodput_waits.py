"""The fleet's goodput over a range counts every wait of a job that ran before: on history of the series the job
server (jobserver/app.py WaitingJobsCollector) and its trainers publish in each state, one owner per job, in
Prometheus and VictoriaMetrics, read by the summary as the service reads it."""

import pytest

from trainmetrics.analytics import fleet
from trainmetrics.contract import ACCOUNTED_PHASES, JOB_STATES

from .conftest import as_openmetrics, asked, backfilled_history

pytestmark = pytest.mark.slow

RANGE_SECONDS = 600.0


def trainer(job_id: str, instance: str, started: float, last: float, final: str | None, submitted: float | None,
            carried: float = 0.0, checkpoints: tuple[int, int] = (0, 0)) -> list[str]:
    """One trainer process at 10 s from its start of training (its process 5 s before) to `last`: `final` its state
    there with its end (None: killed, its last state running, no end). `submitted`: None for a job started without
    the job server (no submission time). `carried`: the compute seconds it took over from the checkpoint it resumed
    from; `checkpoints`: the checkpoints it counts (carried in and its own), and those it wrote itself."""
    base = f'job_id="{job_id}",instance="{instance}",job="trainer-jobs",rank="0"'
    lines, times = [], [started + i * 10.0 for i in range(int((last - started) / 10) + 1)]
    for t in times if times[-1] == last else [*times, last]:
        ended = final is not None and t == last
        phases = {"init": 5.0, "compute": carried + t - started}
        lines += [f'trainer_job_info{{{base},job_name="{job_id}",model="mlp",dataset="blobs",owner="{job_id}",'
                  f'device="cpu"}} 1 {t:.3f}',
                  f"trainer_process_start_timestamp_seconds{{{base}}} {started - 5:.3f} {t:.3f}",
                  f"trainer_job_start_timestamp_seconds{{{base}}} {started:.3f} {t:.3f}",
                  f"trainer_heartbeat_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}",
                  f"trainer_checkpoints_total{{{base}}} {checkpoints[0]} {t:.3f}",
                  f"trainer_checkpoint_duration_seconds_count{{{base}}} {checkpoints[1]} {t:.3f}"]
        if submitted is not None:
            lines.append(f"trainer_job_submitted_timestamp_seconds{{{base}}} {submitted:.3f} {t:.3f}")
        lines += [f'trainer_phase_seconds_total{{{base},phase="{phase}"}} {phases.get(phase, 0.0):.3f} {t:.3f}'
                  for phase in ACCOUNTED_PHASES]
        lines += [f'trainer_job_state{{{base},state="{state}"}} {int(state == (final if ended else "running"))} '
                  f"{t:.3f}" for state in JOB_STATES]
        if ended:
            lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {t:.3f} {t:.3f}")
    return lines


def server(job_id: str, waits: list[tuple], submitted: float) -> list[str]:
    """The job server's series of a job without a process: (from, to, state, end[, waited]) at 10 s; `resuming`:
    queued, with trainer_job_resuming 1 (a job that ran before); a final state with the end the server gave the job,
    and trainer_job_resuming 1 when `waited` (it ended the job's wait to resume), else 0 (a killed run's notice)."""
    base = f'job_id="{job_id}",instance="server:8000",job="server"'
    lines = []
    for begin, end, said, ended, *waited in waits:
        current, resuming = ("queued" if said == "resuming" else said), said == "resuming" or waited == [True]
        for t in (begin + i * 10.0 for i in range(int((end - begin) / 10) + 1)):
            lines += [f'trainer_job_state{{{base},state="{state}"}} {int(state == current)} {t:.3f}'
                      for state in JOB_STATES]
            lines += [f"trainer_job_submitted_timestamp_seconds{{{base}}} {submitted:.3f} {t:.3f}",
                      f'trainer_job_info{{{base},job_name="{job_id}",owner="{job_id}"}} 1 {t:.3f}']
            lines.append(f"trainer_job_resuming{{{base}}} {int(resuming)} {t:.3f}")
            if ended is not None:
                lines.append(f"trainer_job_end_timestamp_seconds{{{base}}} {ended:.3f} {t:.3f}")
    return lines


def history(now: float) -> str:
    lines = []
    # Paused before its first checkpoint (in its init, or on a loss spike) long before the range, resumed, and
    # started afresh in the range (nothing to resume from: it counts no checkpoint).
    lines += trainer("fresh-after-pause", "h:1", now - 1000, now - 900, "paused", now - 1100)
    lines += server("fresh-after-pause", [(now - 895, now - 700, "paused", None),
                                          (now - 690, now - 410, "resuming", None)], now - 1100)
    lines += trainer("fresh-after-pause", "h:2", now - 395, now, None, now - 1100)
    # Failed in the range (its own state and end), resumed (POST .../resume) 100 s later, waiting for a slot now.
    lines += trainer("failed-waits", "h:3", now - 475, now - 300, "failed", now - 500, checkpoints=(2, 2))
    lines += server("failed-waits", [(now - 200, now, "resuming", None)], now - 500)
    # Killed in the range: the job server published `failed` with its end (the notice of the death) until the
    # resume, then `queued` to resume, waiting now.
    lines += trainer("killed-waits", "h:4", now - 475, now - 300, None, now - 500, checkpoints=(2, 2))
    lines += server("killed-waits", [(now - 299, now - 250, "failed", now - 299),
                                     (now - 200, now, "resuming", None)], now - 500)
    # Killed, resumed from its checkpoint, and paused now.
    lines += trainer("killed-then-paused", "h:5", now - 575, now - 500, None, now - 590, checkpoints=(2, 2))
    lines += server("killed-then-paused", [(now - 499, now - 450, "failed", now - 499),
                                           (now - 440, now - 410, "resuming", None)], now - 590)
    lines += trainer("killed-then-paused", "h:6", now - 395, now - 200, "paused", now - 590, carried=70.0,
                     checkpoints=(4, 2))
    lines += server("killed-then-paused", [(now - 195, now, "paused", None)], now - 590)
    # Failed, resumed, and cancelled while it waited: the job server's end.
    lines += trainer("failed-cancelled", "h:7", now - 475, now - 300, "failed", now - 500, checkpoints=(2, 2))
    lines += server("failed-cancelled", [(now - 250, now - 160, "resuming", None),
                                         (now - 150, now, "cancelled", now - 150, True)], now - 500)
    # Killed, resumed, and cancelled while it waited: the job server's end (it says the job waited: not the notice).
    lines += trainer("killed-cancelled", "h:9", now - 475, now - 300, None, now - 500, checkpoints=(2, 2))
    lines += server("killed-cancelled", [(now - 299, now - 250, "failed", now - 299),
                                         (now - 240, now - 160, "resuming", None),
                                         (now - 150, now, "cancelled", now - 150, True)], now - 500)
    # (As it was: queued from its submission before the range to its first run, paused in the range after it.)
    lines += server("queued-then-paused", [(now - 700, now - 410, "queued", None)], now - 700)
    lines += trainer("queued-then-paused", "h:8", now - 395, now - 300, "paused", now - 700, checkpoints=(1, 1))
    lines += server("queued-then-paused", [(now - 295, now, "paused", None)], now - 700)
    # Started without the job server (no submission time), paused long before the range, and resumed in it from its
    # checkpoint (`trainmetrics train --resume`): its wait in the range, up to the resumed process's start, was a pause.
    lines += trainer("resumed-by-hand", "h:10", now - 1000, now - 900, "paused", None, checkpoints=(1, 1))
    lines += trainer("resumed-by-hand", "h:11", now - 395, now - 100, "completed", None, carried=100.0,
                     checkpoints=(2, 1))
    return as_openmetrics(lines)


backfilled = backfilled_history(history, "fleet-goodput")


def goodput(prometheus, job_id: str) -> tuple[dict[str, float], float]:
    """The fleet goodput's seconds over the last RANGE_SECONDS of the one job `job_id` (its owner's), and where the
    range started."""
    summary = asked(prometheus.url, lambda client: fleet.summary(client, RANGE_SECONDS, 60, owner=job_id,
                                                                 recorded=False))
    assert summary.total_jobs == 1
    return summary.goodput.seconds, summary.evaluated_at - RANGE_SECONDS


def test_a_job_started_afresh_after_a_pause_waited_paused_in_the_range(backfilled):
    """Its run in the range counts no checkpoint (nothing to resume from): its wait in the range, from the range's
    start to that run, was counted as queued, though the job server said it was paused, then waiting to resume."""
    prometheus, now = backfilled
    seconds, start = goodput(prometheus, "fresh-after-pause")
    assert start < now - 400
    assert (seconds["queued"], seconds["paused"]) == (0.0, pytest.approx(now - 400 - start, abs=1e-3))


@pytest.mark.parametrize("job_id", ["failed-waits", "killed-waits"])
def test_a_failed_job_waiting_to_resume_is_paused_from_its_failure_to_now(backfilled, job_id):
    """Its last run failed (or was killed) in the range, and the job server queued it to resume: its wait (the gap a
    resumed run's start closes, counted paused then) was counted as nothing until that run started."""
    prometheus, now = backfilled
    seconds, start = goodput(prometheus, job_id)
    end = start + RANGE_SECONDS
    assert (seconds["queued"], seconds["paused"]) == (20.0, pytest.approx(end - (now - 300), abs=1e-3))


def test_a_killed_job_resumed_and_paused_now_is_paused_to_now(backfilled):
    """The job server's end of its killed run (the notice of the death, before the resume) was taken for the job's
    end: the pause now was cut there, to nothing."""
    prometheus, now = backfilled
    seconds, start = goodput(prometheus, "killed-then-paused")
    end = start + RANGE_SECONDS
    between = (now - 400) - (now - 500)          # from the killed run's last scrape to the resumed one's start
    assert (seconds["queued"], seconds["paused"]) == (10.0, pytest.approx(between + end - (now - 200), abs=1e-3))


@pytest.mark.parametrize("job_id", ["failed-cancelled", "killed-cancelled"])
def test_a_failed_job_resumed_and_cancelled_while_it_waited_is_paused_to_the_cancel(backfilled, job_id):
    """As in the job's own ledger: from its failure to the job server's end of it. (Killed, the server's end was taken
    for the notice of the death: the wait was nothing.)"""
    prometheus, now = backfilled
    seconds, _ = goodput(prometheus, job_id)
    assert (seconds["queued"], seconds["paused"]) == (20.0, pytest.approx(150.0, abs=1e-3))


def test_a_job_queued_before_the_range_and_paused_in_it_waited_queued_then_paused(backfilled):
    prometheus, now = backfilled
    seconds, start = goodput(prometheus, "queued-then-paused")
    end = start + RANGE_SECONDS
    assert seconds["queued"] == pytest.approx(now - 400 - start, abs=1e-3)
    assert seconds["paused"] == pytest.approx(end - (now - 300), abs=1e-3)


def test_a_job_resumed_by_hand_in_the_range_waited_paused_from_the_ranges_start(backfilled):
    """A job run without the job server has no submission time: its wait in the range before its resumed run, which
    its own ledger counts as paused (the gap between its runs), was in no phase of the fleet's."""
    prometheus, now = backfilled
    seconds, start = goodput(prometheus, "resumed-by-hand")
    assert (seconds["queued"], seconds["paused"]) == (0.0, pytest.approx(now - 400 - start, abs=1e-3))
