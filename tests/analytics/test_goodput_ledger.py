"""The goodput ledger's arithmetic on a job's processes as the lookup finds them (analytics/goodput.py), and a job's
totals across its ranks (analytics/job.py)."""

import pytest

from trainmetrics.analytics import goodput
from trainmetrics.analytics.goodput import ledger
from trainmetrics.analytics.lookup import JobFacts, Process, Timeline, in_order, killed_run, status_of, timeline_of


def facts(*processes: Process) -> JobFacts:
    return JobFacts(job_id="j", info={}, status="completed", processes=list(processes),
                    timeline=Timeline.of([(p.start, p.end) for p in processes if p.start is not None]),
                    upload_seconds=None,
                    owners=frozenset(), fingerprint=frozenset(), now=1000.0)


def found(runs: dict[str, tuple[float, dict[str, float]]], submitted: float,
          checkpointed: dict[str, float] = {}) -> dict[str, list[dict]]:
    """What queries.job_totals and job_facts answer: per instance its start, its phase totals and its totals
    when its last checkpoint write ended."""
    sample = lambda labels, value: {"metric": {"rank": "0", **labels}, "value": [0, str(value)]}  # noqa: E731
    return {"process_start": [sample({"instance": i}, start) for i, (start, _) in runs.items()],
            "phase_seconds": [sample({"instance": i, "phase": phase}, seconds)
                              for i, (_, totals) in runs.items() for phase, seconds in totals.items()],
            "checkpointed": [sample({"instance": i}, seconds) for i, seconds in checkpointed.items()],
            "submitted": [sample({}, submitted)]}


def two_runs(first_state: str, checkpointed: dict[str, float] = {}) -> dict:
    """Submitted at 90; run a: 100-130 (ends first_state); run b: 140-170 resumed from a's checkpoint, whose
    snapshot held 29.5 s of a's 30 (what a did after it: 0.5 s)."""
    a = {"init": 2.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 5.0}                     # 30 s: its life
    b = {"init": 4.0, "restore": 1.0, "compute": 42.5, "data_wait": 7.0, "checkpoint": 5.0}    # 29.5 + 30
    body = ledger(facts(Process("a", start=100.0, end=130.0, state=first_state),
                        Process("b", start=140.0, end=170.0, state="completed")),
                  found({"a": (100.0, a), "b": (140.0, b)}, submitted=90.0, checkpointed=checkpointed))
    assert body.wall_clock_seconds == 80.0
    assert sum(body.seconds.values()) == pytest.approx(80.0) and body.unaccounted_seconds == 0
    assert (body.seconds["queued"], body.seconds["paused"], body.seconds["step"]) == (10.0, 10.0, 42.5)
    return body.seconds


def test_what_a_killed_run_did_after_its_checkpoint_is_lost():
    seconds = two_runs("failed")
    assert (seconds["lost"], seconds["checkpoint"]) == (0.5, 5.0)


def test_what_a_paused_run_did_after_its_stop_checkpoint_is_checkpoint_time_not_lost():
    seconds = two_runs("paused")
    assert (seconds["lost"], seconds["checkpoint"]) == (0.0, 5.5)


def test_lost_seconds_and_their_share_are_one_figure():
    """0.3 ms between two processes' clocks: 0.0 s lost, but 0.0012 % lost (the share from the unrounded)."""
    a = {"init": 2.0, "compute": 20.0003, "data_wait": 3.0, "checkpoint": 5.0}      # 0.3 ms past its snapshot
    b = {"init": 4.0, "restore": 1.0, "compute": 43.0, "data_wait": 7.0, "checkpoint": 5.0}    # 30 carried + 30
    body = ledger(facts(Process("a", start=100.0, end=130.0003, state="failed"),
                        Process("b", start=140.0, end=170.0, state="completed")),
                  found({"a": (100.0, a), "b": (140.0, b)}, submitted=90.0))
    assert body.seconds["lost"] == 0.0 and body.badput_percent["lost"] == 0.0


def test_the_write_of_the_checkpoint_a_killed_run_was_resumed_from_is_checkpoint_time_not_lost():
    """Its snapshot (29.5 s) is taken before the write; the write ended at 29.7 s: 0.2 s of checkpoint, 0.3 s
    of steps thrown away."""
    seconds = two_runs("failed", checkpointed={"a": 29.7})
    assert seconds["lost"] == pytest.approx(0.3) and seconds["checkpoint"] == pytest.approx(5.2)


def test_a_run_thrown_away_whole_loses_what_it_trained_and_keeps_its_init_as_init():
    """Run a (100-110) trained 4 s after a 6 s init and stopped without a checkpoint; run b (120-150) started
    afresh: a's 4 s of training are lost, its init is init (a run paused in its init loses nothing)."""
    a = {"init": 6.0, "compute": 3.0, "data_wait": 1.0}
    b = {"init": 5.0, "compute": 20.0, "data_wait": 5.0}
    for state in ("paused", "failed"):
        body = ledger(facts(Process("a", start=106.0, end=110.0, state=state),
                            Process("b", start=125.0, end=150.0, state="completed")),
                      found({"a": (100.0, a), "b": (120.0, b)}, submitted=100.0))
        assert sum(body.seconds.values()) == pytest.approx(body.wall_clock_seconds) == 50.0
        assert (body.seconds["init"], body.seconds["lost"], body.seconds["paused"]) == (11.0, 4.0, 10.0), state
    in_init = ledger(facts(Process("a", start=None, end=104.0, state="paused", last_seen=104.0),
                           Process("b", start=125.0, end=150.0, state="completed")),
                     found({"a": (100.0, {"init": 4.0}), "b": (120.0, b)}, submitted=100.0))
    assert (in_init.seconds["init"], in_init.seconds["lost"]) == (9.0, 0.0)


def test_the_steps_a_loss_spike_pause_threw_away_are_lost_not_checkpoint_time():
    """Run a (100-130) wrote its last checkpoint at 20 s of its totals (the file's snapshot 19.8 s: its write
    0.2 s), trained 10 s more, and paused on a loss spike without a checkpoint; run b (140-170) resumed from
    that checkpoint. The 10 s were counted as checkpoint time (a stop was taken to have written one)."""
    a = {"init": 2.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 5.0}                     # 30 s: its life
    b = {"init": 4.0, "restore": 1.0, "compute": 37.0, "data_wait": 4.8, "checkpoint": 3.0}    # 19.8 + 30
    body = ledger(facts(Process("a", start=100.0, end=130.0, state="paused"),
                        Process("b", start=140.0, end=170.0, state="completed")),
                  found({"a": (100.0, a), "b": (140.0, b)}, submitted=90.0, checkpointed={"a": 20.0}))
    assert body.seconds["lost"] == pytest.approx(10.0) and body.seconds["checkpoint"] == pytest.approx(3.2)
    assert sum(body.seconds.values()) == pytest.approx(body.wall_clock_seconds) == 80.0


def test_a_resumed_run_stopped_in_its_init_counts_as_init_not_checkpoint():
    """Run a (100-130) paused after its stop checkpoint (snapshot 29.5 s); run b (140-150) resumed from it and
    was paused again in its init, before its first step (no start, no checkpoint); run c (160-190) resumed from
    the same checkpoint. b's 10 s were counted as checkpoint time."""
    a = {"init": 2.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 5.0}
    b = {"init": 11.0, "restore": 1.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 4.5}   # 29.5 + 10
    c = {"init": 6.0, "restore": 2.0, "compute": 40.0, "data_wait": 7.0, "checkpoint": 4.5}    # 29.5 + 30
    body = ledger(facts(Process("a", start=100.0, end=130.0, state="paused"),
                        Process("b", start=None, end=150.0, state="paused", last_seen=150.0, process_start=140.0),
                        Process("c", start=160.0, end=190.0, state="completed")),
                  found({"a": (100.0, a), "b": (140.0, b), "c": (160.0, c)}, submitted=90.0))
    assert body.seconds["checkpoint"] == pytest.approx(5.0) and body.seconds["lost"] == 0.0
    assert body.seconds["init"] == pytest.approx(16.0) and body.seconds["paused"] == pytest.approx(20.0)
    assert sum(body.seconds.values()) == pytest.approx(body.wall_clock_seconds) == 100.0


@pytest.mark.parametrize("how", ["paused on a loss spike again", "killed"])
def test_a_resumed_run_gone_before_its_own_first_checkpoint_loses_what_it_trained_and_keeps_its_setup(how):
    """Run a (100-130) paused on a loss spike after its last checkpoint (written by 20 s of its totals, the file's
    snapshot 19.8 s); run b (140-150: init and restore to 143) resumed from it and paused on the spike again (the
    same batch, the same weights), or was killed, before writing a checkpoint of its own; run c (160-190) resumed
    from the same checkpoint. b's 10 s were all checkpoint time (paused: taken for a stop that wrote one), or all
    lost with its 3 s of setup (killed)."""
    a = {"init": 2.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 5.0}                     # 30 s: its life
    b = {"init": 4.0, "restore": 1.0, "compute": 18.0, "data_wait": 2.8, "checkpoint": 4.0}    # 19.8 + 10
    c = {"init": 4.5, "restore": 0.5, "compute": 34.0, "data_wait": 5.8, "checkpoint": 5.0}    # 19.8 + 30
    run_b = (Process("b", start=143.0, end=150.0, state="paused", written=0.0, checkpoints=2.0)
             if how != "killed" else
             Process("b", start=143.0, state="running", last_seen=150.0, process_start=140.0, written=0.0,
                     checkpoints=2.0))
    processes = [Process("a", start=102.0, end=130.0, state="paused", written=2.0, checkpoints=2.0), run_b,
                 Process("c", start=163.0, end=190.0, state="completed", written=1.0, checkpoints=3.0)]
    job = JobFacts(job_id="j", info={}, status="completed", processes=processes,
                   timeline=Timeline.of([(p.start, p.stop(190.0)) for p in processes]), upload_seconds=None,
                   owners=frozenset(), fingerprint=frozenset(), now=1000.0)
    body = ledger(job, found({"a": (100.0, a), "b": (140.0, b), "c": (160.0, c)}, submitted=90.0,
                             checkpointed={"a": 20.0}))
    assert body.seconds == pytest.approx({"queued": 10.0, "init": 7.5, "restore": 0.5, "step": 34.0, "data_wait": 5.8,
                                          "eval": 0.0, "checkpoint": 5.2, "paused": 20.0, "lost": 17.0})
    assert body.wall_clock_seconds == 100.0 and body.unaccounted_seconds == 0


def test_runs_shorter_than_a_second_are_told_resumed_by_their_checkpoint_counts():
    """The same spike paused twice, in runs of tenths of a second (a small job; runs in one process): what a
    resumed run carried in was under the second that told a fresh start by its seconds, so its predecessor's
    steps were its setup and the spike-paused run's checkpoint time: nothing lost. A run counting more
    checkpoints than it wrote resumed, whatever it carried."""
    a = {"init": 0.02, "compute": 0.2, "data_wait": 0.03, "checkpoint": 0.05}                    # 0.30: its life
    b = {"init": 0.04, "restore": 0.01, "compute": 0.20, "data_wait": 0.028, "checkpoint": 0.02}  # 0.198 + 0.10
    c = {"init": 0.04, "restore": 0.01, "compute": 0.36, "data_wait": 0.058, "checkpoint": 0.03}  # 0.198 + 0.30
    body = ledger(facts(Process("a", start=100.02, end=100.30, state="paused", written=2.0, checkpoints=2.0),
                        Process("b", start=100.43, end=100.50, state="paused", written=0.0, checkpoints=2.0),
                        Process("c", start=100.63, end=100.90, state="completed", written=1.0, checkpoints=3.0)),
                  found({"a": (100.0, a), "b": (100.40, b), "c": (100.60, c)}, submitted=99.9,
                        checkpointed={"a": 0.20}))
    assert body.seconds == pytest.approx({"queued": 0.1, "init": 0.07, "restore": 0.01, "step": 0.36,
                                          "data_wait": 0.058, "eval": 0.0, "checkpoint": 0.032, "paused": 0.2,
                                          "lost": 0.17}, abs=1e-6)
    assert body.unaccounted_seconds == 0 and body.unavailable_reason is None


def test_a_killed_run_scraped_after_its_successor_started_is_not_counted_twice():
    """Run a (100-, hung, still scraped to 150) was killed late; run b (140-170) had been started at 140, resumed from
    a's checkpoint (30 s of totals). a's 20 s after that checkpoint were all lost, b's first 10 s (its init) counted
    too: the phases added up to 90 s of an 80 s wall clock. From b's start the wall clock is b's: a lost 10 s."""
    a = {"init": 2.0, "compute": 40.0, "data_wait": 3.0, "checkpoint": 5.0}                    # 50 s: its life
    b = {"init": 4.0, "restore": 1.0, "compute": 42.5, "data_wait": 7.0, "checkpoint": 5.5}   # 30 carried + 30
    processes = [Process("a", start=102.0, state="running", last_seen=150.0, written=2.0, checkpoints=2.0),
                 Process("b", start=145.0, end=170.0, state="completed", process_start=140.0, written=1.0,
                         checkpoints=3.0)]
    job = JobFacts(job_id="j", info={}, status="completed", processes=processes,
                   timeline=Timeline.of([(p.start, p.stop(170.0)) for p in processes]), upload_seconds=None,
                   owners=frozenset(), fingerprint=frozenset(), now=1000.0)
    body = ledger(job, found({"a": (100.0, a), "b": (140.0, b)}, submitted=90.0, checkpointed={"a": 30.0}))
    assert body.seconds["lost"] == pytest.approx(10.0) and body.seconds["paused"] == 0.0
    assert body.wall_clock_seconds == 80.0 and body.unaccounted_seconds == 0


@pytest.mark.parametrize("set_back", [30.0, 80.0])
def test_a_host_clock_set_back_during_a_run_leaves_the_ledger_within_its_wall_clock_and_says_so(set_back):
    """Run a (100-160: 60 s by its own monotonic counters, 50 s of steps) had its host clock set back 30 s (or 80 s)
    while it ran, so its end timestamp reads 130 (or 80): the wall clock was 40 s with a goodput ratio of 1.25 (or
    -10 s, a negative wall clock, with no ratio), the phases 30 s (80 s) past it and nothing said."""
    a = {"init": 2.0, "compute": 50.0, "data_wait": 3.0, "checkpoint": 5.0}
    body = ledger(facts(Process("a", start=102.0, end=160.0 - set_back, state="completed", written=1.0,
                                checkpoints=1.0)),
                  found({"a": (100.0, a)}, submitted=90.0))
    assert body.wall_clock_seconds == 70.0 and body.goodput_ratio == pytest.approx(50.0 / 70.0, rel=1e-5)
    assert body.unaccounted_seconds == 0 and body.unavailable_reason == goodput.CLOCK_SET_BACK
    assert sum(body.seconds.values()) == pytest.approx(70.0)


@pytest.mark.parametrize("live", [True, False])
def test_a_fresh_successor_read_while_it_runs_or_after_a_kill_is_a_fresh_start(live):
    """Run a (100-110: 6 s of init) trained 4 s and paused on a loss spike before its first checkpoint; run b
    (120-, last scraped at 150) started afresh (nothing to resume from), and runs or was killed. A scrape reads its
    heartbeat a little before its totals: it carried 60 us, not 0, and a's whole life was checkpoint time."""
    a = {"init": 6.0, "compute": 3.0, "data_wait": 1.0}
    b = {"init": 5.0, "compute": 20.0, "data_wait": 5.00006}
    body = ledger(facts(Process("a", start=106.0, end=110.0, state="paused", last_seen=110.0),
                        Process("b", start=125.0, state="running", last_seen=150.0, live=live)),
                  found({"a": (100.0, a), "b": (120.0, b)}, submitted=100.0))
    assert (body.seconds["init"], body.seconds["lost"], body.seconds["checkpoint"]) == (11.0, 4.0, 0.0)


def test_a_job_waiting_to_resume_in_the_fleets_range_waits_paused():
    """Job j ran and paused before the range (1040-1100), was resumed at 1030 and waits for a slot: the job server
    says `queued` (its submission the first one) and trainer_job_resuming. Its 60 s in the range were queued."""
    from trainmetrics.analytics.goodput import fleet

    resuming = {"metric": {"job_id": "j"}, "value": [1100, "1"]}
    found = {"submitted": [{"metric": {"job_id": "j"}, "value": [1100, "1000"]}], "paused": [resuming]}
    seconds = fleet(found, {}, {"j"}, range_start=1040.0, now=1100.0).seconds
    assert (seconds["queued"], seconds["paused"]) == (0.0, 60.0)


def test_a_job_cancelled_while_queued_is_all_queued_to_the_cancel():
    """No process ever ran: the job server's end of it (its own series: state, submission, end) is all there is.
    It had no ledger ("a trainer before the ledger") and stayed `queued` to the analytics for good."""
    server = Process("jobserver:8000", end=130.0, state="cancelled", submitted=100.0)
    facts_ = facts(server)
    assert facts_.latest is server and server.ended_by_server and not server.trainer
    body = ledger(facts_, {})       # a job that never started: no totals are read, the lookup holds it all
    assert body.wall_clock_seconds == 30.0 and body.seconds["queued"] == 30.0 and body.goodput_ratio == 0.0
    assert sum(body.seconds.values()) == 30.0 and body.unaccounted_seconds == 0 and body.unavailable_reason is None


def test_a_job_paused_then_cancelled_is_paused_to_the_cancel():
    """Run a 100-130 paused; the job server cancelled it at 150: 20 s more paused, the wall clock to 150 (it
    ended at the pause, with a goodput ratio as if the job had stopped there)."""
    a = {"init": 2.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 5.0}
    run = Process("a", start=100.0, end=130.0, state="paused", last_seen=130.0)
    server = Process("jobserver:8000", end=150.0, state="cancelled")
    facts_ = facts(run, server)
    assert facts_.processes[-1] is server        # newest: it speaks for the job
    body = ledger(facts_, found({"a": (100.0, a)}, submitted=90.0))
    assert body.wall_clock_seconds == 60.0
    assert (body.seconds["queued"], body.seconds["paused"], body.seconds["step"]) == (10.0, 20.0, 20.0)
    assert body.unaccounted_seconds == 0


def test_when_earlier_runs_are_gone_their_time_is_unaccounted_not_queued():
    """Prometheus holds only run b (140-170), which resumed from a checkpoint with 29.5 s of totals: the 50 s
    from the submission to b's start were called queued, and the carried 29.5 s counted twice (the phases
    added up to more than the wall clock)."""
    b = {"init": 4.0, "restore": 1.0, "compute": 42.5, "data_wait": 7.0, "checkpoint": 5.0}
    body = ledger(facts(Process("b", start=140.0, end=170.0, state="completed")),
                  found({"b": (140.0, b)}, submitted=90.0))
    assert body.wall_clock_seconds == 80.0 and body.seconds["queued"] == 0.0
    assert body.unaccounted_seconds == pytest.approx(80.0 - 59.5) and body.unaccounted_seconds >= 0
    assert "earliest run" in body.unavailable_reason


def test_a_job_without_a_submission_whose_earlier_runs_are_gone_has_a_goodput_ratio_of_at_most_one():
    """A job started without the job server (no submission time) of which Prometheus holds only run b (140-170),
    resumed with 29.5 s of totals: its wall clock started at b's start, so b's carried 42.5 s of steps over 30 s
    of wall clock gave a goodput ratio of 1.42 (unaccounted -29.5 s), which won the comparison's best_goodput."""
    b = {"init": 4.0, "restore": 1.0, "compute": 42.5, "data_wait": 7.0, "checkpoint": 5.0}
    answer = found({"b": (140.0, b)}, submitted=90.0)
    answer["submitted"] = []        # (a job run by hand publishes no submission)
    body = ledger(facts(Process("b", start=140.0, end=170.0, state="completed")), answer)
    assert body.wall_clock_seconds == 59.5 and 0 <= body.goodput_ratio <= 1
    assert body.unaccounted_seconds >= 0 and sum(body.badput_percent.values()) <= 100.0
    assert "upper bound" in body.unavailable_reason
    assert not goodput.complete(body)           # so it cannot win best_goodput (test_scoring.py)
    assert goodput.complete(ledger(facts(Process("b", start=140.0, end=170.0, state="completed")),
                                   found({"b": (140.0, b)}, submitted=90.0)))


def test_a_job_whose_end_timestamp_is_not_in_the_store_yet_is_not_settled():
    """VictoriaMetrics makes a new series searchable seconds after it arrived: a job read as completed before
    its end timestamp showed was settled, and the job server stored its report with the heartbeat for the end
    (and, after a store restart, without its totals) for good."""
    before = Process("a", start=100.0, state="completed", last_seen=130.0)
    after = Process("a", start=100.0, end=129.9, state="completed", last_seen=130.0)
    assert facts(before).end == 130.0 and not facts(before).settled
    assert facts(after).end == 129.9 and facts(after).settled
    killed = Process("k", start=100.0, state="running", last_seen=120.0)          # no end, ever: vanished
    assert JobFacts(job_id="k", info={}, status="vanished", processes=[killed], timeline=Timeline.of([]),
                    upload_seconds=None, owners=frozenset(), fingerprint=frozenset(), now=1000.0).settled


def test_a_killed_run_the_server_ended_is_failed_and_ends_at_its_last_scrape():
    """Run a 100-130 killed -9 (no state of its own: `running`, last scraped at 130); the job server noticed at
    132 and published `failed` with that end. The job is failed, as the job API says, and ended with its run:
    the 2 s the server took to notice are not a pause (they were, with the server's end taken as a cancel's)."""
    a = {"init": 2.0, "compute": 20.0, "data_wait": 3.0, "checkpoint": 5.0}
    run = Process("a", start=100.0, state="running", last_seen=130.0, process_start=100.0)
    server = Process("jobserver:8000", end=132.0, state="failed", submitted=90.0)
    processes = in_order([server, run])
    assert processes[-1] is server and killed_run(processes) is run
    assert status_of(processes[-1]) == "failed"
    timeline = timeline_of(processes, now=1000.0)
    assert (timeline.total_seconds, timeline.paused_seconds) == (30.0, 0.0)
    facts_ = JobFacts(job_id="j", info={}, status="failed", processes=processes, timeline=timeline,
                      upload_seconds=None, owners=frozenset(), fingerprint=frozenset(), now=1000.0)
    assert facts_.end == 130.0 and facts_.settled
    body = ledger(facts_, found({"a": (100.0, a)}, submitted=90.0))
    assert body.wall_clock_seconds == 40.0
    assert (body.seconds["queued"], body.seconds["paused"], body.seconds["step"]) == (10.0, 0.0, 20.0)
    assert body.unaccounted_seconds == 0


def test_a_run_that_stopped_with_its_own_state_is_not_taken_for_a_killed_one():
    """The server's end after a run that published its state (paused, then cancelled while paused) or after one
    still scraped is no notice of a death."""
    paused = Process("a", start=100.0, end=130.0, state="paused", last_seen=130.0, process_start=100.0)
    live = Process("a", start=100.0, state="running", last_seen=130.0, process_start=100.0, live=True)
    server = Process("jobserver:8000", end=150.0, state="cancelled")
    assert killed_run(in_order([paused, server])) is None and killed_run(in_order([live, server])) is None
    assert killed_run(in_order([Process("a", start=100.0, state="running", last_seen=130.0)])) is None


def test_a_multi_rank_jobs_steps_are_the_most_any_rank_counted():
    """A rank killed mid-job was last scraped up to a scrape before its death: the least over the ranks said
    117 steps where rank 0 published its exact 120 with its final state (ranks step together)."""
    from trainmetrics.analytics.job import _assemble

    def sample(instance: str, rank: str, value: float) -> dict:
        return {"metric": {"instance": instance, "rank": rank}, "value": [0, str(value)]}

    body = _assemble(facts(Process("a", start=100.0, end=130.0, state="failed")),
                     {"steps": [sample("a", "0", 120), sample("b", "1", 117)],
                      "samples": [sample("a", "0", 3840), sample("b", "1", 3744)]}, {}, [], None)
    assert (body.performance.total_steps, body.performance.total_samples) == (120, 7584)


def test_the_ledger_of_real_runs_that_pause_on_one_loss_spike_twice(tmp_path, monkeypatch):
    """Three real runs of one job in this process: a pauses on a corrupted batch (step 41, its last checkpoint at
    40), b resumes from 40 (a 1 s slow start, 0.1 s steps) and pauses on the same batch again without a checkpoint
    of its own,
    c resumes from 40 and completes. Against the trainer's own clocks: lost is what a did after its last
    checkpoint's write and all b trained; init is every run's own init (b's slow start in it)."""
    import json
    import time

    from trainmetrics.trainer import faults, phases
    from trainmetrics.trainer import metrics as trainer_metrics
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import run_job
    from trainmetrics.trainer.stopping import StopFlag

    monkeypatch.setattr(phases, "_process_start_taken", True)      # each run's clock starts with its JobMetrics
    seen, close = [], trainer_metrics.JobMetrics.close
    monkeypatch.setattr(trainer_metrics.JobMetrics, "close", lambda self, *a, **k: (seen.append(self), close(self))[1])
    config = dict(job_id="gp", model="mlp", dataset="blobs", epochs=1, log_every=2, checkpoint_every=20,
                  checkpoint_dir=tmp_path / "checkpoints", on_loss_spike="pause", result_file=tmp_path / "result.json")
    submitted = time.time()
    for fault, resume in (({"corrupt_batch": {"step": 41, "scale": 1000}}, False),
                          ({"corrupt_batch": {"step": 41, "scale": 1000}, "slow_start": {"seconds": 1.0},
                            "slow_compute": {"seconds": 0.1}}, True),
                          ({}, True)):
        monkeypatch.setenv(faults.VARIABLE, json.dumps(fault))
        run_job(TrainConfig(**config, resume=resume), StopFlag())
    a, b, c = seen
    assert [m.state for m in seen] == ["paused", "paused", "completed"] and b.checkpoint_durations.count == 0

    sample = lambda labels, value: {"metric": {"rank": "0", **labels}, "value": [0, repr(value)]}  # noqa: E731
    processes, answers = [], {"process_start": [], "phase_seconds": [], "checkpointed": [],
                              "submitted": [sample({}, submitted)]}
    for index, run in enumerate(seen):
        processes.append(Process(f"run-{index}", start=run.start_time, end=run.end_time, state=run.state,
                                 last_seen=run.end_time, process_start=run.phases.process_start,
                                 checkpoints=run.checkpoints, written=run.checkpoint_durations.count))
        answers["process_start"].append(sample({"instance": f"run-{index}"}, run.phases.process_start))
        answers["phase_seconds"] += [sample({"instance": f"run-{index}", "phase": phase}, seconds)
                                     for phase, seconds in run.phases.totals().items()]
        if run.phases.checkpointed is not None:
            answers["checkpointed"].append(sample({"instance": f"run-{index}"}, run.phases.checkpointed))
    job = JobFacts(job_id="gp", info={}, status="completed", processes=processes,
                   timeline=Timeline.of([(p.start, p.end) for p in processes]), upload_seconds=None,
                   owners=frozenset(), fingerprint=frozenset(), now=c.end_time + 1)
    body = ledger(job, answers)

    def own(run) -> dict[str, float]:
        return {phase: seconds - run.phases.carried[phase] for phase, seconds in run.phases.totals().items()}

    b_trained = sum(value for phase, value in own(b).items() if phase not in ("init", "restore"))
    a_after_checkpoint = sum(a.phases.totals().values()) - a.phases.checkpointed
    assert body.seconds["lost"] == pytest.approx(a_after_checkpoint + b_trained, abs=0.01)
    assert body.seconds["init"] == pytest.approx(sum(own(run)["init"] + own(run)["restore"] for run in (a, b))
                                                 + own(c)["init"], abs=0.01)
    assert own(b)["init"] > 1.0 and abs(body.unaccounted_seconds) < 0.01


def test_the_ledger_of_a_real_run_resumed_from_an_older_checkpoint(tmp_path, monkeypatch):
    """A real run checkpoints at steps 10, 20 and 30 and fails at 31; its newest checkpoint does not load (the
    resume falls back to the one before), so the next run resumes from 20 and completes. Lost is what the first
    did after checkpoint 20's write; its steps 21-30 were counted as checkpoint time (the newest write's end
    taken for the end of the write the successor resumed from)."""
    import json
    import time

    from trainmetrics.jobfiles import list_checkpoints
    from trainmetrics.trainer import faults, phases
    from trainmetrics.trainer import metrics as trainer_metrics
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import Trainer, run_job
    from trainmetrics.trainer.stopping import StopFlag

    monkeypatch.setattr(phases, "_process_start_taken", True)
    seen, close, written = [], trainer_metrics.JobMetrics.close, {}
    monkeypatch.setattr(trainer_metrics.JobMetrics, "close", lambda self, *a, **k: (seen.append(self), close(self))[1])
    checkpoint, loss = Trainer.checkpoint, Trainer.loss

    def noting(self):       # the job's totals when each checkpoint's write ended, and how long it took at most
        began = time.perf_counter()
        done = checkpoint(self)
        written[self.metrics.steps] = (self.metrics.phases.checkpointed, time.perf_counter() - began)
        return done

    def failing_at_31(self, outputs, targets):
        if self.metrics.steps + 1 == 31:
            raise RuntimeError("the node went away")
        return loss(self, outputs, targets)

    monkeypatch.setattr(Trainer, "checkpoint", noting)
    monkeypatch.setenv(faults.VARIABLE, json.dumps({"slow_compute": {"seconds": 0.02}}))
    config = dict(job_id="older", model="mlp", dataset="blobs", epochs=1, log_every=5, checkpoint_every=10,
                  checkpoint_dir=tmp_path / "checkpoints", result_file=tmp_path / "result.json")
    monkeypatch.setattr(Trainer, "loss", failing_at_31)
    run_job(TrainConfig(**config), StopFlag())
    monkeypatch.setattr(Trainer, "loss", loss)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest.step == 30
    newest.path.write_bytes(b"not a checkpoint")
    run_job(TrainConfig(**config, resume=True), StopFlag())
    a, b = seen
    # b carried in two checkpoints (10, 20): it resumed from 20.
    assert (a.state, b.state, a.checkpoints, b.checkpoints - b.checkpoint_durations.count) == ("failed", "completed",
                                                                                               3, 2)

    sample = lambda labels, value: {"metric": {"rank": "0", **labels}, "value": [0, repr(value)]}  # noqa: E731
    answers = {"process_start": [], "phase_seconds": [], "checkpointed": [], "submitted": [sample({}, 0.0)]}
    processes = []
    for index, run in enumerate(seen):
        instance = f"run-{index}"
        processes.append(Process(instance, start=run.start_time, end=run.end_time, state=run.state,
                                 last_seen=run.end_time, process_start=run.phases.process_start,
                                 checkpoints=run.checkpoints, written=run.checkpoint_durations.count))
        answers["process_start"].append(sample({"instance": instance}, run.phases.process_start))
        answers["phase_seconds"] += [sample({"instance": instance, "phase": phase}, seconds)
                                     for phase, seconds in run.phases.totals().items()]
        answers["checkpointed"].append(sample({"instance": instance}, run.phases.checkpointed))
    job = JobFacts(job_id="older", info={}, status="completed", processes=processes,
                   timeline=Timeline.of([(p.start, p.end) for p in processes]), upload_seconds=None,
                   owners=frozenset(), fingerprint=frozenset(), now=b.end_time + 1)
    lost = ledger(job, answers).seconds["lost"]
    # From checkpoint 20's snapshot, taken before its write (what the successor carried in), so over by that write
    # at most (docs/api.md): a clean run beside the full suite read 0.086 s over, past the fixed 0.05 s it had.
    after_write, write = written[20]
    expected = sum(a.phases.totals().values()) - after_write
    assert expected - 0.05 <= lost <= expected + write + 0.05, (lost, expected, write)


def test_the_ledger_of_a_real_run_whose_resume_failed_before_it_read_the_jobs_totals(tmp_path, monkeypatch):
    """A real run checkpoints at steps 10 and 20 and pauses; every checkpoint is then unreadable (a disk that lost
    them), so its resume fails in its restore, before it read the job's totals from one: it publishes its state,
    its process start and its end, and no phase totals. The ledger left that run out: the job's wall clock ended at
    the pause (the job's analytics end at the failure), the resume's life in no phase; between two runs it counted
    as paused."""
    import signal
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from trainmetrics.jobfiles import list_checkpoints
    from trainmetrics.trainer import phases
    from trainmetrics.trainer import metrics as trainer_metrics
    from trainmetrics.trainer.config import TrainConfig
    from trainmetrics.trainer.runner import run_job
    from trainmetrics.trainer.stopping import StopFlag

    monkeypatch.setattr(phases, "_process_start_taken", True)      # each run's clock starts with its JobMetrics
    seen, close = [], trainer_metrics.JobMetrics.close
    monkeypatch.setattr(trainer_metrics.JobMetrics, "close",
                        lambda self, *a, **k: (seen.append((self, self.collect().decode())), close(self))[1])
    step = trainer_metrics.JobMetrics.step
    stop = StopFlag()

    def pausing_at_25(self, *args, **kwargs):
        step(self, *args, **kwargs)
        if self.steps == 25:
            stop.request(signal.SIGUSR1)

    monkeypatch.setattr(trainer_metrics.JobMetrics, "step", pausing_at_25)
    config = dict(job_id="unread", model="mlp", dataset="blobs", epochs=1, log_every=5, checkpoint_every=10,
                  checkpoint_dir=tmp_path / "checkpoints", result_file=tmp_path / "result.json")
    submitted = time.time()
    run_job(TrainConfig(**config), stop)
    for checkpoint in list_checkpoints(tmp_path / "checkpoints"):
        checkpoint.path.write_bytes(b"not a checkpoint")
    time.sleep(0.5)         # paused
    run_job(TrainConfig(**config, resume=True), StopFlag())
    (a, _), (b, _) = seen
    assert (a.state, b.state, b.start_time) == ("paused", "failed", None)

    sample = lambda labels, value: {"metric": {"rank": "0", **labels}, "value": [0, repr(value)]}  # noqa: E731
    answers = {"process_start": [], "phase_seconds": [], "checkpointed": [], "submitted": [sample({}, submitted)]}
    processes = []
    for index, (run, text) in enumerate(seen):       # what each run published
        instance = f"run-{index}"
        published = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples
                     if s.name != "trainer_phase_seconds_total"}
        processes.append(Process(instance, start=run.start_time, end=run.end_time, state=run.state,
                                 last_seen=run.end_time, process_start=run.phases.process_start,
                                 checkpoints=published["trainer_checkpoints_total"].value
                                 if "trainer_checkpoints_total" in published else None,
                                 written=run.checkpoint_durations.count))
        answers["process_start"].append(sample({"instance": instance},
                                               published["trainer_process_start_timestamp_seconds"].value))
        answers["phase_seconds"] += [sample({"instance": instance, "phase": s.labels["phase"]}, s.value)
                                     for family in text_string_to_metric_families(text) for s in family.samples
                                     if s.name == "trainer_phase_seconds_total"]
    assert not [s for s in answers["phase_seconds"] if s["metric"]["instance"] == "run-1"]   # none read, none shown
    job = JobFacts(job_id="unread", info={}, status="failed", processes=processes,
                   timeline=Timeline.of([(p.start, p.end) for p in processes if p.start is not None]),
                   upload_seconds=None, owners=frozenset(), fingerprint=frozenset(), now=b.end_time + 1)
    body = ledger(job, answers)
    assert body.wall_clock_seconds == pytest.approx(b.end_time - submitted, abs=0.02)
    assert abs(body.unaccounted_seconds) < 0.02
    assert body.seconds["paused"] == pytest.approx(b.phases.process_start - a.end_time, abs=0.02)
    b_life = b.end_time - b.phases.process_start
    assert body.seconds["init"] == pytest.approx(a.phases.totals()["init"] + b_life, abs=0.02)


def test_the_last_values_of_a_resumed_run_that_failed_its_restore_are_read_at_its_own_final_instant():
    """Each process's last values (its totals, the ledger's phases) are read in the minute before some process's
    final instant, and those instants were the processes' that started training only. A resumed run that failed
    its restore never did: failing more than 15 s after its predecessor's end (its imports on a busy host), it lay
    past every window read, and the ledger left it out, its init and restore with it (restore 0)."""
    paused = Process("a:1 run_id=1", start=100.0, end=110.0, state="paused", last_seen=110.5, process_start=90.0)
    failed = Process("a:2 run_id=2", start=None, end=140.0, state="failed", error_type="ValueError",
                     last_seen=140.5, process_start=115.0)
    assert facts(paused, failed).finals == [155.0, 125.0]
