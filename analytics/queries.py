"""Every PromQL expression the analytics service runs, and the one function that lets a job id in.

User input reaches PromQL only as a job id, only after the allowlist check (trainmetrics.contract), and only
through `quote_job_id` as the value of an equality matcher -- never inside a regex. Everything else in an
expression is a constant of this module or a number the service computed (a duration, a timestamp).

Finished jobs' series go stale, so per-job expressions use the job's own start and end: `*_over_time`
with an explicit window that is evaluated at the job's end time (the caller passes `time=`).
"""

import math

from trainmetrics.contract import Node, Trainer, validate_job_id

SCRAPE_INTERVAL_SECONDS = 0.25
# Prometheus refuses range queries with more than 11,000 points per series; stay under with a margin.
MAX_POINTS_PER_SERIES = 10_000
# The trainer lingers until the first scrape after its end (bounded by --linger-timeout, 15 s): the final
# loss, counters and end timestamp land in Prometheus up to that long after the end time.
FINAL_SCRAPE_GRACE_SECONDS = 15.0
# Host baseline: the minute before the job started.
BASELINE_SECONDS = 60.0
# Window of a "peak rate" (samples/s, CPU): 4 scrape intervals, so one late scrape does not halve a rate.
PEAK_RATE_WINDOW_SECONDS = 1.0
# Peaks and per-job GPU averages evaluate their expression on a grid of at most this many points; each
# point covers the whole step before it (a max_over_time over the step, a counter's growth over the step),
# so no sample is skipped and a 1-hour job costs 250 evaluations, not 14,400. A peak of a gauge read through
# its peak series (host CPU and memory) is exact at any grid; the job's RSS, which has none, to its scrapes.
# The grid sets how precisely a peak's time is known and how wide a throughput or CPU-rate window is (a 1-hour
# job: 14.4 s). Each point costs
# Prometheus and this service alike: on a 2-core host, 500 points made a 5-job comparison ~30 % slower.
PEAK_GRID_POINTS = 250
# Raw reads of the evaluation history per job, at most: the grid cells that showed new evaluations are read
# raw, the closest of them merged into one read until this many remain.
MAX_HISTORY_READS = 8


def quote_job_id(job_id: str) -> str:
    """The job id as a PromQL string literal, after the allowlist check (ValueError when it fails).

    The allowlist admits no quote, backslash or control character; quoting through quote_label_value anyway
    keeps one correct place should the allowlist ever widen.
    """
    validate_job_id(job_id)
    return quote_label_value(job_id)


def quote_label_value(value: str) -> str:
    """Any text as a PromQL string literal: printable ASCII as it is (a quote or backslash escaped), every other
    character as its code point's escape. (Prometheus' lexer refuses U+FFFD written out, which is what a
    query string's bytes that are not UTF-8 decode to.)"""
    escaped = []
    for character in value:
        code = ord(character)
        if character in '"\\':
            escaped.append("\\" + character)
        elif 0x20 <= code < 0x7F:
            escaped.append(character)
        else:
            escaped.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(escaped) + '"'


def job_selector(metric: str, job_id: str, extra: str = "") -> str:
    """`metric{job_id="..."<extra>}` where extra is a constant matcher list of this module."""
    return f"{metric}{{job_id={quote_job_id(job_id)}{extra}}}"


def milliseconds(seconds: float) -> int:
    """Seconds in whole milliseconds, rounded up, at least 1. Rounded to a nanosecond first: 4.03 s is
    4030.0000000000005 ms in binary floating point, and the trends' points 4030 ms apart each read 4031 ms."""
    return max(1, math.ceil(round(seconds * 1000, 6)))


def duration(seconds: float) -> str:
    """A PromQL duration literal in whole milliseconds, at least 1 ms."""
    return f"{milliseconds(seconds)}ms"


def range_step(range_seconds: float) -> float:
    """The least trend step for a range: at most 10,000 points, and never below the window a counter's growth
    is read over (PEAK_RATE_WINDOW_SECONDS, four scrapes), so each point reads exactly its own step and the
    points tile the range (a shorter step would read overlapping windows and count samples twice)."""
    return max(PEAK_RATE_WINDOW_SECONDS, range_seconds / MAX_POINTS_PER_SERIES)


def timestamp_literal(unix_seconds: float) -> str:
    """A unix time for an `@` modifier, to the millisecond."""
    return f"{unix_seconds:.3f}"


PART_LABEL = "analytics_part"


# The longest union one request carries: VictoriaMetrics refuses a query over 16 KiB (-search.maxQueryLen),
# which a comparison of ten jobs or the last-seen parts of a hundred vanished ones passed.
MAX_UNION_BYTES = 12_000


def union(parts: dict[str, str]) -> str:
    """Several expressions answered by one request: each result tagged with analytics_part=<name>.

    Names are constants of the caller ([a-z_]); `or` keeps every part since their tags differ.
    """
    return " or ".join(_tagged(name, expr) for name, expr in parts.items())


def unions(parts: dict[str, str], limit: int = MAX_UNION_BYTES) -> list[str]:
    """union() in as few expressions as keep each within `limit` bytes (a part longer than that alone)."""
    batches: list[list[str]] = []
    size = 0
    for name, expr in parts.items():
        term = _tagged(name, expr)
        added = len(term.encode()) + len(" or ")
        if not batches or size + added > limit:
            batches.append([])
            size = 0
        batches[-1].append(term)
        size += added
    return [" or ".join(batch) for batch in batches]


def _tagged(name: str, expr: str) -> str:
    return f'label_replace({expr}, "{PART_LABEL}", "{name}", "", "")'


def over(seconds: float, at: float) -> str:
    """A range `[W] @ T`: the window (T - W, T], evaluated at T whatever the query's own time."""
    return f"[{duration(seconds)}] @ {timestamp_literal(at)}"


def peak_step(seconds: float) -> float:
    """Grid step for peaks over a window: at most PEAK_GRID_POINTS points, never below one scrape."""
    return max(SCRAPE_INTERVAL_SECONDS, seconds / PEAK_GRID_POINTS)


def grid(seconds: float, at: float, step: float | None = None) -> str:
    """A subquery range `[W:STEP] @ T` on the peak grid: the definition that peak_grid's range queries
    reproduce point for point (the tests compare the two; the service itself runs no subquery of it). `step`:
    another window's (a grid carried on past its end keeps its step)."""
    return f"[{duration(seconds)}:{duration(peak_step(seconds) if step is None else step)}] @ {timestamp_literal(at)}"


def rate_window_ms(step: float) -> int:
    """The window a point `step` seconds after the previous one reads, in whole milliseconds: its whole
    step, and at least PEAK_RATE_WINDOW_SECONDS for a counter's growth (the peak grid and the trends)."""
    return milliseconds(max(PEAK_RATE_WINDOW_SECONDS, step))


def step_window(seconds: float) -> str:
    """The window each peak-grid point reads, as a duration literal."""
    return f"{rate_window_ms(peak_step(seconds))}ms"


# ----- finding jobs ---------------------------------------------------------------------------------------
# Reading every sample of a job over the lookback window costs as much as the job is long, so a job is found
# in two cheap steps: its end timestamps (published only in the last scrapes) over the lookback plus
# instant lookups at now; then, for processes that ended longer ago than the staleness window, their last
# values in the seconds before their final scrape. `job_lookup_full` is the fallback for processes that never
# reported an end and are no longer scraped (killed): a job with nothing else, or whose earliest process
# found took its checkpoint count over from a run not found.

def _lookup(job_id: str, r: str, instant: bool) -> dict[str, str]:
    def last(metric: str) -> str:
        selector = job_selector(metric, job_id)
        return f"{selector} {r}" if instant else f"last_over_time({selector}{r})"

    return {
        "start": last(Trainer.JOB_START),
        # When the process itself started: orders a job's processes, one that never started training too.
        "spawned": last(Trainer.PROCESS_START),
        "state": f"{last(Trainer.JOB_STATE)} == 1",
        "info": last(Trainer.JOB_INFO),
        "failure": last(Trainer.JOB_FAILURE),
        "upload": last(Trainer.UPLOAD_DURATION),
        # The job server's submission time (a job that never ran has nothing else to start its ledger).
        "submission": last(Trainer.JOB_SUBMITTED),
        # Whether it waits to resume; with the job server's end, whether the job had waited so until it (the end of
        # that wait, not a killed run's notice: lookup.killed_run).
        "resuming": last(Trainer.JOB_RESUMING),
        # When each process was last seen: the end of one that vanished.
        "heartbeat": last(Trainer.HEARTBEAT),
        # Checkpoints counted (a resumed process takes its run's count over) and written by the process itself.
        "counted": last(Trainer.CHECKPOINTS),
        "written": last(f"{Trainer.CHECKPOINT_DURATION}_count"),
    }


def job_recent(job_id: str, lookback: float, now: float) -> dict[str, str]:
    """Every process's end over the lookback, and what is scraped now (start, state, metadata, heartbeat...).
    A process's series go stale when it stops being scraped (stale markers at its first failed or missing
    scrape, else the backend's lookback): what answers at now is live, whatever the backend's settings."""
    return {
        "end": f"last_over_time({job_selector(Trainer.JOB_END, job_id)}{over(lookback, now)})",
        # Every process that started over the lookback: one that was killed between two others (no end, not
        # scraped now) shows only here, and sends the lookup to the full read.
        "starts": f"last_over_time({job_selector(Trainer.JOB_START, job_id)}{over(lookback, now)})",
        # Every process that began over the lookback, training or not: one killed in its init (no start of
        # training, no end, not scraped now) shows only here, and sends the lookup to the full read too.
        "spawns": f"last_over_time({job_selector(Trainer.PROCESS_START, job_id)}{over(lookback, now)})",
        # A node exporter that still attributes the job's processes (its CPU series live): its energy counts
        # for the job are final only in its first scrape without them.
        # (Its CPU time's last sample, when: one within a final's last minute shows the job's energy count there
        # if the exporter counts any, and one without has no energy source: job._read_again.)
        "attributed": f"max by (instance) (timestamp({job_selector(Node.JOB_CPU_SECONDS, job_id)} "
                      f"@ {timestamp_literal(now)}))",
        **_lookup(job_id, f"@ {timestamp_literal(now)}", instant=True),
    }


def job_seen_since(job_id: str, since: float, now: float) -> dict[str, str]:
    """The job's heartbeats over (since, now]: a vanished job's process (stopped without an end) that was scraped
    again after `since`, its last heartbeat then, shows here even once it vanished again, where job_recent's parts
    read as they did (its start and spawn the same, no end, nothing scraped now). Cheap: nothing after a vanish."""
    return {"seen": f"last_over_time({job_selector(Trainer.HEARTBEAT, job_id)}{over(now - since, now)})"}


def job_ended(job_id: str, ends: list[float]) -> dict[str, str]:
    """Last values of processes that ended at `ends`: parts <part>_<i>, read up to each final scrape."""
    parts = {}
    for index, end in enumerate(ends):
        window = over(FINAL_SCRAPE_GRACE_SECONDS + 60.0, end + FINAL_SCRAPE_GRACE_SECONDS)
        parts.update({f"{name}_{index}": expr for name, expr in _lookup(job_id, window, instant=False).items()})
    return parts


def job_lookup_full(job_id: str, lookback: float, now: float) -> dict[str, str]:
    """Last values over the whole lookback (costly; only where the cheap lookup cannot account for a process)."""
    return {"end": f"last_over_time({job_selector(Trainer.JOB_END, job_id)}{over(lookback, now)})",
            **_lookup(job_id, over(lookback, now), instant=False)}


# ----- one job, over its own window -----------------------------------------------------------------------
# Cumulative and last values read (start, final] where final is the end plus the linger's final scrape;
# rates, averages and peaks read (start, end].

# How far before a process's final instant its last values are looked for: its linger plus a minute, so a
# few failed scrapes at the end still leave a sample.
LAST_VALUES_SECONDS = FINAL_SCRAPE_GRACE_SECONDS + 60.0

# Each process's last value of these (part: function, series): counters and the trainer's held values, so
# every figure is the trainer's own. A resumed process takes the job's counters and held values over; the
# histograms start again with each process. The service combines processes and ranks itself.
TOTALS = {
    "samples": ("max_over_time", Trainer.SAMPLES),
    "steps": ("max_over_time", Trainer.STEPS),
    "checkpoints": ("max_over_time", Trainer.CHECKPOINTS),
    "checkpoint_seconds": ("max_over_time", f"{Trainer.CHECKPOINT_DURATION}_sum"),
    "checkpoints_written": ("max_over_time", f"{Trainer.CHECKPOINT_DURATION}_count"),
    "step_seconds": ("max_over_time", f"{Trainer.STEP_DURATION}_sum"),
    "step_count": ("max_over_time", f"{Trainer.STEP_DURATION}_count"),
    "step_max": ("last_over_time", Trainer.STEP_DURATION_MAX),
    "loss_last": ("last_over_time", Trainer.LOSS),
    # 0 when the last logged interval's loss was NaN or infinite (trainer_loss keeps the last finite one).
    "loss_finite": ("last_over_time", Trainer.LOSS_FINITE),
    "loss_nonfinite": ("max_over_time", Trainer.LOSS_NONFINITE),
    "loss_first": ("last_over_time", Trainer.LOSS_FIRST),
    "loss_min": ("last_over_time", Trainer.LOSS_MIN),
    "loss_sum": ("last_over_time", Trainer.LOSS_SUM),      # a gauge: losses may be negative
    "loss_intervals": ("max_over_time", Trainer.LOSS_INTERVALS),
    "evaluations": ("max_over_time", Trainer.EVALUATIONS),
    "eval_loss": ("last_over_time", Trainer.EVAL_LOSS),
    "eval_accuracy": ("last_over_time", Trainer.EVAL_ACCURACY),
    "eval_loss_min": ("last_over_time", Trainer.EVAL_LOSS_MIN),
    "eval_accuracy_max": ("last_over_time", Trainer.EVAL_ACCURACY_MAX),
    # The allocator's running peak (CUDA jobs); without it, the service reads the exporter's view of the
    # job's GPUs on the peak grid (job_peaks' gpu_memory).
    "gpu_memory_peak": ("max_over_time", Trainer.GPU_MEMORY_PEAK),
    # The goodput ledger (goodput.py): when each process started, and when the job was submitted.
    "process_start": ("last_over_time", Trainer.PROCESS_START),
    # Each process's last heartbeat, every rank's: the order of a rank's processes (job.Totals; one at a time).
    "last_heartbeat": ("last_over_time", Trainer.HEARTBEAT),
    "submitted": ("last_over_time", Trainer.JOB_SUBMITTED),
}
# Each process's last seconds per phase (rows with a `phase` label; goodput.py combines them).
PHASE_TOTALS = {"phase_seconds": ("max_over_time", Trainer.PHASE_SECONDS),
                "checkpointed": ("max_over_time", Trainer.CHECKPOINTED_SECONDS)}


def job_totals(job_id: str, window: float, final: float, finals: list[float] | None = None) -> dict[str, str]:
    """Each process's (instance and rank) last values of TOTALS, up to its final scrape.

    finals: each process's final instant (its end plus the linger, or now while it runs), newest first.
    Counters only grow within a process and the gauges read here keep their last value on every scrape, so a
    process's last samples say it all: only the minute before each final instant is read, not every sample
    of the job (a 1-hour job at 250 ms is 14,400 per series). `or` keeps a series' first answer: newest
    first, a window that holds another process's samples holds its last ones too (they end before it), so
    every process's answer is its last. Without finals (a process whose end is unknown) the whole window is
    read.
    """
    def last(function: str, metric: str) -> str:
        selector = job_selector(metric, job_id)
        if not finals:
            return f"{function}({selector}{over(window, final)})"
        return " or ".join(f"{function}({selector}{over(min(LAST_VALUES_SECONDS, window), at)})" for at in finals)

    return {name: last(function, metric) for name, (function, metric) in {**TOTALS, **PHASE_TOTALS}.items()}


def job_energy(job_id: str, window: float, final: float, now: float,
               finals: list[float] | None = None) -> dict[str, str]:
    """Each exporter's (instance's) last value of the job's energy counters, per source.

    The exporter's counters are per job and carry on over resumes and exporter restarts, so the last value
    is the job's energy on that host. It lands within a scrape of the job's mapping file going, which is at
    the latest the process's final instant (the end of its linger): each final instant is read
    FINAL_SCRAPE_GRACE_SECONDS further (never past now), where the exporter still shows the counts (it holds
    them a minute). As in job_totals: newest first, and the whole window without finals."""
    selector = job_selector(Node.JOB_ENERGY, job_id)

    def last(seconds: float, at: float) -> str:
        until = min(now, at + FINAL_SCRAPE_GRACE_SECONDS)
        return f"max_over_time({selector}{over(seconds + until - at, until)})"

    if not finals:
        return {"energy": last(window, final)}
    return {"energy": " or ".join(last(min(LAST_VALUES_SECONDS, window), at) for at in finals)}


def job_energy_on_hosts(job_id: str, instances: list[str], window: float, final: float, now: float) -> dict[str, str]:
    """job_energy over the whole window, of the named exporters (instances) only: those whose last values lay
    before every final instant's minute (the job's processes there ended first: another rank's). Only theirs, so
    that an exporter without an energy source costs no read of the other exporters' every sample."""
    hosts = "|".join(_regex_literal(instance) for instance in instances)
    selector = job_selector(Node.JOB_ENERGY, job_id, f",instance=~{quote_label_value(hosts)}")
    until = min(now, final + FINAL_SCRAPE_GRACE_SECONDS)
    return {"energy": f"max_over_time({selector}{over(window + until - final, until)})"}


def _regex_literal(text: str) -> str:
    """text as a Go regexp matching itself: an escaped ASCII punctuation mark or space is itself there."""
    return "".join("\\" + character if character.isascii() and not character.isalnum() else character
                   for character in text)


HISTORY = {"index": Trainer.EVAL_HISTORY_INDEX, "step": Trainer.EVAL_HISTORY_STEP,
           "time": Trainer.EVAL_HISTORY_TIME, "loss": Trainer.EVAL_HISTORY_LOSS,
           "accuracy": Trainer.EVAL_HISTORY_ACCURACY}


def eval_history_changes(job_id: str, step: str) -> str:
    """For a range query on a grid of `step` (peak_grid's literal): each history slot's last evaluation number
    in each grid step. A slot's number only grows, so a step in which a slot showed a new evaluation ends on a
    new number there: the steps to read raw (eval_history_samples)."""
    return f"last_over_time({job_selector(Trainer.EVAL_HISTORY_INDEX, job_id)}[{step}])"


# A resumed run's evaluation count as it starts training (its checkpoint's, restored before): the least count in
# this long after its start.
RESUMED_COUNT_SECONDS = 60.0


def resumed_eval_counts(job_id: str, starts: list[float]) -> dict[str, str]:
    """For each start (count_<i>) of a resumed run: every rank-0 process's least evaluation count in the
    RESUMED_COUNT_SECONDS from it, of which the run's own is its checkpoint's count (the first it numbers
    on from)."""
    selector = job_selector(Trainer.EVALUATIONS, job_id, ',rank=~"0|"')
    return {f"count_{index}": f"min_over_time({selector}{over(RESUMED_COUNT_SECONDS, start + RESUMED_COUNT_SECONDS)})"
            for index, start in enumerate(starts)}


def eval_history_samples(job_id: str, seconds: float) -> str:
    """The raw samples of every history series in the `seconds` before the query's time (its time goes in the
    request: VictoriaMetrics answers a bare range selector with `@` with nothing). The regex is over this
    module's metric names, never over user input."""
    names = "|".join(HISTORY.values())
    return f'{{__name__=~"{names}",job_id={quote_job_id(job_id)}}}[{duration(seconds)}]'


def peak_grid(seconds: float, at: float) -> tuple[float, float, str]:
    """start, end and step of a range query whose points are exactly those of the subquery grid(seconds, at).

    Prometheus aligns a subquery's points to multiples of its step: the first is the first multiple at or
    after T - W, the last the last one at or before T. The range query starts and ends on those multiples
    (so a backend that aligns range queries to the step, as VictoriaMetrics does, moves nothing), and its
    step is the same millisecond duration literal.
    """
    step_ms = milliseconds(peak_step(seconds))
    end_ms = round(float(timestamp_literal(at)) * 1000)   # the instant an `@ T` literal names
    first_ms = end_ms - milliseconds(seconds)
    first_ms = -(-first_ms // step_ms) * step_ms
    last_ms = first_ms + (end_ms - first_ms) // step_ms * step_ms
    if first_ms > end_ms:
        # A window shorter than a step can hold no grid point (a sub-second job): take the one point at
        # or before its end, rather than a range whose end precedes its start (Prometheus' 400).
        first_ms = last_ms = end_ms // step_ms * step_ms
    return first_ms / 1000, last_ms / 1000, f"{step_ms}ms"


def peak_grid_end_past(seconds: float, at: float, final_time: float) -> float:
    """The peak grid of (at - seconds, at] carried on to its first point at or after final_time (a job's final
    scrape comes after its end): that point's time, or the grid's last when final_time is not past `at` (a
    job still running ends now)."""
    _, last, step = peak_grid(seconds, at)
    if final_time <= at:
        return last
    last_ms, step_ms = round(last * 1000), int(step.removesuffix("ms"))
    return (last_ms + math.ceil((final_time * 1000 - last_ms) / step_ms) * step_ms) / 1000


def increase_per_second(selector: str, window: float) -> str:
    """Per series, the counter's increase over the grid point's window per second: its newest sample now minus
    its newest sample one window ago, divided by the time between those two samples, at least the window. Not
    by the window alone: samples further apart than it (trainer scrapes 15 s apart, or none for a minute while
    Prometheus was down, which marks nothing stale) put all they counted in between into one window (62.5
    samples/s for 10), and at 250 ms the two samples a 2.4 s window apart may be 2.5 s apart. No new sample
    since a window ago is 0. Not rate(): Prometheus extrapolates to the window's edges and VictoriaMetrics does
    not, so rate() answers differ between the two; this one does not."""
    w = step_window(window)
    return (f"({selector} - {selector} offset {w}) / clamp_min(timestamp({selector}) - timestamp({selector} "
            f"offset {w}), {rate_window_ms(peak_step(window)) / 1000!r})")


# The job_peaks that are rates of a counter's growth: read on past the job's end (job.peaks).
JOB_PEAK_COUNTERS = frozenset({"samples_per_second", "job_cpu"})


def job_peaks(job_id: str, window: float, gpus: bool = True) -> dict[str, str]:
    """Label-free expressions on the peak grid: the service takes each one's maximum (and the first point
    reaching it) or its mean over the grid, from one range query that evaluates each once.

    *_mean use: gpu_utilization_avg (the job's GPUs averaged), gpu_temperature; the rest are peaks.
    gpus=False (a job that said it runs on the CPU) leaves out the GPU joins, a quarter of the query's cost."""
    w = step_window(window)

    def sel(metric: str) -> str:
        return job_selector(metric, job_id)

    expressions = {
        "samples_per_second": f"sum({increase_per_second(sel(Trainer.SAMPLES), window)})",
        "job_cpu": f"sum({increase_per_second(sel(Node.JOB_CPU_SECONDS), window)})",
        "job_rss": f"sum(max_over_time({sel(Node.JOB_RSS)}[{w}]))",
    }
    if gpus:
        expressions.update({
            "gpu_utilization": f"max({_job_gpus(Node.GPU_UTILIZATION, job_id)})",
            "gpu_utilization_avg": f"avg({_job_gpus(Node.GPU_UTILIZATION, job_id)})",
            "gpu_temperature": f"avg({_job_gpus(Node.GPU_TEMPERATURE, job_id)})",
            "gpu_memory": f"max({_job_gpus(Node.GPU_MEMORY_USAGE, job_id)})",
        })
    return expressions


def host_peaks(window: float) -> dict[str, str]:
    """The host's peak expressions, on the same grid as job_peaks."""
    w = step_window(window)
    return {
        "host_cpu": f"max(max_over_time({Node.CPU_UTILIZATION_PEAK}[{w}]))",
        "host_memory": f"sum(max_over_time({Node.MEMORY_USED_PEAK}[{w}]))",
    }


def _job_gpus(metric: str, job_id: str) -> str:
    # hw_gpu_job_info{gpu,uuid,job_id} = 1 attributes a GPU to the job: keep the job's GPUs only.
    return f"({metric} * on (instance, gpu, uuid) {job_selector(Node.GPU_JOB, job_id)})"


def job_rates(job_id: str, window: float, end: float,
              segments: list[tuple[float, float]] | None = None) -> dict[str, str]:
    """The CPU seconds of the job's process trees: per span, the counter's value at its stop minus its value at
    its start (not increase(), whose extrapolation differs between Prometheus and VictoriaMetrics). The
    exporter's counter is per job and starts again when a resumed job's new process does, so with segments (the
    spans in which the job's processes ran) each span is counted on its own and the spans summed; without, the
    whole window (start, end]. Its peaks and GPU figures: job_peaks."""
    cpu = job_selector(Node.JOB_CPU_SECONDS, job_id)
    spans = segments or [(end - window, end)]
    parts = []
    for index, (start, stop) in enumerate(spans):
        inside = over(max(stop - start, 1e-3), stop)
        # The value at the start is the last sample at or before it: from the span's first sample on, the time
        # before that sample was lost (a run with one scrape in it counted 0 s). Looked for at most two scrapes
        # back and never in the previous span (another process' counter); a lower first sample in the span
        # (a reset: the new process was first sampled after its start) is the start's value instead.
        earliest = max(start - 2 * SCRAPE_INTERVAL_SECONDS, spans[index - 1][1] if index else -math.inf)
        first = f"min_over_time({cpu}{inside})"
        at_start = f"(last_over_time({cpu}{over(max(start - earliest, 1e-3), start)}) <= {first}) or {first}"
        parts.append(f'label_replace(max_over_time({cpu}{inside}) - ({at_start}), "segment", "{index}", "", "")')
    # The hosts (exporters) that attributed the job: its energy is whole only with a figure from each.
    return {"cpu_seconds": f"sum({' or '.join(parts)})",
            "cpu_hosts": f"count by (instance) (max_over_time({cpu}{over(window, end)}))"}


# ----- the host under the job ---------------------------------------------------------------------------
# Not per job: every exporter's host series, averaged (CPU) or summed (memory) over hosts.

def host(window: float, start: float, end: float) -> dict[str, str]:
    """The host in the minute before the job (baseline) and during it (average; its peaks: host_peaks)."""
    during, before = over(window, end), over(BASELINE_SECONDS, start)
    used = f'{Node.MEMORY_USAGE}{{state="used"}}'
    return {
        "host_cpu_average": f"avg(avg_over_time({Node.CPU_UTILIZATION}{during}))",
        "host_cpu_baseline": f"avg(avg_over_time({Node.CPU_UTILIZATION}{before}))",
        "host_memory_average": f"sum(avg_over_time({used}{during}))",
        "host_memory_baseline": f"sum(avg_over_time({used}{before}))",
        # The limit does not change while a host runs: its last minute will do.
        "host_memory_limit": f"sum(avg_over_time({Node.MEMORY_LIMIT}{over(min(window, 60.0), end)}))",
    }


# ----- the fleet ----------------------------------------------------------------------------------------
# Evaluated at "now" over the summary range: one row per job process; no user input.
#
# Reading every raw sample of every job in the range costs as much as the fleet ran (345,600 samples per
# series for a day at 250 ms). deploy/prometheus/rules/analytics.rules.yml records, every RULE_INTERVAL, each
# process's last start/end/state/info/loss and max samples over the last RULE_WINDOW; where those recorded
# series provably cover the range, the fleet reads them instead:
#
#   now - range ......... split ............................ now - RECENT .......... now
#   |  raw (older)        |  recorded (rules ran, no gap)                |  raw (recent)  |
#
# split is the later of (now - range + RULE_WINDOW) -- so a recorded point cannot pull in a process whose
# samples all lie before the range -- and the last point where the heartbeat rule had not run within
# COVERAGE_WINDOW (its first evaluation, a restart, rules loaded late). The recent part covers what the
# rules have not recorded yet. Where the recorded part would be empty (no rules, or a gap in the last
# RECENT seconds) the fleet reads raw series exactly as without rules.

RULE_INTERVAL_SECONDS = 60.0
RULE_WINDOW_SECONDS = 300.0
# A heartbeat within this window of every grid point means no raw sample escaped the rules' 5-minute windows.
COVERAGE_WINDOW_SECONDS = RULE_WINDOW_SECONDS - RULE_INTERVAL_SECONDS
RECENT_SECONDS = COVERAGE_WINDOW_SECONDS + RULE_INTERVAL_SECONDS
# Where the coverage check holds, two recordings (a missed evaluation, a restart between them) are at most this far
# apart: a heartbeat within COVERAGE_WINDOW of every minute.
RECORDING_GAP_SECONDS = COVERAGE_WINDOW_SECONDS + RULE_INTERVAL_SECONDS
HEARTBEAT = "trainmetrics:analytics_rules:heartbeat"
RECORDED = {
    "start": "job_process:trainer_job_start_timestamp_seconds:last5m",
    "end": "job_process:trainer_job_end_timestamp_seconds:last5m",
    "info": "job_process:trainer_job_info:last5m",
    "state": "job_process:trainer_job_state:seen_timestamp5m",
    "samples": "job_process:trainer_samples:max5m",
    "heartbeat": "job_process:trainer_heartbeat_timestamp_seconds:last5m",
    "loss": "job_process:trainer_loss:last5m",
    "loss_finite": "job_process:trainer_loss_finite:last5m",
}
RAW = {
    "start": Trainer.JOB_START,
    "end": Trainer.JOB_END,
    "info": Trainer.JOB_INFO,
    "state": Trainer.JOB_STATE,
    "samples": Trainer.SAMPLES,
    "heartbeat": Trainer.HEARTBEAT,
    "loss": Trainer.LOSS,
    "loss_finite": Trainer.LOSS_FINITE,
}
# Trends read recorded series only at steps this long or longer (each point then spans several recordings).
RECORDED_TREND_MIN_STEP_SECONDS = RULE_WINDOW_SECONDS


# The coverage check reads a point per rule interval: over the 90 days a range may span that is ~130,000
# points, and VictoriaMetrics refuses a subquery over 30,000 (-search.maxPointsPerTimeseries: ~20.8 days of
# minutes; every range past it was a 502). It reads the span in parts this long.
RECORDED_GAP_PART_SECONDS = 14 * 86400


def recorded_gap(range_seconds: float, now: float) -> str:
    """The last minute (on the rules' grid) over the range plus one rule window at which the heartbeat had
    not run within COVERAGE_WINDOW; empty when the recorded series cover the whole span. Read in parts of at
    most RECORDED_GAP_PART_SECONDS, newest first, each labelled apart so that max() takes the latest."""
    span = range_seconds + RULE_WINDOW_SECONDS
    uncovered = (f"(vector(time()) unless on () count_over_time({HEARTBEAT}"
                 f"[{duration(COVERAGE_WINDOW_SECONDS)}]))")
    parts, offset = [], 0.0
    while offset < span:
        length = min(RECORDED_GAP_PART_SECONDS, span - offset)
        parts.append(f"max_over_time({uncovered}[{duration(length)}:{duration(RULE_INTERVAL_SECONDS)}] "
                     f"@ {timestamp_literal(now - offset)})")
        offset += length
    if len(parts) == 1:
        return parts[0]
    return "max(" + " or ".join(f'label_replace({part}, "part", "{index}", "", "")'
                                for index, part in enumerate(parts)) + ")"


def recorded_split(range_seconds: float, now: float, gap: float | None) -> float | None:
    """Where the raw older part ends and the recorded part begins; None: read raw series only."""
    split = now - range_seconds + RULE_WINDOW_SECONDS
    if gap is not None:
        split = max(split, gap)
    return split if split < now - RECENT_SECONDS else None


def _fleet_last(part: str, range_seconds: float, now: float, split: float | None, raw_suffix: str = "",
                job_id: str | None = None, matchers: str = "", pinned: bool = False) -> str:
    """Last value per process: the raw recent part, else the recorded one, else the raw older one (`or`
    keeps the left side's sample wherever the label sets match). job_id: that job's processes only; matchers:
    a selector's `{...}` instead; pinned: the whole range at `now` (`@`) without a split too (a range query's)."""
    def sel(metric: str) -> str:
        return metric + matchers if job_id is None else job_selector(metric, job_id)

    raw, recorded = sel(RAW[part]), sel(RECORDED[part])
    if split is None:
        window = over(range_seconds, now) if pinned else f"[{duration(range_seconds)}]"
        return f"last_over_time({raw}{window}){raw_suffix}"
    return (f"last_over_time({raw}{over(RECENT_SECONDS, now)}){raw_suffix} or "
            f"last_over_time({recorded}{over(now - split, now)}) or "
            f"last_over_time({raw}{over(split - (now - range_seconds), split)}){raw_suffix}")


def fleet_not_owned(owner: str, range_seconds: float, now: float, split: float | None = None) -> str:
    """The jobs that are not `owner`'s alone over the range, as the job rows tell it (fleet._fleet: a job is an
    owner's only when every rank-0 info series of it in the range names that owner): each job with a rank-0 info
    series in the range naming another owner, or none. Evaluated at `now` (`@`), so a range query reads it once."""
    matchers = f'{{owner!={quote_label_value(owner)},rank=~"0|"}}'
    return f"max by (job_id) ({_fleet_last('info', range_seconds, now, split, matchers=matchers, pinned=True)})"


def fleet_start(range_seconds: float, now: float | None = None, split: float | None = None) -> str:
    """Start timestamp of every job process seen in the range."""
    return _fleet_last("start", range_seconds, now, split)


def fleet_end(range_seconds: float, now: float | None = None, split: float | None = None) -> str:
    """End timestamp of every finished job process in the range."""
    return _fleet_last("end", range_seconds, now, split)


def fleet_info(range_seconds: float, now: float | None = None, split: float | None = None) -> str:
    """Metadata of every job process in the range."""
    return _fleet_last("info", range_seconds, now, split)


def fleet_loss(range_seconds: float, now: float | None = None, split: float | None = None,
               job_id: str | None = None) -> str:
    """Last logged training loss of every job process (of one job's); where that was NaN or infinite
    (trainer_loss keeps the last finite one, trainer_loss_finite says the last was not), tagged nonfinite="1":
    that process logged a loss, and it has none to report (a process that logged none is not there)."""
    loss = _fleet_last("loss", range_seconds, now, split, job_id=job_id)
    finite = _fleet_last("loss_finite", range_seconds, now, split, job_id=job_id)
    diverged = f"({loss}) and on (job_id, instance, run_id, rank) (({finite}) == 0)"
    return (f"({loss}) unless on (job_id, instance, run_id, rank) (({finite}) == 0) "
            f'or label_replace({diverged}, "nonfinite", "1", "", "")')


def fleet_details(job_ids: list[str], range_seconds: float, now: float, split: float | None) -> dict[str, str]:
    """Metadata (info_<i>) and last loss (loss_<i>) of the processes of a few jobs, e.g. the summary's top 5:
    the fleet-wide info and loss are two of the fleet's largest answers."""
    parts = {}
    for index, job_id in enumerate(job_ids):
        parts[f"info_{index}"] = _fleet_last("info", range_seconds, now, split, job_id=job_id)
        parts[f"loss_{index}"] = fleet_loss(range_seconds, now, split, job_id=job_id)
    return parts


def fleet_live() -> str:
    """Every job process scraped at the query's time (its series not stale): what runs now. (The state too:
    trainers from before the heartbeat have none.)"""
    return f"count by (job_id, instance, run_id) ({Trainer.HEARTBEAT} or {Trainer.JOB_STATE})"


def fleet_resuming(range_seconds: float, now: float) -> str:
    """The job server's last word over the range on whether each job waits to resume; with its end of the job,
    whether the job had waited so until it (lookup.Process.resuming). Raw: the job server's series are sparse."""
    return f"last_over_time({Trainer.JOB_RESUMING}{over(range_seconds, now)})"


def fleet_last_seen(job_ids: list[str], range_seconds: float, now: float) -> dict[str, str]:
    """When each process of a few jobs (seen_<i>) was last seen over the range: the end of a process that
    vanished without one (raw series: the recording rules keep no heartbeat)."""
    return {f"seen_{index}": f"max_over_time({job_selector(Trainer.HEARTBEAT, job_id)}{over(range_seconds, now)})"
            for index, job_id in enumerate(job_ids)}


def fleet_checkpoints(stops: list[tuple[str, float]], now: float) -> dict[str, str]:
    """Checkpoints counted (counted_<i>) and written (written_<i>) by the processes of a few jobs, each (job id, when
    its process of interest stopped) read in the last values window to that process's final scrape (or now), as the
    job lookup reads an ended process's (job_ended): whether it resumed a run from before it (Process.resumed).
    Cheap: a minute of two series per job, where reading them over the range read every sample of every process."""
    parts = {}
    for index, (job_id, stop) in enumerate(stops):
        found = _lookup(job_id, over(LAST_VALUES_SECONDS, min(now, stop + FINAL_SCRAPE_GRACE_SECONDS)), instant=False)
        parts[f"counted_{index}"], parts[f"written_{index}"] = found["counted"], found["written"]
    return parts


def fleet_state(range_seconds: float, now: float | None = None, split: float | None = None) -> str | dict[str, str]:
    """Last state of every job process in the range: one expression (raw only), or the parts recent,
    recorded and older; a process's recorded states are valued with when they were last seen, so the
    highest is its newest."""
    if split is None:
        return f"last_over_time({RAW['state']}[{duration(range_seconds)}]) == 1"
    return {
        "recent": f"last_over_time({RAW['state']}{over(RECENT_SECONDS, now)}) == 1",
        # A process that changed state has a series per state: only its newest is needed.
        "recorded": (f"topk by (job_id, instance, run_id) "
                     f"(1, last_over_time({RECORDED['state']}{over(now - split, now)}))"),
        "older": f"last_over_time({RAW['state']}{over(split - (now - range_seconds), split)}) == 1",
    }


def fleet_samples(range_seconds: float, now: float | None = None, split: float | None = None) -> str:
    """Samples processed by every job: each rank's newest process's last count, summed over ranks, as the
    trainer counts them and the job analytics read them (Totals.per_rank). A resumed process carries its rank's
    count on from its checkpoint: a killed one's count went past that with work that was thrown away, and the
    highest over the processes said so (and ranked the job by it) until the resumed run caught up. The newest
    process is the one with a count seen last (its heartbeat: a resumed process beats from its first scrape, and
    counts only once its checkpoint loaded). A rank with a count of a process without a heartbeat (a trainer from
    before it; one read only from recordings made before the heartbeat's rule was deployed) keeps the highest
    count of its processes."""
    samples, seen = _newest_part("samples", range_seconds, now, split), _newest_part("heartbeat", range_seconds, now,
                                                                                       split)
    ordered = f"({seen}) and on (job_id, rank, instance, run_id) ({samples})"
    unordered = f"({samples}) unless on (job_id, rank, instance, run_id) ({seen})"
    newest = f"({samples}) and on (job_id, rank, instance, run_id) topk by (job_id, rank) (1, {ordered})"
    return (f"sum by (job_id) ((max by (job_id, rank) ({newest}) unless on (job_id, rank) ({unordered})) "
            f"or max by (job_id, rank) ({samples}))")


def _newest_part(name: str, range_seconds: float, now: float | None, split: float | None) -> str:
    """Each process's last value of a RAW/RECORDED series over the range: from the newest part that has it (the
    recent raw one, the recorded one, the older raw one; `or` keeps the left side's value of a process)."""
    if split is None:
        return f"last_over_time({RAW[name]}[{duration(range_seconds)}])"
    return " or ".join((f"last_over_time({RAW[name]}{over(RECENT_SECONDS, now)})",
                        f"last_over_time({RECORDED[name]}{over(now - split, now)})",
                        f"last_over_time({RAW[name]}{over(split - (now - range_seconds), split)})"))


# How far back a series' state at a moment is read: Prometheus' lookback for an instant query (its default).
STATE_LOOKBACK_SECONDS = 300.0


def fleet_goodput(range_seconds: float, now: float) -> dict[str, str]:
    """What the fleet's goodput over the range needs (goodput.fleet): each job's rank-0 seconds per phase
    grown within the range (`phases`: a process's last less its first value, exact from its first scrape,
    not extrapolated as increase() would; a series that fell, its rises on the peak grid), each process's start
    (`process_start`), and each job's submission (`submitted`: its trainer's, or the job server's for a job still
    queued), and what tells a job's wait in the range before its first run there as a pause, not a queue: each
    process's checkpoints counted and written
    (`counted`, `written`: one that counts more resumed a run from before it) and the jobs paused in the range
    (`paused`: by their trainer's state or the job server's) or queued again to resume (the job server's
    trainer_job_resuming), and those paused or waiting to resume at the range's start (`paused_at_start`: in the
    lookback before it, as an instant query reads a state, a stale marker of a failed scrape or of the job server's
    restart not ending it)."""
    window = over(range_seconds, now)
    series = f'{Trainer.PHASE_SECONDS}{{rank=~"0|"}}'
    phases = f"{series}{window}"
    # A process resumed at the killed one's address (a fixed --metrics-listen port) continues its series from its
    # checkpoint's totals, below the killed one's last: the max less the min counted again what the killed one
    # threw away and did before the range (a job read 580 s of steps for 555), or hid the resumed one's seconds
    # under the killed one's last (315 for 415). A series that fell adds up its rises on the peak grid instead
    # (250 steps: a cost bounded over days, where a 5 s step is not): each step's newest sample less the newest
    # before the step (Prometheus' lookback; a kill's stale marker ends it), or, with none (or in the first step,
    # which starts before the range), less the step's first. The grid runs a step past now, so that its last step
    # reads up to now. A fall within a step misses what the process before it did in that step.
    s, start = peak_step(range_seconds), now - range_seconds
    step, newest = duration(s), f"last_over_time({series}[{duration(s)}])"
    after_start = f"vector(time()) > {timestamp_literal(start + s)}"
    rise = (f"(clamp_min({newest} - {series} offset {step}, 0) and on () {after_start}) "
            f"or ({newest} - min_over_time({series}[{step}]))")
    rises = f"sum_over_time(({rise})[{duration(range_seconds + s)}:{step}] @ {timestamp_literal(now + s)})"
    fell = f"resets({phases}) > 0"

    def paused(window: str) -> str:
        return (f'max by (job_id) (max_over_time({Trainer.JOB_STATE}{{state="paused"}}{window})) == 1 '
                f"or max by (job_id) (max_over_time({Trainer.JOB_RESUMING}{window})) == 1")

    return {"phases": f"sum by (job_id, phase) ((max_over_time({phases}) - min_over_time({phases}) unless {fell}) "
                      f"or ({rises} and {fell}))",
            "process_start": f'last_over_time({Trainer.PROCESS_START}{{rank=~"0|"}}{window})',
            "submitted": f"max by (job_id) (last_over_time({Trainer.JOB_SUBMITTED}{window}))",
            "counted": f'last_over_time({Trainer.CHECKPOINTS}{{rank=~"0|"}}{window})',
            "written": f'last_over_time({Trainer.CHECKPOINT_DURATION}_count{{rank=~"0|"}}{window})',
            "paused": paused(window),
            "paused_at_start": paused(over(STATE_LOOKBACK_SECONDS, now - range_seconds))}


# Resource trends over the summary range (range queries). Each point covers the step before it ({window}: the
# step, at least one second), so a short job still shows; the host and GPU trends' points are the step's
# averages, a spike shorter than the step diluted into its step (docs/api.md says so).
#
# Throughput is the samples counted in the window divided by it: per process, its newest count in the window
# minus its newest count before the window (or, for a process that started in the window, its first count
# in it). Windows tile, so the points add up to the samples processed; a window without a job is 0, as for
# running_jobs (left out, the range's average was over the steps with a job only: 845 samples/s for 38.7).
# Not rate(): Prometheus extrapolates to the window's edges and VictoriaMetrics takes the sample before the
# window instead, so the same data would give two different trends.
def _raw_window_increase(counter: str) -> str:
    """For raw series, whatever their scrape interval: the count before the window is the newest in the window
    before it (what the point before took as its newest), else an `offset` match (no sample in that window).
    Not the `offset` match alone: a failed scrape (a busy trainer past the scrape timeout) marks the target's
    series stale until its next one, a window starting in that gap matched nothing, and its first count in the
    window stood for the count before it: what the job counted across the gap went into no window (100 of 524
    samples). A process unscraped for a whole window or more, stale throughout, still counts from its first count
    after it.

    A series whose count fell (a job resumed at the killed process's address, a fixed --metrics-listen port: the
    resumed process counts on from its checkpoint, below the killed one's last) is read from its first count in the
    step wherever it fell in the step or across the step's start: its newest less the newest before was negative (a
    step of -85 samples/s), and the points added up to the resumed run's last count less the killed run's first in
    the range (-200 samples for 5,700). A fall within a step misses what the process before it counted in that
    step. The newest is the last count (where the count fell, the highest was the killed process's); the cost is
    more reads of the step (resets, and the lowest count against the count before), on the same grid."""
    newest, lowest = f"last_over_time({counter}[{{window}}])", f"min_over_time({counter}[{{window}}])"
    before, at_start = f"last_over_time({counter}[{{window}}] offset {{window}})", f"{counter} offset {{window}}"
    # A count before the step is where the step counts from only if no count in the step is below it: one that fell
    # across the step's start, its resumed process past the killed one's last by the step's end, read its newest
    # less the killed one's last (400 samples of 500), short by what the resumed one did again.
    grew = f"(({newest} - {before}) and {lowest} >= {before}) or (({newest} - {at_start}) and {lowest} >= {at_start})"
    return (f"sum(((({grew}) unless resets({counter}[{{window}}]) > 0) or "
            f"({newest} - {lowest})){{owned}}) / {{seconds}} or vector(0)")


def _recorded_window_increase(counter: str) -> str:
    """For the recorded series: a process's count before the window is its newest recording within
    RECORDING_GAP before it. (Read from the one recording a rule interval before the window, a missed evaluation
    there left the window's first recording as its count before, and the samples across the gap went into no
    window.) Without the raw trend's `or` match (twice the cost over a day of 1,000 jobs): counts only grow
    within a process, so its max - min over the window stretched back by the gap, less its max - min over that
    stretch alone, is its newest count in the window less its newest before it (its first count in the window
    where it has none before); a process recorded only before the window counts 0."""
    def spread(selection: str) -> str:
        return f"sum((max_over_time({counter}{selection}) - min_over_time({counter}{selection})){{owned}})"

    return (f"({spread('[{window+gap}]')} - ({spread('[{gap}] offset {window}')} or vector(0))) / {{seconds}} "
            "or vector(0)")


def _ended_in_window(end: str, start: str) -> str:
    """Jobs whose training ended in the window (a process that started training): one shorter than a scrape
    interval is scraped queued, then ended, never running."""
    return (f"max by (job_id) ((max_over_time({end}[{{window}}]) > time() - {{seconds}}) "
            f"and on (job_id, instance, run_id) max_over_time({start}[{{window}}]))")


TRENDS = {
    # Jobs, not processes: a job killed and resumed within one step ran as two processes in it.
    "running_jobs": (f'count(((max by (job_id) (max_over_time({Trainer.JOB_STATE}{{state="running"}}[{{window}}])) '
                     f'== 1) or {_ended_in_window(RAW["end"], RAW["start"])}){{owned}}) or vector(0)'),
    "samples_per_second": _raw_window_increase(Trainer.SAMPLES),
    "host_cpu_utilization_ratio": f"avg(avg_over_time({Node.CPU_UTILIZATION}[{{window}}]))",
    "host_memory_used_bytes": f'sum(avg_over_time({Node.MEMORY_USAGE}{{state="used"}}[{{window}}]))',
    "gpu_utilization_ratio": f"avg(avg_over_time({Node.GPU_UTILIZATION}[{{window}}]))",
}
# The per-job trends from the recorded series, at steps of RECORDED_TREND_MIN_STEP_SECONDS or more: a process
# counts as running at a point when a recording in the step saw "running" as its last state (up to one rule
# window after its last raw sample), and throughput counts the per-minute recorded sample counts as above.
RECORDED_TRENDS = {
    "running_jobs": (f'count((max by (job_id) (max_over_time({RECORDED["state"]}{{state="running"}}[{{window}}])) '
                     f'or {_ended_in_window(RECORDED["end"], RECORDED["start"])}){{owned}}) or vector(0)'),
    "samples_per_second": _recorded_window_increase(RECORDED["samples"]),
}


def trend_grid(range_seconds: float, step: float, now: float) -> tuple[float, float, str]:
    """start, end and step of the trends' range queries: points on multiples of the step, the last at or
    before now (the service adds the point at now from an instant query). VictoriaMetrics moves a range
    query's start and end to multiples of its step and answers points after now from what it had at now;
    on multiples up to now both backends evaluate the same points the same way."""
    step_ms = max(1, round(step * 1000))
    end_ms = math.floor(now * 1000 / step_ms) * step_ms
    # floor(range / step) points, each reading the step before it: they tile the range's length up to the last
    # multiple. One more (the first at end - range) read a step before that, and the average divided those
    # samples by range + step (over 10 minutes in one step of 10: the mean of a point before the range and one
    # in it, 39.55 samples/s for 95.2).
    start_ms = end_ms - (max(1, math.floor(range_seconds * 1000 / step_ms)) - 1) * step_ms
    return start_ms / 1000, end_ms / 1000, f"{step_ms}ms"


def trend(name: str, step: float, recorded: bool = False, owner: str | None = None, range_seconds: float | None = None,
          now: float | None = None, split: float | None = None) -> str:
    """A resource-trend expression for range queries at `step` (from the recorded series where asked and
    available); the job trends of one owner's jobs when given (the hosts' trends stay whole): the jobs that the
    summary's rows over the range ending at `now` (read raw, or recorded from `split`) count as the owner's."""
    template = RECORDED_TRENDS[name] if recorded and name in RECORDED_TRENDS else TRENDS[name]
    window_ms = rate_window_ms(step)
    gap_ms = round(RECORDING_GAP_SECONDS * 1000)
    template = template.replace("{window+gap}", f"{window_ms + gap_ms}ms").replace("{gap}", f"{gap_ms}ms")
    template = template.replace("{window}", f"{window_ms}ms").replace("{seconds}", repr(window_ms / 1000))
    # The job's owner is a label of its info series only: its other series are kept where the job's info
    # carried the owner in the same window. Put in last: an owner is anyone's text ("{window}" in it was
    # replaced, and the trends counted another owner's jobs).
    info = RECORDED["info"] if recorded else RAW["info"]
    # Only a job that is the owner's alone over the range, as the rows count it: a job resumed under another owner
    # (its processes name two) is in neither owner's rows, and its runs were in the first owner's trends.
    if owner is None:
        owned = ""
    else:
        if range_seconds is None or now is None:
            raise ValueError("an owner's trends need the summary's range and time (range_seconds, now)")
        owned = (f" and on (job_id) (max by (job_id) (max_over_time({info}{{owner={quote_label_value(owner)}}}"
                 f"[{window_ms}ms])) unless on (job_id) ({fleet_not_owned(owner, range_seconds, now, split)}))")
    return template.replace("{owned}", owned)


# The jobs TrainerHang fires for now (deploy/prometheus/rules/alerts.yml, evaluated by the Prometheus read):
# the job server takes their ranks' stacks once per hang (trainmetrics.hangs).
HUNG_JOBS = 'max by (job_id) (ALERTS{alertname="TrainerHang",alertstate="firing"})'
