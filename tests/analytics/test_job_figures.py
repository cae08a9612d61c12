"""How the job analytics assemble figures that more than one series carries (analytics/job.py)."""

import time

import pytest

from trainmetrics.analytics.job import _assemble
from trainmetrics.analytics.lookup import JobFacts, Process, Timeline
from trainmetrics.analytics.shapes import Evaluation
from trainmetrics.contract import JOB_STATES


def test_the_last_evaluation_is_one_number_wherever_the_answer_gives_it():
    # VictoriaMetrics converts each block's values from one decimal exponent: the same stored loss can come
    # back a unit in the last place apart from two series (seen: 0.232642251849 and 0.23264225184899998).
    process = Process("127.0.0.1:9000", start=100.0, end=160.0, state="completed")
    facts = JobFacts(job_id="j", info={}, status="completed", processes=[process],
                     timeline=Timeline.of([(100.0, 160.0)]), upload_seconds=None, owners=frozenset(),
                     fingerprint=frozenset(), now=200.0)
    sample = lambda value: [{"metric": {"instance": process.key, "rank": "0"}, "value": [160, value]}]  # noqa: E731
    found = {"eval_loss": sample("0.23264225184899998"), "eval_accuracy": sample("0.90000000000000002")}
    history = [Evaluation(step=50, loss=0.5, accuracy=0.7, time=130.0),
               Evaluation(step=100, loss=0.232642251849, accuracy=0.9, time=150.0)]
    body = _assemble(facts, found, {}, history, None)
    assert body.losses.final_eval_loss == body.evaluations[-1].loss == 0.232642251849
    assert body.losses.final_eval_accuracy == body.evaluations[-1].accuracy == 0.9
    # Without a history (none read), the newest trainer_eval_loss sample says it.
    alone = _assemble(facts, found, {}, [], None)
    assert alone.losses.final_eval_loss == 0.23264225184899998 and alone.evaluations == []


def test_a_job_killed_and_resumed_reads_its_resumed_runs_counts_before_it_catches_up():
    """Killed at step 135 after its checkpoint at 100, resumed and at step 109: the job's analytics said 135 steps
    and the best losses of evaluations that were thrown away (the highest or lowest over its processes), where
    the trainer's own figures, carried over the resume, are the resumed process's."""
    killed = Process("127.0.0.1:9000", start=100.0, end=None, state="running")
    resumed = Process("127.0.0.1:9001", start=200.0, end=None, state="running", live=True)
    facts = JobFacts(job_id="j", info={}, status="running", processes=[killed, resumed],
                     timeline=Timeline.of([(100.0, 150.0), (200.0, 230.0)]), upload_seconds=None,
                     owners=frozenset(), fingerprint=frozenset(), now=230.0)

    def samples(by_process: tuple[str, str]) -> list[dict]:
        return [{"metric": {"instance": process.key, "rank": "0"}, "value": [230, value]}
                for process, value in zip((killed, resumed), by_process)]

    def rank_1(values: tuple[str, str]) -> list[dict]:      # none of rank 0's processes: by their heartbeat
        return [{"metric": {"instance": instance, "rank": "1"}, "value": [230, value]}
                for instance, value in zip(("127.0.0.1:9101", "127.0.0.1:9100"), values)]     # newest listed first

    found = {"steps": samples(("135", "109")) + rank_1(("108", "134")),
             "samples": samples(("2160", "1744")) + rank_1(("1728", "2144")),
             "last_heartbeat": rank_1(("229", "150")),
             "loss_min": samples(("0.15557", "0.18404")), "eval_loss_min": samples(("0.23314", "0.25985")),
             "eval_accuracy_max": samples(("0.93125", "0.92625"))}
    body = _assemble(facts, found, {}, [], None)
    assert (body.performance.total_steps, body.performance.total_samples) == (109, 1744 + 1728)
    assert (body.losses.best, body.losses.best_eval_loss, body.losses.best_eval_accuracy) == (0.18404, 0.25985,
                                                                                              0.92625)


def test_where_the_average_stands_for_the_peak_the_peak_has_no_time():
    """A window's rate below the run's average (a run barely longer than one window, seen under load) was replaced
    by the average as the peak, while its time still said when that lower rate was measured."""
    from trainmetrics.analytics.job import Peak

    process = Process("127.0.0.1:9000", start=100.0, end=100.9, state="completed")
    facts = JobFacts(job_id="j", info={}, status="completed", processes=[process],
                     timeline=Timeline.of([(100.0, 100.9)]), upload_seconds=None, owners=frozenset(),
                     fingerprint=frozenset(), now=200.0)
    found = {"samples": [{"metric": {"instance": process.key, "rank": "0"}, "value": [101, "900"]}]}
    body = _assemble(facts, found, {"samples_per_second": Peak(value=800.0, at=100.95, mean=800.0)}, [], None)
    assert body.performance.peak_samples_per_second == body.performance.average_samples_per_second == 1000.0
    assert body.performance.peak_samples_per_second_at is None


def test_a_stored_report_missing_parts_is_not_taken_for_more_of_the_job():
    """A stored report is text in the job's row (an edited one reads back with nulls): comparing it with what
    Prometheus holds raised AttributeError, a 500 for a job Prometheus still held."""
    from trainmetrics.analytics.cache import holds_less
    from trainmetrics.analytics.shapes import JobAnalytics, from_plain

    answer = from_plain(JobAnalytics, {"job_id": "j", "start_time": 100.0, "duration": {"total_seconds": 50.0},
                                       "evaluations": [], "goodput": {}, "source": "prometheus"})
    assert not holds_less(answer, from_plain(JobAnalytics, {"job_id": "j", "start_time": 100.0}))
    assert holds_less(answer, from_plain(JobAnalytics, {"job_id": "j", "start_time": 90.0,
                                                        "duration": {"total_seconds": 60.0}}))


def test_the_data_wait_share_is_the_loops_newest_totals_and_never_over_100_percent():
    """The share was the data-wait histogram over the step-time one, every process's: the wait that ends each pass (a
    DataLoader joining its workers) is data wait in no step, and a job of one step a pass read 120 % (109 % from a real
    `trainmetrics train --workers 2` on a 40-row CSV). It is the data_wait phase's share of the loop phases' seconds,
    each rank's newest process's totals (a resumed process carries the job's on from its checkpoint)."""
    killed = Process("127.0.0.1:9000", start=100.0, end=None, state="running")
    resumed = Process("127.0.0.1:9001", start=200.0, end=230.0, state="completed")
    facts = JobFacts(job_id="j", info={}, status="completed", processes=[killed, resumed],
                     timeline=Timeline.of([(100.0, 150.0), (200.0, 230.0)]), upload_seconds=None,
                     owners=frozenset(), fingerprint=frozenset(), now=240.0)
    rank_1 = "127.0.0.1:9100"

    def sample(instance: str, rank: str, value: float, **labels) -> dict:
        return {"metric": {"instance": instance, "rank": rank, **labels}, "value": [230, str(value)]}

    phases = {(killed.key, "0"): {"data_wait": 0.3, "compute": 0.1, "optimizer": 0.02, "collective": 0.0},
              (resumed.key, "0"): {"data_wait": 0.45, "compute": 0.08, "optimizer": 0.03, "collective": 0.0},
              (rank_1, "1"): {"data_wait": 0.4, "compute": 0.1, "optimizer": 0.05, "collective": 0.0,
                              "eval": 3.0, "init": 5.0}}
    found = {"phase_seconds": [sample(instance, rank, value, phase=phase)
                               for (instance, rank), totals in phases.items() for phase, value in totals.items()],
             # The histograms (each process's own): what the share was read from.
             "data_wait_seconds": [sample(killed.key, "0", 0.3), sample(resumed.key, "0", 0.2),
                                   sample(rank_1, "1", 0.4)],
             "step_seconds": [sample(killed.key, "0", 0.25), sample(resumed.key, "0", 0.15),
                              sample(rank_1, "1", 0.35)]}
    body = _assemble(facts, found, {}, [], None)
    assert body.performance.data_wait_percent == pytest.approx(100 * (0.45 + 0.4) / (0.56 + 0.55), rel=1e-5)


def test_a_fresh_run_that_failed_in_its_init_has_its_queue_and_init_in_its_ledger(tmp_path):
    """A job whose only run failed in its init (a bad dataset: no start of training) had none of its last values
    read, the analytics reading them for jobs that started training only: its goodput ledger said the trainer
    published no phase totals ("a trainer before the ledger"), where its run published its init's seconds and the
    job server its submission."""
    from .conftest import as_openmetrics, asked, backfilled_prometheus, running
    from trainmetrics.analytics.job import job_analytics

    spawned = time.time() - 600
    end = spawned + 8.0
    base = 'job_id="init-failed",instance="h:1",job="trainer",rank="0"'
    lines = []
    for t in [spawned + 0.5 + i for i in range(9)]:     # scraped each second, its final scrape after its end
        final = t > end
        lines += [f'trainer_job_info{{{base},job_name="x",owner="carol",device="cpu"}} 1 {t:.3f}',
                  f"trainer_process_start_timestamp_seconds{{{base}}} {spawned:.3f} {t:.3f}",
                  f"trainer_job_submitted_timestamp_seconds{{{base}}} {spawned - 5:.3f} {t:.3f}",
                  f"trainer_heartbeat_timestamp_seconds{{{base}}} {min(t, end):.3f} {t:.3f}",
                  f'trainer_phase_seconds_total{{{base},phase="init"}} {min(t, end) - spawned:.3f} {t:.3f}']
        lines += [f'trainer_job_state{{{base},state="{s}"}} {int(s == ("failed" if final else "running"))} {t:.3f}'
                  for s in JOB_STATES]
        if final:
            lines += [f"trainer_job_end_timestamp_seconds{{{base}}} {end:.3f} {t:.3f}",
                      f'trainer_job_failure_info{{{base},error_type="FileNotFoundError"}} 1 {t:.3f}']
    with running(backfilled_prometheus(tmp_path, as_openmetrics(lines))) as prometheus:
        body = asked(prometheus.url, lambda client: job_analytics(client, "init-failed", 3600.0))
    assert (body.status, body.start_time, body.end_time) == ("failed", None, pytest.approx(end))
    goodput = body.goodput
    assert goodput.unavailable_reason is None and goodput.goodput_ratio == 0.0
    assert (goodput.seconds["queued"], goodput.seconds["init"]) == (pytest.approx(5.0), pytest.approx(8.0))
    assert goodput.wall_clock_seconds == pytest.approx(13.0) and abs(goodput.unaccounted_seconds) < 0.01
