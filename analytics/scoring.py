"""The efficiency formula and the comparison's winners: pure functions, no I/O.

Efficiency, each score 0..100 (docs/api.md holds the same text):

- gpu_utilization_score = mean utilisation of the job's GPUs over its run, in percent; null without GPU data.
- throughput_score = 100 × average samples/s ÷ peak samples/s (capped at 100): how close the job ran to
  its own best rate over a window of max(1 s, the peak grid's step: duration / 250); stalls, slow data loading
  and checkpoint pauses lower it. Null without a measured peak (a run about as short as the peak window, or one
  Prometheus saw only part of: its average stands in for its peak, which it would always reach).
- overall_score = the weighted mean of the available scores, GPU 0.6 and throughput 0.4; a missing score
  drops out and the weights of the others are renormalised (a CPU job's overall score is its throughput
  score). Null when neither is available. A comparison's most_efficient counts only jobs scored on every score
  they should have (`efficiency_complete`): a GPU job whose GPU went unmeasured would win on its throughput score.
"""

import math

GPU_WEIGHT = 0.6
THROUGHPUT_WEIGHT = 0.4
# Values are compared as they are reported (rounded), so a tie the reader sees is a tie the service states.
REPORTED_DIGITS = 6
# ...but losses are reported exactly (docs/api.md): compared to the digits both backends keep.
EXACT_FIELDS = frozenset({"final_loss"})
EXACT_DIGITS = 12


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def gpu_utilization_score(average_gpu_utilization_percent: float | None) -> float | None:
    """The mean GPU utilisation in percent, clamped to 0..100; None without GPU data."""
    if not _finite(average_gpu_utilization_percent):
        return None
    return min(100.0, max(0.0, float(average_gpu_utilization_percent)))


def throughput_score(average_samples_per_second: float | None, peak_samples_per_second: float | None) -> float | None:
    """100 × average ÷ peak samples/s, capped at 100; None when either is missing or the peak is not positive."""
    if not (_finite(average_samples_per_second) and _finite(peak_samples_per_second)) or peak_samples_per_second <= 0:
        return None
    return min(100.0, max(0.0, 100.0 * average_samples_per_second / peak_samples_per_second))


def overall_score(gpu_score: float | None, throughput: float | None) -> float | None:
    """Weighted mean of the available scores (GPU 0.6, throughput 0.4, renormalised); None if none."""
    parts = [(score, weight) for score, weight in ((gpu_score, GPU_WEIGHT), (throughput, THROUGHPUT_WEIGHT))
             if score is not None]
    if not parts:
        return None
    return sum(score * weight for score, weight in parts) / sum(weight for _, weight in parts)


def efficiency_complete(gpu_score: float | None, throughput: float | None, device: str | None) -> bool:
    """True when the overall score has every score the job should have: the throughput score, and the GPU score
    unless the job ran on the CPU. A renormalised score of one part would otherwise win against whole ones."""
    return throughput is not None and (gpu_score is not None or device == "cpu")


def efficiency(average_gpu_utilization_percent: float | None, average_samples_per_second: float | None,
               peak_samples_per_second: float | None) -> dict:
    """The efficiency block of a job's analytics."""
    gpu = gpu_utilization_score(average_gpu_utilization_percent)
    throughput = throughput_score(average_samples_per_second, peak_samples_per_second)
    overall = overall_score(gpu, throughput)
    return {"gpu_utilization_score": rounded(gpu), "throughput_score": rounded(throughput),
            "overall_score": rounded(overall)}


def rounded(value: float | None, digits: int = REPORTED_DIGITS) -> float | None:
    """`value` to `digits` significant digits (None and non-finite values become None)."""
    if not _finite(value):
        return None
    if value == 0:
        return 0.0
    return float(f"{value:.{digits}g}")


# Category -> (row field, True when higher wins). Rows are the comparison's per-job rows.
CATEGORIES = {
    "best_throughput": ("throughput", True),
    "best_loss": ("final_loss", False),
    "fastest": ("duration_seconds", False),
    "most_efficient": ("overall_score", True),
    "most_energy_efficient": ("samples_per_joule", True),
    "best_goodput": ("goodput_ratio", True),
}


# Categories whose values mean something only between jobs of one task (a row's `task`): a loss is the task's own
# measure (cross-entropy of a classifier, mean squared error of a regression, in the targets' units).
SAME_TASK = frozenset({"best_loss"})


# Why a category whose rule leaves out jobs that have its value has no winner when it leaves out all of them.
EXCLUDED = {
    "fastest": "no job with a duration completed",
    "most_efficient": "no job with an overall score was scored on every score it should have (efficiency_complete)",
    "most_energy_efficient": "no job with samples per joule had its energy counted whole (energy_complete)",
    "best_goodput": "no job with a goodput ratio had its whole ledger: each is an upper bound (goodput_complete)",
}
# Category -> the row's flag a job must have to win it (a job whose figure is partial would win on what is missing).
COMPLETE = {"most_efficient": "efficiency_complete", "most_energy_efficient": "energy_complete",
            "best_goodput": "goodput_complete"}
# Why a category has no winner when every job that would count was read from a partial backend answer (its row's
# `partial`): a store or shard that did not answer may hold the rest of its figures, which could lose.
PARTIAL = "the backend answered with part of the data of every job that counts (partial)"


def winners(rows: list[dict]) -> tuple[dict, dict, dict]:
    """(winner, ties, reasons): per category the winning job id (first in request order among equals) or None when
    no row has a value, for each tied category every job id that shares the best value, and for each category left
    without a winner although rows have its value, why.

    `fastest` only considers completed jobs: a job that failed after ten seconds did not finish fastest;
    `most_energy_efficient` only jobs whose energy was counted whole (`energy_complete`); `most_efficient` only
    jobs scored on every score they should have (`efficiency_complete`); `best_goodput` only jobs whose ratio is
    not an upper bound (`goodput_complete`); `best_loss` has a winner only where every
    job with a loss has the same task (jobs whose trainer said none are of one unknown task, compared with each
    other only). A row read from a partial backend answer (`partial`) wins nothing: its figures may be short."""
    winner, ties, reasons = {}, {}, {}
    for category, (field, higher_wins) in CATEGORIES.items():
        counted = [row for row in rows if _finite(row.get(field))
                   and (category != "fastest" or row.get("status") == "completed")
                   and (category not in COMPLETE or row.get(COMPLETE[category]))]
        candidates = [row for row in counted if not row.get("partial")]
        if not candidates:
            winner[category] = None
            valued = [row["job_id"] for row in rows if _finite(row.get(field))]
            # the jobs have the value, yet none may win: say why, as for mixed tasks
            if counted:
                reasons[category] = f"{PARTIAL}: {', '.join(row['job_id'] for row in counted)}"
            elif valued:
                reasons[category] = f"{EXCLUDED[category]}: {', '.join(valued)}"
            continue
        tasks: dict[str | None, list[str]] = {}
        for row in candidates:
            tasks.setdefault(row.get("task"), []).append(row["job_id"])
        if category in SAME_TASK and len(tasks) > 1:
            winner[category] = None
            reasons[category] = "losses of different tasks are not comparable: " + "; ".join(
                f"{task or 'task unknown'}: {', '.join(ids)}" for task, ids in tasks.items())
            continue
        # Losses are reported with every digit the backend keeps (VictoriaMetrics: about 12), not six.
        digits = EXACT_DIGITS if field in EXACT_FIELDS else REPORTED_DIGITS
        values = [rounded(row[field], digits) for row in candidates]
        best = max(values) if higher_wins else min(values)
        best_ids = [row["job_id"] for row, value in zip(candidates, values) if value == best]
        winner[category] = best_ids[0]
        if len(best_ids) > 1:
            ties[category] = best_ids
    return winner, ties, reasons
