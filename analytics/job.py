"""One job's report (GET /api/training/{job_id}/analytics): its facts (lookup.py), each process's last values,
its peak grid and its evaluation history, assembled into shapes.JobAnalytics. Queries come from queries.py
only; scores from scoring.py."""

import asyncio
import math
import time
from dataclasses import dataclass

from trainmetrics.analytics import queries as q
from trainmetrics.analytics import goodput, scoring, shapes
from trainmetrics.analytics.history import evaluation_history
from trainmetrics.analytics.lookup import JobFacts, find_jobs, owned_by
from trainmetrics.analytics.prometheus import PrometheusClient, partial_answers
from trainmetrics.analytics.results import (mib, minus, percent, process_of, query_parts_many, ratio, rounded, rows,
                                           scalar)
from trainmetrics.contract import TRAINING_LOOP_PHASES


@dataclass
class _Window:
    """Where a job's figures are read: rates and peaks over (start, end], cumulative and last values up to
    the final scrape after the end (the linger), never past now."""

    end: float
    window: float
    final_time: float
    final_window: float

    @classmethod
    def of(cls, facts: JobFacts, now: float) -> "_Window":
        end = facts.end if facts.end is not None else now
        final_time = min(now, end + q.FINAL_SCRAPE_GRACE_SECONDS) if facts.end is not None else now
        return cls(end, max(end - facts.began, 1e-3), final_time, max(final_time - facts.began, 1e-3))


@dataclass(frozen=True)
class Peak:
    """An expression's maximum over the peak grid, the first grid time that reached it, and its grid mean."""

    value: float
    at: float
    mean: float


async def peaks(client: PrometheusClient, expressions: dict[str, str], window: float, end: float,
                counters: frozenset[str] = frozenset(), final_time: float | None = None) -> dict[str, Peak]:
    """The Peak of each label-free expression over the peak grid of (end - window, end] (what max_over_time
    and avg_over_time over the subquery grid give), from one range query of all of them; none for an
    expression without values. The `counters` (rates of a counter's growth) go on past the end, on the same
    grid, up to `final_time`: what a job did after its last scrape before the end reaches Prometheus in its
    final scrape, after the end, and no point in (start, end] reads it (a job's fastest last second was missed:
    5,384 samples/s for 8,802). A counter does not grow after the end, so those points cannot overstate."""
    start, last, step = q.peak_grid(window, end)
    grid_end = q.peak_grid_end_past(window, end, final_time) if counters and final_time is not None else last
    grouped: dict[str, list] = {name: [] for name in expressions}
    for series in await client.query_range(q.union(expressions), start, grid_end, step):
        name = series["metric"].get(q.PART_LABEL)
        if name in grouped:
            values = series.get("values", [])
            grouped[name].extend(values if name in counters else [point for point in values
                                                                   if float(point[0]) <= last])
    found = {}
    for name, points in grouped.items():
        # A 250-point grid per expression: one float() per value, no per-point tuples.
        values = [float(v) for _, v in points]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            peak = max(finite)
            when = min(float(t) for (t, _), v in zip(points, values) if v == peak)
            found[name] = Peak(peak, when, sum(finite) / len(finite))
    return found


@dataclass(frozen=True)
class _Value:
    # The process's place among the job's processes, oldest first: its last heartbeat where it has one (a rank's
    # processes run one at a time; rank 0's alone publish their start), else its place among rank 0's processes
    # (-1: not one of them).
    order: tuple[int, float]
    rank: str
    value: float


class Totals:
    """Each process's last values (queries.TOTALS), combined as the trainer counts: counters and held values
    carry over a resume (the newest process holds the job's), histograms start again with each process, every
    rank counts its own samples, and rank 0 speaks for the job's losses, evaluations and checkpoints."""

    def __init__(self, found: dict[str, list[dict]], facts: JobFacts):
        place = {p.key: index for index, p in enumerate(facts.processes)}
        last_seen = {(process_of(labels), labels.get("rank", "0")): value
                     for labels, value in rows(found.get("last_heartbeat", [])) if value is not None}

        def order(labels: dict) -> tuple[int, float]:
            key, rank = process_of(labels), labels.get("rank", "0")
            seen = last_seen.get((key, rank))
            return (1, seen) if seen is not None else (0, place.get(key, -1))

        def values(name: str, phase: str | None = None) -> list[_Value]:
            return sorted((_Value(order(labels), labels.get("rank", "0"), value)
                           for labels, value in rows(found.get(name, []))
                           if value is not None and labels.get("phase") == phase), key=lambda v: (v.order, v.rank))

        self._values = {name: values(name) for name in q.TOTALS}
        # The loop's phases (trainer_phase_seconds_total), carried over a resume as the counters are.
        self._values.update({f"{phase}_phase": values("phase_seconds", phase) for phase in TRAINING_LOOP_PHASES})

    def _rank0(self, name: str) -> list[float]:
        return [v.value for v in self._values[name] if v.rank == "0"]

    def newest(self, name: str) -> float | None:
        """Rank 0's newest process's value."""
        values = self._rank0(name)
        return values[-1] if values else None

    def earliest(self, name: str) -> float | None:
        """Rank 0's earliest process's value."""
        values = self._rank0(name)
        return values[0] if values else None

    def highest(self, name: str, every_rank: bool = False) -> float | None:
        """The highest of rank 0's processes' values (of every rank's)."""
        values = [v.value for v in self._values[name]] if every_rank else self._rank0(name)
        return max(values, default=None)

    def total(self, name: str) -> float | None:
        """Every process's and rank's values added up."""
        values = [v.value for v in self._values[name]]
        return sum(values) if values else None

    def per_rank(self, name: str, combine=sum) -> float | None:
        """combine() over the ranks of each rank's newest process's value (a resumed process carries the rank's
        count on from its checkpoint: after a kill, the killed process's count went past it, with work that was
        thrown away, and the highest said so until the resumed run caught up)."""
        newest: dict[str, float] = {}
        for v in self._values[name]:        # oldest process first
            newest[v.rank] = v.value
        return combine(newest.values()) if newest else None

    def data_wait_share(self) -> float | None:
        """The data_wait phase's share of the loop phases' seconds, every rank's newest process's (the job's totals).
        Not the data-wait histogram over the step-time one: the wait that ends a pass (the loader joining its workers)
        is data wait in no step, and a job of one or two steps a pass read over 100 %."""
        loop = [self.per_rank(f"{phase}_phase") for phase in TRAINING_LOOP_PHASES]
        return ratio(loop[0], sum(seconds for seconds in loop if seconds is not None))

    def mean_loss(self) -> float | None:
        """The mean of every logged loss: the newest sum and count of them (rank 0's, from one process)."""
        sums = {v.order: v.value for v in self._values["loss_sum"] if v.rank == "0"}
        counts = {v.order: v.value for v in self._values["loss_intervals"] if v.rank == "0" and v.order in sums}
        return ratio(sums[max(counts)], counts[max(counts)]) if counts else None


async def job_analytics(client: PrometheusClient, job_id: str, lookback: float) -> shapes.JobAnalytics:
    """The analytics of one job."""
    return (await jobs_analytics(client, [job_id], lookback))[0][0]


async def jobs_analytics(client: PrometheusClient, job_ids: list[str], lookback: float,
                         strict: bool = True, owner: str | None = None
                         ) -> list[tuple[shapes.JobAnalytics | None, JobFacts] | None]:
    """The analytics of several jobs, in order, with each job's facts (None for a job Prometheus does not hold,
    when not strict; JobNotFound for the first such otherwise). With an owner, a job that is not wholly that
    owner's (lookup.owned_by) is looked up only, never computed: (None, its facts). Computed, another owner's
    job cost its whole analytics before it answered as an unknown one, and a figure that Prometheus failed to
    answer then told it from one (a 503, or a slow answer, where an unknown id is a quick 404).

    Requests: the lookup (one to three, for all the jobs), every instant expression of every job (each carries
    its `@`; one request), then per job one range query of its peak grid, one of its evaluation history's grid
    and a raw read of the grid steps that showed evaluations. Fewer requests would lose Prometheus' cores to
    one query; more cost the HTTP client more than they gain on a small host.

    Where the backend answered a request with part of its data (prometheus.partial_warnings), the facts and
    analytics of the jobs it was for say `partial`: not to be kept as settled. The lookup and the instant request
    are every job's; the range queries (peaks, evaluations) each one job's only, so that one job's partial answer
    there leaves the others whole (and cached)."""
    now = time.time()
    all_facts, shared = await _noting_partial(find_jobs(client, job_ids, lookback, now, strict))
    # Jobs that ran (not queued), and the caller's: a run that failed in its init never started training, but its
    # phase totals are read all the same (read only for jobs that started, its ledger said it had none).
    ran = [(facts, _Window.of(facts, now)) for facts in all_facts
           if facts is not None and facts.began is not None and owned_by(facts.owners, owner)]

    async def instant() -> list[dict[str, list[dict]]]:
        def parts(facts: JobFacts, w: _Window) -> dict[str, str]:
            return {**q.job_totals(facts.job_id, w.final_window, w.final_time, facts.finals),
                    **q.job_energy(facts.job_id, w.final_window, w.final_time, now, facts.finals),
                    **q.job_rates(facts.job_id, w.window, w.end, facts.segments),
                    **q.host(w.window, facts.began, w.end)}

        found = await query_parts_many(client, [parts(facts, w) for facts, w in ran], now)
        again = {i: reread for i, (facts, w) in enumerate(ran) if (reread := _read_again(facts, w, found[i], now))}
        if again:
            whole = await query_parts_many(client, list(again.values()), now)
            for i, answers in zip(again, whole):
                # The hosts' energy read again is theirs alone: the others' stays as their final minutes said.
                found[i]["energy"] = found[i]["energy"] + answers.pop("energy", [])
                found[i].update(answers)
        return found

    async def own(facts: JobFacts, w: _Window) -> tuple[dict[str, Peak], list[shapes.Evaluation]]:
        """The job's own requests: its peak grid and its evaluation history."""
        return await asyncio.gather(
            peaks(client, {**q.job_peaks(facts.job_id, w.window, gpus=facts.info.get("device") != "cpu"),
                           **q.host_peaks(w.window)}, w.window, w.end, q.JOB_PEAK_COUNTERS, w.final_time),
            evaluation_history(client, facts.job_id, facts.began, w.final_time,
                               [(p.key, p.start) for p in facts.processes if p.start is not None]))

    (instants, instant_partial), *per_job = await asyncio.gather(
        _noting_partial(instant()), *(_noting_partial(own(facts, w)) for facts, w in ran))
    answers = {}
    for (facts, w), found, ((peak, history), partial) in zip(ran, instants, per_job):
        facts.partial = instant_partial or partial
        answers[facts.job_id] = (_assemble(facts, found, peak, history, w), facts)
    results = [None if facts is None else (None, facts) if not owned_by(facts.owners, owner)
               else answers.get(facts.job_id) or (_assemble(facts, {}, {}, [], None), facts) for facts in all_facts]
    for analytics, facts in filter(None, results):
        facts.partial = facts.partial or shared
        if analytics is not None:
            analytics.partial = facts.partial
    return results


async def _noting_partial(awaitable):
    """What `awaitable` gives, and whether the backend answered any of its requests with part of its data."""
    with partial_answers() as warnings:
        return await awaitable, bool(warnings)


def _read_again(facts: JobFacts, w: _Window, found: dict[str, list[dict]], now: float) -> dict[str, str]:
    """What is read over the whole window after the reads at the final instants (rank 0's processes').

    Last values come from each process's last minute; where that held no samples (scrapes failed through it), or
    none of a rank of the job (one frozen or lost long before rank 0's end, which the other ranks waited for in a
    collective), the totals are read over the whole window. So are the energy counts of the hosts that attributed
    the job but showed none then: its processes there ended first (another rank's, which failed or finished
    first), and their exporter had stopped showing its counts a minute after. They were left out, and the job's
    energy read as partial, those hosts as having no readable RAPL."""
    if not facts.finals:
        return {}       # every part was read over the whole window
    parts = {}
    if not found["samples"] or _ranks_missing(facts, found):
        parts.update(q.job_totals(facts.job_id, w.final_window, w.final_time))
    counted = {labels.get("instance", "") for labels, _ in rows(found.get("energy", []))}
    if unread := sorted(_hosts(found) - counted - _shown_at_a_final(facts)):
        parts.update(q.job_energy_on_hosts(facts.job_id, unread, w.final_window, w.final_time, now))
    return parts


def _hosts(found: dict[str, list[dict]]) -> set[str]:
    """The node exporters (instances) that attributed the job over its window."""
    return {labels.get("instance", "") for labels, _ in rows(found.get("cpu_hosts", []))}


def _shown_at_a_final(facts: JobFacts) -> set[str]:
    """The exporters attributing the job now whose CPU time was sampled in a final instant's last minute, where
    its energy is read: an exporter publishes the job's energy count beside its CPU time as long as it counts any,
    so one of these without a count there has no energy source (no RAPL readable, no GPU counter: a cloud VM's, a
    container's), and its whole run holds none either. Read again, it cost every request of a running job there
    one more round of requests."""
    return {instance for instance, at in facts.attributing.items()
            if any(final - q.LAST_VALUES_SECONDS < at <= final for final in facts.finals or ())}


def _ranks_missing(facts: JobFacts, found: dict[str, list[dict]]) -> bool:
    """Whether some rank of the job (its world_size, as rank 0 publishes it) has neither a heartbeat nor a sample
    count in the answer."""
    try:
        world_size = int(facts.info.get("world_size") or 1)
    except ValueError:
        return False
    seen = {labels.get("rank", "0") for part in ("last_heartbeat", "samples")
            for labels, _ in rows(found.get(part, []))}
    return len(seen) < world_size


def _assemble(facts: JobFacts, found: dict[str, list[dict]], peak: dict[str, Peak],
              evaluations: list[shapes.Evaluation], w: _Window | None) -> shapes.JobAnalytics:
    def value(name: str) -> float | None:
        return scalar(found.get(name, []))

    def peak_value(name: str) -> float | None:
        return peak[name].value if name in peak else None

    def peak_at(name: str) -> float | None:
        return peak[name].at if name in peak else None

    def peak_mean(name: str) -> float | None:
        return peak[name].mean if name in peak else None

    totals = Totals(found, facts)
    timeline = facts.timeline
    training = timeline.training_seconds
    samples = totals.per_rank("samples")
    # The most any rank counted: ranks step together, and a rank killed mid-job was last scraped up to a
    # scrape before its death (the least said 117 steps where rank 0 published its exact 120).
    steps = totals.per_rank("steps", max)
    average_sps = ratio(samples, training)
    peak_sps = measured_peak = peak_value("samples_per_second")
    peak_window = q.rate_window_ms(q.peak_step(w.window)) / 1000 if w else None
    if average_sps is not None and (peak_sps is None or peak_sps < average_sps):
        # Some window must reach the whole run's average; a lower observed peak means Prometheus saw only
        # part of the run (a job scraped late or briefly), so the average is the better lower bound. A run
        # about as short as the peak window has no window's rate at all: its average is its peak. Neither is
        # a measured peak to score the average against (it scored 100, and won most_efficient).
        peak_sps, measured_peak = average_sps, None
    cpu_seconds = value("cpu_seconds")
    average_gpu = percent(peak_mean("gpu_utilization_avg"))
    gpu_memory_peak = totals.highest("gpu_memory_peak", every_rank=True)
    if gpu_memory_peak is None:
        gpu_memory_peak = peak_value("gpu_memory")
    initial, final = totals.earliest("loss_first"), totals.newest("loss_last")
    last_finite = totals.newest("loss_finite")
    if last_finite == 0:      # diverged: its last logged loss was NaN or infinite, not this
        final = None
    # The last evaluation is one fact: read from its history series, not again from trainer_eval_loss. A
    # backend that stores fewer digits (VictoriaMetrics: each block's values to one decimal exponent) may
    # give two series holding the same value back a unit in the last place apart.
    last_evaluation = evaluations[-1] if evaluations else None
    checkpoint_seconds = totals.total("checkpoint_seconds")
    step_seconds = totals.total("step_seconds")
    host_cpu_average, host_cpu_baseline = percent(value("host_cpu_average")), percent(value("host_cpu_baseline"))
    host_memory_average, host_memory_baseline = mib(value("host_memory_average")), mib(value("host_memory_baseline"))
    return shapes.JobAnalytics(
        job_id=facts.job_id, job_name=facts.info.get("job_name"), model=facts.info.get("model"),
        dataset=facts.info.get("dataset"), owner=facts.info.get("owner"), device=facts.info.get("device"),
        task=facts.info.get("task"),
        status=facts.status, error_type=facts.error_type, start_time=facts.start, end_time=facts.end,
        evaluated_at=round(facts.now, 3),
        duration=shapes.Duration(
            total_seconds=rounded(timeline.total_seconds),
            total_minutes=rounded(ratio(timeline.total_seconds, 60.0)),
            total_hours=rounded(ratio(timeline.total_seconds, 3600.0)),
            paused_seconds=rounded(timeline.paused_seconds), training_seconds=rounded(training),
            upload_seconds=rounded(facts.upload_seconds)),
        performance=shapes.Performance(
            total_samples=_integer(samples), total_steps=_integer(steps),
            average_samples_per_second=rounded(average_sps), peak_samples_per_second=rounded(peak_sps),
            # (none where the average stands for the peak: the time of a lower window's rate was given)
            peak_samples_per_second_at=peak_at("samples_per_second") if measured_peak is not None else None,
            peak_window_seconds=peak_window,
            average_step_seconds=rounded(ratio(step_seconds, totals.total("step_count"))),
            peak_step_seconds=rounded(totals.highest("step_max", every_rank=True)),
            data_wait_percent=rounded(percent(totals.data_wait_share()))),
        resource_utilization=shapes.ResourceUtilization(
            average_gpu_utilization_percent=rounded(average_gpu),
            peak_gpu_utilization_percent=rounded(percent(peak_value("gpu_utilization"))),
            peak_gpu_utilization_at=peak_at("gpu_utilization"),
            peak_gpu_memory_mb=rounded(mib(gpu_memory_peak)),
            average_gpu_temperature_celsius=rounded(peak_mean("gpu_temperature")),
            average_cpu_percent=rounded(percent(ratio(cpu_seconds, training))),
            peak_cpu_percent=rounded(percent(peak_value("job_cpu"))), peak_cpu_at=peak_at("job_cpu"),
            peak_memory_mb=rounded(mib(peak_value("job_rss"))), peak_memory_at=peak_at("job_rss"),
            host=shapes.Host(
                cpu=shapes.HostCpu(
                    baseline_percent=rounded(host_cpu_baseline), average_percent=rounded(host_cpu_average),
                    increase_percent=rounded(minus(host_cpu_average, host_cpu_baseline)),
                    peak_percent=rounded(percent(peak_value("host_cpu"))), peak_at=peak_at("host_cpu")),
                memory=shapes.HostMemory(
                    baseline_mb=rounded(host_memory_baseline), average_mb=rounded(host_memory_average),
                    increase_mb=rounded(minus(host_memory_average, host_memory_baseline)),
                    peak_mb=rounded(mib(peak_value("host_memory"))), peak_at=peak_at("host_memory"),
                    limit_mb=rounded(mib(value("host_memory_limit")))))),
        checkpoints=shapes.Checkpoints(
            count=_integer(totals.newest("checkpoints")), total_seconds=rounded(checkpoint_seconds),
            mean_seconds=rounded(ratio(checkpoint_seconds, totals.total("checkpoints_written")))),
        losses=shapes.Losses(
            initial=initial, final=final, best=totals.newest("loss_min"), mean=totals.mean_loss(),
            reduction_percent=rounded(100.0 * (initial - final) / initial) if initial and final is not None else None,
            final_eval_loss=last_evaluation.loss if last_evaluation else totals.newest("eval_loss"),
            final_eval_accuracy=last_evaluation.accuracy if last_evaluation else totals.newest("eval_accuracy"),
            # (carried over a resume: the newest process's are the job's; a killed one's own took in the evaluations
            # after its last checkpoint, which were thrown away)
            best_eval_loss=totals.newest("eval_loss_min"), best_eval_accuracy=totals.newest("eval_accuracy_max"),
            nonfinite_intervals=_integer(totals.newest("loss_nonfinite")),
            final_nonfinite=None if last_finite is None else last_finite == 0),
        evaluations=evaluations,
        efficiency=shapes.Efficiency(**scoring.efficiency(average_gpu, average_sps, measured_peak)),
        energy=_energy(found.get("energy", []), samples, attributed=cpu_seconds is not None,
                       hosts={labels.get("instance", "") for labels, _ in rows(found.get("cpu_hosts", []))},
                       on_gpus=facts.info.get("device") not in (None, "cpu")),
        goodput=goodput.ledger(facts, found), source="prometheus", partial=False)


# Why an energy figure is null. An exporter that attributed the job publishes its CPU time whatever else it has.
NOT_ATTRIBUTED = ("no node exporter attributed the job (its processes were in no exporter's job-mapping "
                  "directory): its energy is unknown")
NO_ENERGY_SOURCE = "no GPU energy counter and no RAPL powercap readable on the job's hosts"
NO_GPU_ENERGY = "no GPU energy: the job held no GPU with an energy counter; total_joules is the CPU estimate only"
NO_CPU_ENERGY = "no CPU energy: no RAPL powercap readable on the job's hosts; total_joules is GPU energy only"
PARTIAL_CPU_ENERGY = ("CPU energy from {counted} of the {hosts} hosts the job ran on (no RAPL readable on the others): "
                      "cpu_joules and total_joules count those hosts only")
PARTIAL_GPU_ENERGY = ("GPU energy from {counted} of the {hosts} hosts the job ran on (no GPU energy counter on the "
                      "others): gpu_joules and total_joules count those hosts only")


def _energy(found: list[dict], samples: float | None, attributed: bool, hosts: set[str] = frozenset(),
            on_gpus: bool = False) -> shapes.Energy:
    """The job's energy block: every exporter's counters added up per source. `hosts`: the exporters that
    attributed the job; a CPU figure (or, for a job on GPUs, a GPU figure) from only some of them is said to
    be partial."""
    by_source: dict[str, float] = {}
    hosts_of: dict[str, set[str]] = {"cpu": set(), "gpu": set()}
    for labels, value in rows(found):
        source = labels.get("source")
        if value is not None:
            by_source[source] = by_source.get(source, 0.0) + value
            hosts_of.setdefault(source, set()).add(labels.get("instance", ""))
    gpu, cpu = by_source.get("gpu"), by_source.get("cpu")
    total = None if gpu is None and cpu is None else (gpu or 0.0) + (cpu or 0.0)
    if total is None:
        reason = NO_ENERGY_SOURCE if attributed else NOT_ATTRIBUTED
    elif cpu is not None and hosts - hosts_of["cpu"]:
        reason = PARTIAL_CPU_ENERGY.format(counted=len(hosts & hosts_of["cpu"]), hosts=len(hosts))
    elif gpu is not None and on_gpus and hosts - hosts_of["gpu"]:
        reason = PARTIAL_GPU_ENERGY.format(counted=len(hosts & hosts_of["gpu"]), hosts=len(hosts))
    else:
        reason = NO_GPU_ENERGY if gpu is None else NO_CPU_ENERGY if cpu is None else None
    return shapes.Energy(gpu_joules=rounded(gpu), cpu_joules=rounded(cpu), total_joules=rounded(total),
                         samples_per_joule=rounded(ratio(samples, total)), unavailable_reason=reason)


def _integer(value: float | None) -> int | None:
    return None if value is None else int(value)
