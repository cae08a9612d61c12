"""The efficiency formula and the comparison's winners on hand-checked cases."""

import math

import pytest

from trainmetrics.analytics import scoring


def test_throughput_score_is_average_over_peak_in_percent():
    assert scoring.throughput_score(450.0, 600.0) == pytest.approx(75.0)
    assert scoring.throughput_score(600.0, 600.0) == pytest.approx(100.0)
    assert scoring.throughput_score(700.0, 600.0) == 100.0          # capped: extrapolation can overshoot
    assert scoring.throughput_score(0.0, 600.0) == 0.0
    assert scoring.throughput_score(450.0, 0.0) is None
    assert scoring.throughput_score(None, 600.0) is None
    assert scoring.throughput_score(450.0, math.nan) is None


def test_gpu_score_is_the_mean_utilisation_clamped():
    assert scoring.gpu_utilization_score(98.5) == 98.5
    assert scoring.gpu_utilization_score(101.0) == 100.0
    assert scoring.gpu_utilization_score(None) is None


def test_overall_score_weights_gpu_0_6_and_throughput_0_4():
    # 0.6 * 90 + 0.4 * 75 = 54 + 30 = 84
    assert scoring.overall_score(90.0, 75.0) == pytest.approx(84.0)
    # Without GPU data the throughput score stands alone (weights renormalised), and vice versa.
    assert scoring.overall_score(None, 75.0) == pytest.approx(75.0)
    assert scoring.overall_score(90.0, None) == pytest.approx(90.0)
    assert scoring.overall_score(None, None) is None


def test_efficiency_block_for_a_gpu_job_and_a_cpu_job():
    # GPU 80 %, 300 of a 400 samples/s peak: throughput 75, overall 0.6*80 + 0.4*75 = 78
    assert scoring.efficiency(80.0, 300.0, 400.0) == {"gpu_utilization_score": 80.0, "throughput_score": 75.0,
                                                      "overall_score": 78.0}
    assert scoring.efficiency(None, 300.0, 400.0) == {"gpu_utilization_score": None, "throughput_score": 75.0,
                                                      "overall_score": 75.0}


def row(job_id, status="completed", **values):
    return {"job_id": job_id, "status": status, "throughput": None, "final_loss": None,
            "duration_seconds": None, "overall_score": None, "samples_per_joule": None, "goodput_ratio": None,
            "energy_complete": True, "efficiency_complete": True, "goodput_complete": True, **values}


def test_most_energy_efficient_counts_only_jobs_whose_energy_was_counted_whole():
    """A GPU job whose GPU energy went uncounted, or one whose CPU energy came from one host of two, had a
    CPU share for its whole energy and won the category (300 samples/J against 100)."""
    rows = [row("partial", samples_per_joule=300.0, energy_complete=False), row("whole", samples_per_joule=100.0)]
    assert scoring.winners(rows)[0]["most_energy_efficient"] == "whole"


def test_best_goodput_counts_only_jobs_whose_ratio_is_not_an_upper_bound():
    """A job started by hand whose earliest runs Prometheus lost has a goodput ratio that is an upper bound (its
    wall clock starts the least time the gone runs took): it won best_goodput over a job whose ledger is whole."""
    rows = [row("bound", goodput_ratio=0.95, goodput_complete=False), row("whole", goodput_ratio=0.7)]
    assert scoring.winners(rows)[0]["best_goodput"] == "whole"
    winner, _, reasons = scoring.winners(rows[:1])
    assert winner["best_goodput"] is None
    assert reasons == {"best_goodput": "no job with a goodput ratio had its whole ledger: each is an upper bound "
                                       "(goodput_complete): bound"}


def test_winners_per_category():
    rows = [row("a", throughput=100.0, final_loss=0.30, duration_seconds=60.0, overall_score=70.0,
                samples_per_joule=41.5, goodput_ratio=0.61),
            row("b", throughput=250.0, final_loss=0.25, duration_seconds=90.0, overall_score=65.0,
                samples_per_joule=12.0, goodput_ratio=0.83),
            row("c", throughput=180.0, final_loss=0.40, duration_seconds=30.0, overall_score=80.0)]
    winner, ties, _ = scoring.winners(rows)
    assert winner == {"best_throughput": "b", "best_loss": "b", "fastest": "c", "most_efficient": "c",
                      "most_energy_efficient": "a", "best_goodput": "b"}
    assert ties == {}


def test_fastest_counts_only_completed_jobs():
    rows = [row("quick-fail", status="failed", duration_seconds=5.0),
            row("slow-done", duration_seconds=500.0),
            row("cancelled", status="cancelled", duration_seconds=1.0)]
    winner, *_ = scoring.winners(rows)
    assert winner["fastest"] == "slow-done"


def test_ties_are_stated_and_the_first_requested_job_is_named():
    rows = [row("x", throughput=200.0, final_loss=0.1, duration_seconds=10.0, overall_score=50.0),
            row("y", throughput=200.0000001, final_loss=0.2, duration_seconds=10.0, overall_score=60.0),
            row("z", throughput=150.0, final_loss=0.1, duration_seconds=12.0, overall_score=60.0)]
    winner, ties, _ = scoring.winners(rows)
    # 200.0 and 200.0000001 print alike at six significant digits: a tie the reader would see.
    assert winner == {"best_throughput": "x", "best_loss": "x", "fastest": "x", "most_efficient": "y",
                      "most_energy_efficient": None, "best_goodput": None}
    assert ties == {"best_throughput": ["x", "y"], "best_loss": ["x", "z"], "fastest": ["x", "y"],
                    "most_efficient": ["y", "z"]}


def test_no_values_means_no_winner():
    winner, ties, _ = scoring.winners([row("a", status="running"), row("b", status="failed")])
    assert winner == {"best_throughput": None, "best_loss": None, "fastest": None, "most_efficient": None,
                      "most_energy_efficient": None, "best_goodput": None}
    assert ties == {}


def test_rounded_keeps_six_significant_digits():
    assert scoring.rounded(3.14159265) == 3.14159
    assert scoring.rounded(123456789.0) == 123457000.0
    assert scoring.rounded(math.inf) is None and scoring.rounded(None) is None and scoring.rounded(0) == 0.0


def test_the_best_loss_is_the_lowest_loss_as_reported():
    """Losses are reported with every digit the backend keeps, yet were compared at six significant digits: of
    0.12345649 and 0.12345641 the higher was named best, the two a tie."""
    rows = [{"job_id": "a", "status": "completed", "final_loss": 0.12345649},
            {"job_id": "b", "status": "completed", "final_loss": 0.12345641}]
    winner, ties, _ = scoring.winners(rows)
    assert winner["best_loss"] == "b" and "best_loss" not in ties


def test_most_efficient_counts_only_jobs_scored_on_every_score_they_should_have():
    """A GPU job whose GPU utilisation went unmeasured (no GPU exporter) had its throughput score, 95, for its whole
    overall score and won the category over a GPU job measured at 80 % busy (0.6*80 + 0.4*90 = 84)."""
    rows = [row("unmeasured-gpu", overall_score=95.0, efficiency_complete=False),
            row("measured-gpu", overall_score=84.0, efficiency_complete=True)]
    assert scoring.winners(rows)[0]["most_efficient"] == "measured-gpu"


def test_a_jobs_efficiency_is_complete_with_every_score_its_device_has():
    assert scoring.efficiency_complete(80.0, 75.0, "cuda")
    assert scoring.efficiency_complete(None, 75.0, "cpu")        # a CPU job has no GPU score to miss
    assert not scoring.efficiency_complete(None, 75.0, "cuda")   # its GPU went unmeasured
    assert not scoring.efficiency_complete(None, 75.0, None)     # no device said: a GPU may have gone unmeasured
    assert not scoring.efficiency_complete(80.0, None, "cuda")   # no measured peak: its GPU score alone


def test_losses_are_compared_within_one_task_only():
    """A regression's mean squared error won best_loss against a classifier's cross-entropy: losses of two tasks
    measure two things. With mixed tasks there is no winner, and the answer says why."""
    mixed = [row("cls", final_loss=0.9, task="classification"), row("reg", final_loss=0.02, task="regression"),
             row("cls-2", final_loss=0.4, task="classification")]
    winner, ties, reasons = scoring.winners(mixed)
    assert winner["best_loss"] is None and "best_loss" not in ties
    assert reasons == {"best_loss": "losses of different tasks are not comparable: "
                                    "classification: cls, cls-2; regression: reg"}
    # One task: the lowest loss wins; a job without a loss does not make the tasks mixed.
    winner, _, reasons = scoring.winners(mixed[:1] + mixed[2:] + [row("reg-none", final_loss=None, task="regression")])
    assert (winner["best_loss"], reasons) == ("cls-2", {})
    # A job whose trainer said no task is of an unknown one: not compared with a classifier...
    winner, _, reasons = scoring.winners([row("cls", final_loss=0.9, task="classification"),
                                          row("old", final_loss=0.1)])
    assert winner["best_loss"] is None and "task unknown: old" in reasons["best_loss"]
    # ...and jobs that all said none are compared as before.
    winner, _, reasons = scoring.winners([row("old-1", final_loss=0.3), row("old-2", final_loss=0.1)])
    assert (winner["best_loss"], reasons) == ("old-2", {})


def test_a_category_whose_rule_leaves_out_every_job_with_its_value_says_why():
    """Two running jobs with durations, GPU jobs whose GPU went unmeasured, jobs whose energy was counted in part:
    `fastest`, `most_efficient` and `most_energy_efficient` were null with no reason, though docs/api.md says
    no_winner_reasons explains every category left null although jobs have its value."""
    rows = [row("a", status="running", duration_seconds=60.0, overall_score=90.0, efficiency_complete=False,
                samples_per_joule=10.0, energy_complete=False),
            row("b", status="failed", duration_seconds=30.0)]
    winner, _, reasons = scoring.winners(rows)
    assert (winner["fastest"], winner["most_efficient"], winner["most_energy_efficient"]) == (None, None, None)
    assert reasons == {"fastest": "no job with a duration completed: a, b",
                       "most_efficient": "no job with an overall score was scored on every score it should have "
                                         "(efficiency_complete): a",
                       "most_energy_efficient": "no job with samples per joule had its energy counted whole "
                                                "(energy_complete): a"}
    # No value at all: null without a reason.
    assert scoring.winners([row("c", status="running")])[2] == {}


def test_the_schema_of_no_winner_reasons_names_every_category_whose_rule_can_leave_it_null():
    """The OpenAPI description of `no_winner_reasons` named fastest, most_efficient and most_energy_efficient as
    the categories whose rule can leave every job with the value out, not best_goodput, which has such a rule too."""
    import dataclasses

    from trainmetrics.analytics import shapes

    description = {f.name: f.metadata for f in dataclasses.fields(shapes.Comparison)}["no_winner_reasons"]
    assert all(category in description["description"] for category in scoring.EXCLUDED)
