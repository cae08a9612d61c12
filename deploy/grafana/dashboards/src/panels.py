"""Small panel factories shared by every dashboard: one datasource, one query shape, one style."""

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.models import common as enums
from grafana_foundation_sdk.models.dashboard import (DataSourceRef, DataTransformerConfig, DynamicConfigValue,
                                                     Threshold, ThresholdsMode, VariableRefresh, VariableSort)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# 250 ms scrapes: let Grafana go down to 1 s per point; $__rate_interval covers at least 4 scrapes.
MIN_INTERVAL = "1s"
REFRESH_INTERVALS = ["1s", "5s", "10s", "30s", "1m", "5m"]


# ----- a job's runs (the Training job and Compare dashboards): `jobs` is a job_id matcher ---------------------
RANK0 = 'rank=~"0|"'


def last_start(jobs: str) -> str:
    """Each job's newest run's start of training in the time range."""
    return f"max by (job_id) (last_over_time(trainer_job_start_timestamp_seconds{{{jobs}}}[$__range]))"


def newest_run(jobs: str) -> str:
    """`and` the processes of each job's newest run: seen after that run started (a resumed job's earlier runs
    ended before)."""
    return (f"and on (job_id, instance, run_id, rank) (last_over_time(trainer_heartbeat_timestamp_seconds{{{jobs}}}"
            f"[$__range]) >= on (job_id) group_left {last_start(jobs)})")


def newest_counts(metric: str, jobs: str, by: str = "", combine: str = "max") -> str:
    """The highest (`combine`, `by` those labels) of each process's last `metric` in the time range, a figure the job
    carries over a resume (a count, a best loss): of each job's newest run (newest_run), else of every run (trainers
    from before the heartbeat). A killed run went past the checkpoint its resumed run counts on from, with work that
    was thrown away, and every run's highest (lowest loss) showed that until the resumed run caught up (the
    analytics read the newest run's)."""
    last, combined = f"last_over_time({metric}{{{jobs}}}[$__range])", f"{combine} by ({by}) " if by else combine
    return f"{combined}({last} {newest_run(jobs)}) or {combined}({last})"


def peak(selector: str) -> str:
    """The highest of a peak series (the exporter's 1 s window's max, a recording rule's 1-minute one), or of a
    figure whose highs are the point (a rank's seconds without progress, a job's step-time quantiles), over each
    point's interval: read at the point's instant alone, a spike or a stall between two points (most, once a point
    spans seconds) was not drawn.
    $__rate_interval: the point's interval and a scrape more, at least 1 s (a 250 ms $__interval window can hold
    no sample, a scrape's jitter: a gap in the line)."""
    return f"max_over_time({selector}[$__rate_interval])"


def mean(selector: str) -> str:
    """The mean of a series that is a mean over a short window (the exporter's 1 s mean utilisation, a recorded
    10 s rate) over each point's interval, beside peak()'s max: read at the point's instant alone, the mean line
    was one 1 s window's mean a point, a minute apart over a day, so a GPU busy 2 s of every 4 read anywhere from 0
    to 1 by chance, not its 0.5 (and sat on or under the peak line at random); a job's throughput likewise read
    its 10 s before each point, full speed or none by chance for a job that evaluates every other minute."""
    return f"avg_over_time({selector}[$__rate_interval])"


def rate_without_falls(selector: str) -> str:
    """rate() of a counter whose fall is no restart from 0, none over a window in which it fell (as the recording
    rules): rate() takes a fall for a reset and the whole count for the window's increase. A trainer's counts
    carried across resumes (a process restarted at the same address resumes from its checkpoint's, below the killed
    one's), and the exporter's count of a job's CPU time (restarted, it counts the live ranks' trees alone: an ended
    rank's time, or a departed process's, is no longer in it)."""
    return f"(rate({selector}[$__rate_interval]) unless resets({selector}[$__rate_interval]) > 0)"


def finite_loss(selector: str, window: str) -> str:
    """Each process's last trainer_loss over `window`, none where its last interval's loss was NaN or infinite
    (trainer_loss then holds the last finite one: a flat line, or a final loss, that looked like a real one)."""
    return (f"last_over_time(trainer_loss{{{selector}}}[{window}]) unless on (job_id, instance, run_id, rank) "
            f"(last_over_time(trainer_loss_finite{{{selector}}}[{window}]) == 0)")


def first_start(jobs: str) -> str:
    """Each job's first start of training, looked for as far back as the analytics look for a job (their --lookback,
    30 days: the deployed Prometheus' retention), in the start each run's process had when the analytics rules
    recorded it (a minute apart: cheap over days), and in the time range (a run too new to be recorded). In the
    time range alone, a job resumed after its first run had left the range (a pause longer than the range: the
    default 15 minutes) was as old as its newest run."""
    return (f"min by (job_id) (min_over_time(job_process:trainer_job_start_timestamp_seconds:last5m{{{jobs}}}[30d]) "
            f"or last_over_time(trainer_job_start_timestamp_seconds{{{jobs}}}[$__range]))")


def duration(jobs: str) -> str:
    """Each job's first start to its last end, or to rank 0's last heartbeat while its newest run has not ended
    (a resumed job's pauses included)."""
    last_end = f"max by (job_id) (last_over_time(trainer_job_end_timestamp_seconds{{{jobs}}}[$__range]))"
    return (f"({last_end} >= on (job_id) {last_start(jobs)} or on (job_id) max by (job_id) (last_over_time("
            f"trainer_heartbeat_timestamp_seconds{{{jobs},{RANK0}}}[$__range]))) - on (job_id) {first_start(jobs)}")


def new_dashboard(title: str, uid: str, description: str, tags: list[str]) -> dashboard.Dashboard:
    """A dashboard with the Prometheus datasource variable, a 1 s refresh option and our tags."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["trainmetrics", *tags])
        .editable()
        .refresh("5s")
        .time("now-15m", "now")
        .timepicker(dashboard.TimePicker().refresh_intervals(REFRESH_INTERVALS))
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )


def label_variable(name: str, label: str, query: str, multi: bool = False) -> dashboard.QueryVariable:
    """A variable listing the values of a label (label_values(...)), refreshed with the time range."""
    variable = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    return variable.multi(True) if multi else variable


def query(expr: str, legend: str = "__auto", ref_id: str = "A", instant: bool = False,
          table_format: bool = False) -> prometheus.Dataquery:
    """One PromQL target."""
    target = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(DATASOURCE)
    if instant:
        target = target.instant()
    if table_format:
        target = target.format(PromQueryFormat.TABLE)
    return target


def timeseries_panel(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
                     width: int = 12, height: int = 8, min_value: float | None = None,
                     max_value: float | None = None, stacked: bool = False) -> timeseries.Panel:
    """A time-series panel; several targets overlay (e.g. mean vs peak), or stack (parts of a whole)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .interval(MIN_INTERVAL)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(10)
        .legend(common.VizLegendOptions().show_legend(True).display_mode(enums.LegendDisplayMode.LIST)
                .placement(enums.LegendPlacement.BOTTOM))
        .tooltip(common.VizTooltipOptions().mode(enums.TooltipDisplayMode.MULTI).sort(enums.SortOrder.DESCENDING))
    )
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(enums.StackingMode.NORMAL)).fill_opacity(60)
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    for target in targets:
        panel = panel.with_target(target)
    return panel


def stat_panel(title: str, description: str, unit: str, target: prometheus.Dataquery, width: int = 4,
               height: int = 4, text_mode: enums.BigValueTextMode = enums.BigValueTextMode.AUTO,
               red_from: float | None = None) -> stat.Panel:
    """A single number: the last value of the series, uncoloured, or red from `red_from` on. (Without
    thresholds of its own, Grafana's default turned every count past 80 red: a healthy job's steps.)"""
    steps = [Threshold(value=None, color="text")]
    if red_from is not None:
        steps.append(Threshold(value=red_from, color="red"))
    return (
        stat.Panel()
        .color_mode(enums.BigValueColorMode.VALUE)
        .thresholds(dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .interval(MIN_INTERVAL)
        .span(width)
        .height(height)
        .text_mode(text_mode)
        .graph_mode(enums.BigValueGraphMode.NONE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target)
    )


def table_panel(title: str, description: str, *targets: prometheus.Dataquery, columns: dict[str, tuple[str, str]],
                width: int = 24, height: int = 8) -> table.Panel:
    """A table of instant queries joined on their labels (one row per job). `columns`: each value column's
    name and unit, by the column Grafana makes ("Value #<ref id>" for several queries, "Value" for one): it
    showed "Value #duration_seconds 48.94" and accuracy as a bare 0.955. The time column is left out."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True}}))
    )
    for column, (name, unit) in columns.items():
        panel = panel.override_by_name(column, [DynamicConfigValue(id_val="displayName", value=name),
                                                DynamicConfigValue(id_val="unit", value=unit)])
    for target in targets:
        panel = panel.with_target(target)
    return panel


def row(title: str) -> dashboard.Row:
    """A row header."""
    return dashboard.Row(title)


def alert_annotation(name: str, matchers: str, color: str) -> dashboard.AnnotationQuery:
    """Marks on every time-series panel where the alerts the matchers pick fire. Firing only: ALERTS holds the
    pending stretch too (TrainerHang's 5 s `for`), which was marked as a hang that had not been called one."""
    return (dashboard.AnnotationQuery().name(name).datasource(DATASOURCE)
            .expr(f'ALERTS{{alertstate="firing",{matchers}}}').enable(True).icon_color(color))
