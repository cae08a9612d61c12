"""A job's evaluations, every one in order, from the trainer_eval_history_* series.

The trainer shows evaluation i in slot i mod 8 until evaluation i + 8 replaces it and holds each until every
scraper has read it, so every evaluation is in the raw samples. Reading every raw sample of a long job costs as
much as it ran (40 series at 250 ms), so a range query on the peak grid first finds the grid steps in which a
slot showed a new evaluation, and only those are read raw (queries.MAX_HISTORY_READS reads at most)."""

import asyncio
import math
from dataclasses import dataclass

from trainmetrics.analytics import queries as q
from trainmetrics.analytics.prometheus import PrometheusClient
from trainmetrics.analytics.results import number, process_of, query_parts, rows
from trainmetrics.analytics.shapes import Evaluation

FIELDS = {metric: name for name, metric in q.HISTORY.items()}


@dataclass(frozen=True)
class _Shown:
    """One evaluation as a process's scrape showed it."""

    process: str        # results.process_of
    index: int
    step: float | None
    time: float | None
    loss: float | None
    accuracy: float | None


async def evaluation_history(client: PrometheusClient, job_id: str, start: float, final_time: float,
                             runs: list[tuple[str, float]] = ()) -> list[Evaluation]:
    """Every evaluation of the job in (start, final_time], in order: raw samples, each evaluation once.

    runs: (process, training start) of the job's rank-0 processes, oldest first: a resumed run's start tells
    which of the earlier runs' evaluations it threw away, before it evaluates itself."""
    window = max(final_time - start, 1e-3)
    first, last, step = q.peak_grid(window, final_time)
    step_ms = int(step.removesuffix("ms"))
    if round(last * 1000) < round(final_time * 1000):
        # On to the first grid point after final_time: the last one before it can precede the final scrape (a
        # step over the 15 s linger, a job of over an hour: the evaluation at its end was not listed).
        last = (round(last * 1000) + step_ms) / 1000
    changes, firsts = await asyncio.gather(client.query_range(q.eval_history_changes(job_id, step), first, last, step),
                                           _first_indices(client, job_id, runs[1:], final_time))
    reads = _reads(_new_steps(changes), step_ms / 1000)
    # (a read ends at final_time at the latest: nothing of the job comes after it, and it may be now)
    answers = await asyncio.gather(*(client.query(q.eval_history_samples(job_id, min(to, final_time) - since),
                                                  min(to, final_time))
                                     for since, to in reads))
    return _in_order([shown for matrix in answers for shown in _shown(matrix)], firsts, dict(runs))


async def _first_indices(client: PrometheusClient, job_id: str, resumed: list[tuple[str, float]],
                         now: float) -> dict[str, int]:
    """The number each resumed run's first evaluation has (or would have): its checkpoint's count + 1."""
    if not resumed:
        return {}
    found = await query_parts(client, q.resumed_eval_counts(job_id, [start for _, start in resumed]), now)
    firsts = {}
    for index, (process, _) in enumerate(resumed):
        for labels, value in rows(found.get(f"count_{index}", [])):
            if process_of(labels) == process and value is not None and math.isfinite(value) and value >= 0:
                firsts[process] = int(value) + 1
    return firsts


def _new_steps(changes: list[dict]) -> list[float]:
    """The grid points whose step showed a new evaluation in some slot: its last number changed."""
    points = set()
    for series in changes:
        previous = None
        for t, value in series.get("values", []):
            if value != previous:
                points.add(float(t))
            previous = value
    return sorted(points)


def _reads(points: list[float], step: float) -> list[tuple[float, float]]:
    """The (since, to] windows that cover each point's step: adjacent steps joined, then the closest reads
    merged until at most MAX_HISTORY_READS remain."""
    reads: list[tuple[float, float]] = []
    for point in points:
        if reads and point - step <= reads[-1][1] + 1e-9:
            reads[-1] = (reads[-1][0], point)
        else:
            reads.append((point - step, point))
    while len(reads) > q.MAX_HISTORY_READS:
        gap = min(range(len(reads) - 1), key=lambda i: reads[i + 1][0] - reads[i][1])
        reads[gap:gap + 2] = [(reads[gap][0], reads[gap + 1][1])]
    return reads


def _shown(matrix: list[dict]) -> list[_Shown]:
    """The evaluations in raw history samples: the five series of a slot scraped at one time are one."""
    scraped: dict[tuple[str, str, float], dict[str, float]] = {}
    for series in matrix:
        labels = series["metric"]
        name = FIELDS.get(labels.get("__name__"))
        if name is None or labels.get("rank", "0") != "0":
            continue
        key = (process_of(labels), labels.get("slot", ""))
        for t, text in series.get("values", []):
            value = number(text)      # VictoriaMetrics returns stale markers as NaN samples
            if value is not None:
                scraped.setdefault((*key, float(t)), {})[name] = value
    return [_Shown(process, int(values["index"]), values.get("step"), values.get("time"), values.get("loss"),
                   values.get("accuracy"))
            for (process, _, _), values in scraped.items() if "index" in values]


def _in_order(shown: list[_Shown], firsts: dict[str, int] | None = None,
              starts: dict[str, float] | None = None) -> list[Evaluation]:
    """Each evaluation once, by number. A resumed run numbers on from its checkpoint's count, so where an
    earlier run evaluated after its last checkpoint, the evaluations from the resumed run's first number on are
    the resumed run's (the earlier ones were thrown away with the steps after the checkpoint), from its start
    (`firsts`: each resumed run's first number by its process), whether or not it has evaluated yet. Runs are
    ordered by their start (`starts`), else by their first evaluation's time."""
    firsts, starts = firsts or {}, starts or {}
    runs: dict[str, dict[int, _Shown]] = {process: {} for process in firsts}
    for evaluation in shown:
        runs.setdefault(evaluation.process, {})[evaluation.index] = evaluation
    kept: dict[int, _Shown] = {}

    def began(process: str) -> float:
        known = starts.get(process)
        return known if known is not None else min((e.time or 0.0 for e in runs[process].values()), default=0.0)

    for process in sorted(runs, key=began):
        run = runs[process]
        first = min([*run, *([firsts[process]] if process in firsts else [])])
        kept = {index: evaluation for index, evaluation in kept.items() if index < first}
        kept.update(run)
    return [Evaluation(step=None if e.step is None else int(e.step), loss=e.loss, accuracy=e.accuracy, time=e.time)
            for _, e in sorted(kept.items())]
