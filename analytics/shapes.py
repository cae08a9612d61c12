"""The analytics' response bodies, declared once: the reports fill these dataclasses, `plain` turns them into
JSON, and openapi.py generates its schemas from them (`schemas`). docs/api.md says what each field means."""

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field

from trainmetrics.analytics import scoring
from trainmetrics.contract import JOB_STATES, VANISHED

# A job's status: a state its processes publish, or vanished (the job list filters and the summary counts
# by these); STATUSES adds unknown (no state seen).
STATES = (*JOB_STATES, VANISHED)
STATUSES = (*STATES, "unknown")


def described(text: str, **schema) -> dataclasses.Field:
    """A field with a description (and any further JSON-schema keywords) in its schema."""
    return field(metadata={"description": text, **schema})


def unix_time() -> dataclasses.Field:
    """A field holding unix seconds."""
    return described("unix seconds")


# What a `partial` field says when true.
PARTIAL = ("true: the backend answered with part of its data (a store or shard that did not answer: its warnings, "
           "or isPartial), so figures may be missing or short")


def status_field() -> dataclasses.Field:
    """A job's status field."""
    return described("the newest process's state; vanished: stopped without one and no longer scraped",
                     enum=list(STATUSES))


# ----- one job ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Duration:
    """Wall time from the first start to the last end (or now), and how it splits into runs and pauses."""

    total_seconds: float | None
    total_minutes: float | None
    total_hours: float | None
    paused_seconds: float | None = described("gaps between the job's runs (paused, or crashed and resumed)")
    training_seconds: float | None = described("total_seconds - paused_seconds")
    upload_seconds: float | None = described("dataset upload and ingest")


@dataclass(slots=True)
class Performance:
    """Throughput and step times; exact (counters, the trainer's running maximum) unless described otherwise."""

    total_samples: int | None
    total_steps: int | None
    average_samples_per_second: float | None = described("total_samples / training_seconds")
    peak_samples_per_second: float | None = described("sampled: the highest rate over any peak_window_seconds")
    peak_samples_per_second_at: float | None = unix_time()
    peak_window_seconds: float | None = described("the window of the sampled peaks (throughput, CPU)")
    average_step_seconds: float | None = described("step-time histogram sum / count")
    peak_step_seconds: float | None = described("the longest step")
    data_wait_percent: float | None = described(
        "data_wait phase seconds / the loop phases' (data_wait, compute, optimizer, collective), every rank's")


@dataclass(slots=True)
class HostCpu:
    """The host's CPU before (the minute before the start) and during the job."""

    baseline_percent: float | None
    average_percent: float | None
    increase_percent: float | None
    peak_percent: float | None
    peak_at: float | None = unix_time()


@dataclass(slots=True)
class HostMemory:
    """The host's memory before (the minute before the start) and during the job."""

    baseline_mb: float | None
    average_mb: float | None
    increase_mb: float | None
    peak_mb: float | None
    peak_at: float | None = unix_time()
    limit_mb: float | None


@dataclass(slots=True)
class Host:
    """The host under the job: the minute before it started (baseline) and during it."""

    cpu: HostCpu
    memory: HostMemory


@dataclass(slots=True)
class ResourceUtilization:
    """Percent of one CPU core for the job's process tree; MB are MiB (2^20 bytes)."""

    average_gpu_utilization_percent: float | None
    peak_gpu_utilization_percent: float | None
    peak_gpu_utilization_at: float | None = unix_time()
    peak_gpu_memory_mb: float | None
    average_gpu_temperature_celsius: float | None
    average_cpu_percent: float | None = described("CPU seconds / training_seconds")
    peak_cpu_percent: float | None
    peak_cpu_at: float | None = unix_time()
    peak_memory_mb: float | None
    peak_memory_at: float | None = unix_time()
    host: Host


@dataclass(slots=True)
class Checkpoints:
    """Checkpoints written: the counter (it carries over a resume) and the write-time histogram's sum."""

    count: int | None
    total_seconds: float | None
    mean_seconds: float | None


@dataclass(slots=True)
class Losses:
    """Training and evaluation losses, each exactly the trainer's own figure."""

    initial: float | None = described("the first logged training loss of the job's first run")
    final: float | None = described("the last logged training loss; null when that was NaN or infinite")
    best: float | None = described("the lowest logged training loss")
    mean: float | None = described("the mean of every logged training loss")
    reduction_percent: float | None = described("100 * (initial - final) / initial")
    final_eval_loss: float | None
    final_eval_accuracy: float | None
    best_eval_loss: float | None
    best_eval_accuracy: float | None
    nonfinite_intervals: int | None = described("log intervals whose mean training loss was NaN or infinite")
    final_nonfinite: bool | None = described("the last logged training loss was NaN or infinite (diverged)")


@dataclass(slots=True)
class Evaluation:
    """One evaluation of the job on its held-out split."""

    step: int | None = described("the step after which it ran")
    loss: float | None
    accuracy: float | None
    time: float | None = unix_time()


@dataclass(slots=True)
class Efficiency:
    __doc__ = scoring.__doc__.split("docs/api.md holds the same text):", 1)[-1].strip()

    gpu_utilization_score: float | None
    throughput_score: float | None
    overall_score: float | None


@dataclass(slots=True)
class Energy:
    """Energy used for the job on its hosts, from the node exporter's per-job counters (docs/metrics.md)."""

    gpu_joules: float | None = described("exact: the energy counters of the GPUs the job held, over the "
                                         "slow intervals it held them")
    cpu_joules: float | None = described("an estimate: the CPU packages' energy (RAPL) shared out by the "
                                         "job's share of the host's busy CPU time")
    total_joules: float | None = described("gpu_joules + cpu_joules, of those known")
    samples_per_joule: float | None = described("total_samples / total_joules")
    unavailable_reason: str | None = described("why gpu_joules or cpu_joules is null, or counts only some of the "
                                                "job's hosts; null when neither")


@dataclass(slots=True)
class Goodput:
    """Where the job's wall-clock time went, submission to end (docs/api.md, "Goodput")."""

    wall_clock_seconds: float | None = described(
        "the submission (else the first process's start) to the job's end, or to its newest scrape while it runs")
    goodput_ratio: float | None = described("seconds.step / wall_clock_seconds")
    seconds: dict[str, float | None] = described(
        "seconds per phase: queued, init, restore, step, data_wait, eval, checkpoint, paused, lost")
    badput_percent: dict[str, float | None] = described("each phase but step, in percent of wall_clock_seconds")
    step_seconds_by_part: dict[str, float | None] = described(
        "the step split: compute (forward, backward), optimizer, collective (waiting in the gradient all-reduce)")
    unaccounted_seconds: float | None = described(
        "wall_clock_seconds less every phase: how far the trainer's clocks miss the wall clock (about 0)")
    unavailable_reason: str | None = described("why a figure is missing or partial; null when none is")


@dataclass(slots=True)
class JobAnalytics:
    """One job over its own run (every process, every rank)."""

    job_id: str
    job_name: str | None
    model: str | None
    dataset: str | None
    owner: str | None
    device: str | None
    task: str | None = described("what the model learns, so what its loss measures (classification, regression, "
                                 "language): its trainer_job_info's task label; null where the trainer said none")
    status: str = status_field()
    error_type: str | None = described("the exception class that ended the job's last run")
    start_time: float | None = unix_time()
    end_time: float | None = described("unix seconds; null while running")
    evaluated_at: float = described("unix seconds the analytics were computed at")
    duration: Duration
    performance: Performance
    resource_utilization: ResourceUtilization
    checkpoints: Checkpoints
    losses: Losses
    evaluations: list[Evaluation] = described("every evaluation, in order")
    efficiency: Efficiency
    energy: Energy
    goodput: Goodput
    source: str = described("prometheus: computed now from Prometheus; stored: the report the job server "
                            "stored when the job ended (Prometheus no longer holds the job, or less of it)",
                            enum=["prometheus", "stored"])
    partial: bool = described(PARTIAL + "; such an answer is neither cached nor stored, and the next request "
                                        "asks again")


# ----- the fleet ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class JobRow:
    """One job seen in Prometheus; durations and throughput as the job's analytics give them."""

    job_id: str
    job_name: str | None
    model: str | None
    dataset: str | None
    owner: str | None
    device: str | None
    status: str = status_field()
    start_time: float | None = unix_time()
    end_time: float | None = unix_time()
    duration_seconds: float | None
    paused_seconds: float | None
    training_seconds: float | None
    total_samples: int | None
    average_samples_per_second: float | None
    final_loss: float | None


@dataclass(slots=True)
class JobList:
    """Jobs seen in Prometheus, filtered."""

    range_seconds: float
    count: int
    jobs: list[JobRow]
    partial: bool = described(PARTIAL + " (jobs too may be missing)")


@dataclass(slots=True)
class TopJob:
    """One of the fleet's fastest jobs."""

    job_id: str
    job_name: str | None
    owner: str | None
    status: str = status_field()
    average_samples_per_second: float | None
    duration_seconds: float | None
    paused_seconds: float | None
    training_seconds: float | None
    total_samples: int | None
    final_loss: float | None


@dataclass(slots=True)
class Trend:
    """A resource trend: its points [unix seconds, value], their average and peak."""

    average: float | None
    peak: float | None
    points: list[tuple[float, float | None]]


@dataclass(slots=True)
class ResourceTrends:
    """The hosts' and jobs' trends at step_seconds resolution; `recorded_series`: the trends read from the
    recording rules' series (approximations: docs/api.md), none where every trend read raw series."""

    step_seconds: float
    series: dict[str, Trend]
    recorded_series: list[str]


@dataclass(slots=True)
class FleetGoodput:
    """Where the fleet's time went over the range (docs/api.md, "Goodput"): every job's seconds per phase, added."""

    goodput_ratio: float | None = described("seconds.step / the sum of every phase")
    seconds: dict[str, float | None] = described(
        "seconds per phase over the range: queued, init, restore, step, data_wait, eval, checkpoint, paused "
        "(sampled: a process counts from its first scrape, queued and paused per scrape interval; lost is per "
        "job only)")
    badput_percent: dict[str, float | None] = described("each phase but step, in percent of the sum of every phase")


@dataclass(slots=True)
class Summary:
    """The fleet over the last range_seconds."""

    range_seconds: float
    evaluated_at: float
    total_jobs: int
    jobs_by_status: dict[str, int]
    average_duration_seconds: float | None
    total_training_seconds: float | None
    average_throughput_samples_per_sec: float | None
    top_performing_jobs: list[TopJob] = described("the 5 fastest jobs", maxItems=5)
    resource_trends: ResourceTrends
    goodput: FleetGoodput
    partial: bool = described(PARTIAL + " (jobs too may be missing)")


@dataclass(slots=True)
class CompareRow:
    """One job of a comparison."""

    job_id: str
    job_name: str | None
    task: str | None = described("the job's task (its analytics' task): losses are compared between jobs of one "
                                 "task only")
    status: str = status_field()
    duration_seconds: float | None
    paused_seconds: float | None
    training_seconds: float | None
    throughput: float | None = described("average samples/s")
    peak_throughput: float | None
    total_samples: int | None
    final_loss: float | None
    best_loss: float | None
    gpu_utilization: float | None
    average_cpu_percent: float | None
    peak_memory_mb: float | None
    overall_score: float | None
    efficiency_complete: bool = described("overall_score has every score the job should have: the throughput score, "
                                          "and the GPU score unless the job ran on the CPU (only such jobs can be "
                                          "most_efficient)")
    total_joules: float | None
    samples_per_joule: float | None
    goodput_ratio: float | None = described("step seconds / wall-clock seconds (the job's goodput block)")
    energy_complete: bool = described("every energy source the job used was counted on every host it ran on "
                                      "(only such jobs can be most_energy_efficient)")
    goodput_complete: bool = described("goodput_ratio is the job's, not an upper bound (its earliest runs gone and "
                                       "no submission time: docs/api.md, Goodput); only such jobs can be "
                                       "best_goodput")
    partial: bool = described(PARTIAL + " (the job's analytics' partial)")


Winner = dataclasses.make_dataclass("Winner", [(category, str | None) for category in scoring.CATEGORIES], slots=True)
Winner.__doc__ = ("Winning job id per category (first in request order among equals); fastest counts completed "
                  "jobs only, most_efficient those whose efficiency_complete, most_energy_efficient those whose "
                  "energy_complete, best_goodput those whose goodput_complete, and none a partial row; null when "
                  "no job has the value, or none of those that have it counts.")


@dataclass(slots=True)
class Comparison:
    """Jobs side by side, and the winner per category."""

    jobs: list[CompareRow]
    winner: Winner
    ties: dict[str, list[str]] = described("for each tied category, every job id sharing the best value")
    no_winner_reasons: dict[str, str] = described(
        "for each category whose winner is null although jobs have the value, why (best_loss: the jobs' losses "
        f"are of different tasks; {', '.join(scoring.EXCLUDED)}: no job with the value counts; any: every job "
        "that counts is partial)")
    partial: bool = described("true when any row is partial")


# ----- JSON and schemas ---------------------------------------------------------------------------------------

@functools.cache
def _names(shape: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(shape))


def plain(value):
    """A shape as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {name: plain(getattr(value, name)) for name in _names(type(value))}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def from_plain(shape: type, value):
    """A shape back from its JSON (a stored report): missing fields become None, unknown ones are dropped."""
    hints = typing.get_type_hints(shape)
    known = value if isinstance(value, dict) else {}
    return shape(**{f.name: _from_plain(hints[f.name], known.get(f.name)) for f in dataclasses.fields(shape)})


def _from_plain(annotation, value):
    """A field's value back from JSON; None where it is not of the field's type (a stored report is read back
    from a database anyone with the file could edit: a string where a number belongs would fail later)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None:
        return _missing(annotation)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _from_plain(inner, value)
    if dataclasses.is_dataclass(annotation):
        return from_plain(annotation, value)
    if origin is list:
        return [_from_plain(args[0], item) for item in value] if isinstance(value, list) else _missing(annotation)
    if origin is tuple:
        return tuple(_from_plain(arg, item) for arg, item in zip(args, value)) if isinstance(value, list) else None
    if origin is dict:
        return ({key: _from_plain(args[1], item) for key, item in value.items() if _text(key)}
                if isinstance(value, dict) else _missing(annotation))
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        # Finite only: json.loads reads NaN, Infinity and 1e999, which JSON answers cannot hold (500).
        try:
            return value if math.isfinite(value) else None
        except OverflowError:       # an integer past a float's range: the comparison's arithmetic failed on it
            return None
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if annotation is str:
        return value if isinstance(value, str) and _text(value) else None
    if annotation is bool:
        return value if isinstance(value, bool) else None
    return value


def _missing(annotation):
    """What a field a stored report lacks (a report from before the field, or an edited row) reads as: a block the
    shape always has (`duration`, `energy`...) with every figure null, a list or map it always has (`evaluations`,
    goodput's `step_seconds_by_part`...) empty, else null. Answered null, against the schema, a block failed the
    comparison's row (500), and a list or map failed every client that reads the schema's array or object. (An
    optional one, `X | None`, stays null.)"""
    if dataclasses.is_dataclass(annotation):
        return from_plain(annotation, {})
    return {list: [], dict: {}}.get(typing.get_origin(annotation))


def _text(value: str) -> bool:
    """Whether a string is text an answer can hold: json.loads reads a lone surrogate (`"\\ud800"`), which UTF-8
    cannot encode (the answer failed as it was sent: a 500, the connection reset)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def columns(shape: type) -> list[str]:
    """A row shape's field names, in order (a CSV's columns)."""
    return list(_names(shape))


JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(annotation, components: dict) -> dict:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in JSON_TYPES:
        return {"type": JSON_TYPES[annotation]}
    if origin in (types.UnionType, typing.Union):
        (inner,) = [arg for arg in args if arg is not type(None)]
        schema = _schema(inner, components)
        if "type" in schema:
            return {**schema, "type": [schema["type"], "null"]}
        return {"anyOf": [schema, {"type": "null"}]}
    if origin is list:
        return {"type": "array", "items": _schema(args[0], components)}
    if origin is tuple:
        return {"type": "array", "prefixItems": [_schema(arg, components) for arg in args]}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], components)}
    if dataclasses.is_dataclass(annotation):
        name = annotation.__name__
        if name not in components:
            components[name] = {}    # claimed before its fields: a shape may refer to itself
            hints = typing.get_type_hints(annotation)
            properties = {f.name: {**_schema(hints[f.name], components), **f.metadata}
                          for f in dataclasses.fields(annotation)}
            components[name] = {"type": "object", "description": annotation.__doc__, "properties": properties,
                                "required": list(properties)}
        return {"$ref": f"#/components/schemas/{name}"}
    raise TypeError(f"no JSON schema for {annotation!r}")


def schemas(*roots: type) -> dict[str, dict]:
    """The JSON schemas of the shapes and of every shape they hold, by name."""
    components: dict[str, dict] = {}
    for root in roots:
        _schema(root, components)
    return components
