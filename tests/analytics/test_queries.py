"""PromQL construction: the one quoting function, the allowlist before it, windows and steps."""

import re
from pathlib import Path

import pytest
import yaml

from trainmetrics.analytics import queries as q

HOSTILE_IDS = {
    "quote": 'a"b',
    "backslash": "a\\b",
    "close matcher": 'x"}',
    "or vector": 'x"} or vector(1) or {job_id="',
    "or vector bare": "x or vector(1)",
    "regex dot-star": ".*",
    "regex alternation": "a|b",
    "regex group": "(a)",
    "regex plus": "a+",
    "empty": "",
    "10 KB": "a" * 10240,
    "65 chars": "a" * 65,
    "NUL": "a\x00b",
    "newline": "a\nb",
    "a word of the paths": "jobs",       # /api/training/jobs/analytics is job `analytics` on the job server
    "emoji": "job-🚀",
    "dot-dot": "..",
    "path": "../etc",
    "leading dash": "-x",
    "space": "a b",
    "brace": "a{b}",
}


@pytest.mark.parametrize("job_id", HOSTILE_IDS.values(), ids=list(HOSTILE_IDS))
def test_hostile_ids_never_become_promql(job_id):
    with pytest.raises(ValueError, match="invalid job id"):
        q.quote_job_id(job_id)
    for build in (lambda: q.job_recent(job_id, 60, 1e9), lambda: q.job_ended(job_id, [1e9]),
                  lambda: q.job_lookup_full(job_id, 60, 1e9), lambda: q.job_totals(job_id, 60, 1e9),
                  lambda: q.job_totals(job_id, 60, 1e9, [1e9]), lambda: q.job_rates(job_id, 60, 1e9),
                  lambda: q.job_energy(job_id, 60, 1e9, 1e9, [1e9]), lambda: q.eval_history_changes(job_id, "250ms"), lambda: q.eval_history_samples(job_id, 60),
                  lambda: q.fleet_last_seen(["ok-1", job_id], 60, 1e9)):
        with pytest.raises(ValueError):
            build()


def test_a_valid_id_enters_only_as_an_equality_matcher():
    job_id = "run-7.b_2"
    expressions = [*q.job_recent(job_id, 60, 1e9).values(), *q.job_ended(job_id, [1e9, 2e9]).values(),
                   *q.job_lookup_full(job_id, 60, 1e9).values(), *q.job_totals(job_id, 60, 1e9).values(),
                   *q.job_totals(job_id, 600, 2e9, [2e9, 1e9]).values(), *q.job_rates(job_id, 60, 1e9).values(),
                   *q.job_energy(job_id, 600, 2e9, 2e9, [2e9, 1e9]).values(), q.eval_history_changes(job_id, "250ms"), q.eval_history_samples(job_id, 60),
                   *q.fleet_last_seen([job_id], 60, 1e9).values()]
    names = '__name__=~"' + "|".join(q.HISTORY.values()) + '"'     # the one regex: over constant metric names
    for expr in expressions:
        assert "=~" not in expr.replace(names, "") and "!~" not in expr
        # Every occurrence of the id is the whole value of a job_id="..." matcher.
        assert expr.count(job_id) == expr.count(f'job_id="{job_id}"'), expr
    assert q.quote_job_id(job_id) == '"run-7.b_2"'


def test_durations_steps_and_timestamps():
    assert q.duration(1.5) == "1500ms"
    assert q.duration(0.0001) == "1ms"
    assert q.duration(3600) == "3600000ms"
    assert q.range_step(60) == 1.0                  # never below the window a rate is read over
    assert q.range_step(36_000) == 3.6              # 10,000 points for ten hours
    assert q.range_step(86400) == pytest.approx(8.64)
    assert 86400 / q.range_step(86400) <= 11_000
    assert q.over(60, 1700000000.1234) == "[60000ms] @ 1700000000.123"
    assert q.peak_step(3600) == 14.4                # peaks: at most 250 grid points
    assert q.grid(3600, 1700000000) == "[3600000ms:14400ms] @ 1700000000.000"
    assert q.step_window(10) == "1000ms" and q.step_window(3600) == "14400ms"


def test_totals_read_each_process_last_minute_newest_first():
    parts = q.job_totals("j", 3600, 2000.0, [2000.0, 1000.0])
    assert parts["samples"] == ('max_over_time(trainer_samples_total{job_id="j"}[75000ms] @ 2000.000) or '
                                'max_over_time(trainer_samples_total{job_id="j"}[75000ms] @ 1000.000)')
    assert parts["loss_min"] == ('last_over_time(trainer_loss_min{job_id="j"}[75000ms] @ 2000.000) or '
                                 'last_over_time(trainer_loss_min{job_id="j"}[75000ms] @ 1000.000)')
    whole = q.job_totals("j", 3600, 2000.0)
    assert whole["samples"] == 'max_over_time(trainer_samples_total{job_id="j"}[3600000ms] @ 2000.000)'
    # A job shorter than the last-values window reads no further back than its start.
    assert "[30000ms] @ 2000.000" in q.job_totals("j", 30, 2000.0, [2000.0])["steps"]


def test_energy_reads_each_process_last_minute_and_the_exporters_grace_after_it():
    # The newer process ended 5 s ago: read up to now; the older one up to 15 s after its final instant.
    parts = q.job_energy("j", 3600, 2000.0, 2000.0, [2000.0, 1000.0])
    assert parts["energy"] == ('max_over_time(process_energy_joules_total{job_id="j"}[75000ms] @ 2000.000) or '
                               'max_over_time(process_energy_joules_total{job_id="j"}[90000ms] @ 1015.000)')
    assert q.job_energy("j", 3600, 1000.0, 2000.0)["energy"] == \
        'max_over_time(process_energy_joules_total{job_id="j"}[3615000ms] @ 1015.000)'


def test_the_history_reads_every_series_of_one_job_raw():
    expr = q.eval_history_samples("j", 1.5)
    assert expr.endswith('job_id="j"}[1500ms]') and "@" not in expr
    assert all(metric in expr for metric in q.HISTORY.values())
    assert q.eval_history_changes("j", "250ms") == 'last_over_time(trainer_eval_history_index{job_id="j"}[250ms])'


def test_union_tags_each_part():
    expr = q.union({"a": "up", "b": "vector(1)"})
    assert expr == ('label_replace(up, "analytics_part", "a", "", "") or '
                    'label_replace(vector(1), "analytics_part", "b", "", "")')


def test_every_part_name_is_a_plain_identifier():
    names = [*q.job_recent("j", 1, 1), *q.job_ended("j", [1, 2]), *q.job_totals("j", 1, 1), *q.job_rates("j", 1, 1),
             *q.job_energy("j", 1, 1, 1), *q.host(1, 1, 2), *q.fleet_last_seen(["j", "k"], 1, 1)]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z_]+[0-9]*", name) for name in names)


def test_trend_windows_follow_the_step():
    assert "[1000ms]" in q.trend("samples_per_second", 0.25)
    assert "[15000ms]" in q.trend("host_cpu_utilization_ratio", 15)


def test_peak_grid_lands_on_the_subquery_grid():
    # grid(3600, T): step 14400 ms, points at multiples of it in [T - 3600 s, T]
    start, end, step = q.peak_grid(3600, 1700000000.5)
    assert step == "14400ms"
    assert start == pytest.approx(1699996406.4) and end == pytest.approx(1699999992.0)
    assert round(start * 1000) % 14400 == 0 and round(end * 1000) % 14400 == 0
    # an aligned window keeps both ends; a short one steps at the scrape interval
    assert q.peak_grid(36, 36.0) == (0.0, 36.0, "250ms")
    assert q.peak_grid(0.1, 1.0) == (1.0, 1.0, "250ms")
    # a window shorter than a step that holds no grid point: the point at or before the end, never a range
    # ending before it starts (make test once caught a sub-second window doing that: Prometheus said 400)
    assert q.peak_grid(0.06, 1795402000.695542) == (1795402000.5, 1795402000.5, "250ms")
    for window in (0.01, 0.05, 0.1, 0.2, 0.24):
        for offset in range(0, 1000, 7):
            start, end, _ = q.peak_grid(window, 1795402000 + offset / 1000)
            assert start <= end <= 1795402000 + offset / 1000


def test_peak_expressions_are_label_free_and_id_safe():
    for expressions in (q.job_peaks("run-1", 60), q.host_peaks(60)):
        for expr in expressions.values():
            assert expr.startswith(("sum(", "max(", "avg(")), expr     # one series per expression
    with pytest.raises(ValueError):
        q.job_peaks('x"}', 60)


def test_recorded_split():
    now, day = 1_000_000.0, 86400.0
    assert q.recorded_split(day, now, None) == now - day + q.RULE_WINDOW_SECONDS     # rules ran throughout
    assert q.recorded_split(day, now, now - 3600) == now - 3600                      # since the last gap
    assert q.recorded_split(day, now, now - 60) is None                              # recent gap / no rules
    assert q.recorded_split(q.RECENT_SECONDS, now, None) is None                     # range too short


def test_fleet_reads_raw_series_only_without_a_split():
    assert q.fleet_start(3600) == "last_over_time(trainer_job_start_timestamp_seconds[3600000ms])"
    assert q.fleet_state(3600) == "last_over_time(trainer_job_state[3600000ms]) == 1"
    assert q.RECORDED["start"] not in q.fleet_start(3600, 1e6, None)
    split_parts = q.fleet_start(86400, 1e6, 1e6 - 80000)
    assert q.RECORDED["start"] in split_parts and "@ 920000.000" in split_parts
    assert set(q.fleet_state(86400, 1e6, 1e6 - 80000)) == {"recent", "recorded", "older"}
    assert q.trend("running_jobs", 600, recorded=True).startswith(f"count((max by (job_id) (max_over_time({q.RECORDED['state']}")
    assert q.trend("host_cpu_utilization_ratio", 600, recorded=True) == q.trend("host_cpu_utilization_ratio", 600)


def test_recorded_names_and_windows_match_the_rules_file():
    rules_file = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "analytics.rules.yml"
    (group,) = yaml.safe_load(rules_file.read_text())["groups"]
    assert group["interval"] == f"{q.RULE_INTERVAL_SECONDS / 60:g}m"
    records = {rule["record"]: rule["expr"] for rule in group["rules"]}
    assert set(records) == {q.HEARTBEAT, *q.RECORDED.values()}
    window = f"[{q.RULE_WINDOW_SECONDS / 60:g}m]"
    for part, name in q.RECORDED.items():
        assert f"{q.RAW[part]}{window}" in records[name], name


def test_a_cpu_job_peaks_leave_the_gpu_joins_out():
    with_gpus, without = q.job_peaks("j", 600), q.job_peaks("j", 600, gpus=False)
    assert {name for name in with_gpus if name.startswith("gpu_")} == {
        "gpu_utilization", "gpu_utilization_avg", "gpu_temperature", "gpu_memory"}
    assert set(without) == {name for name in with_gpus if not name.startswith("gpu_")}
    assert all("hw_gpu" not in expr for expr in without.values())


def test_a_vanished_jobs_cached_analytics_are_dropped_once_prometheus_forgets_it():
    """A job killed with -9 and no longer scraped answers the cheap lookup with its start over the lookback
    only; the fingerprint left that out, so after a wiped Prometheus its cached analytics still answered as
    `source: prometheus` instead of the stored report."""
    from trainmetrics.analytics.lookup import fingerprint

    vanished = {"starts": [{"metric": {"job_id": "k", "instance": "h:1", "rank": "0"}, "value": [1.0, "100"]}]}
    assert fingerprint(vanished) != fingerprint({})
    assert "attributed" in q.job_recent("k", 3600, 2000.0)       # an exporter still counting for the job


@pytest.mark.parametrize("range_seconds,step", [(600, 600), (600, 1), (120, 0.5), (241, 1.005), (90 * 86400, 777.6)])
def test_the_trend_grid_tiles_the_range_and_no_more(range_seconds, step):
    """Its points are on multiples of the step, each reading the step before it: floor(range / step) of them
    tile the range's length up to the last multiple. There was one more, reading a step before the range, and
    the trends' average divided by range + step."""
    now = 1_796_476_107.75
    start, end, literal = q.trend_grid(range_seconds, step, now)
    step_ms = int(literal.removesuffix("ms"))
    points = round((end - start) * 1000) // step_ms + 1
    assert points == max(1, int(range_seconds * 1000 // step_ms))
    assert end <= now < end + step_ms / 1000 and round(end * 1000) % step_ms == 0


@pytest.mark.parametrize("recorded", [False, True])
def test_an_owner_enters_the_trends_as_it_is(recorded):
    """An owner is anyone's text (trainmetrics train --owner): one holding the trends' placeholders was
    substituted like the template, and the summary's job trends counted the jobs of owner "600000ms"."""
    owner = "team {window} {seconds} {window+gap} {gap} {owned}"
    for name in ("running_jobs", "samples_per_second"):
        expr = q.trend(name, 600.0, recorded=recorded, owner=owner, range_seconds=3600.0, now=1_796_476_107.75,
                       split=1_796_472_807.75 if recorded else None)
        assert f'owner={q.quote_label_value(owner)}}}[600000ms]' in expr, expr
        assert f'owner!={q.quote_label_value(owner)},rank=~"0|"}}' in expr, expr


@pytest.mark.parametrize("step", [4.03, 16.28, 2.007, 1.005, 360.0])
def test_each_trend_point_reads_exactly_its_step(step):
    """4.03 s is 4030.0000000000005 ms in binary floating point (967 s's default step): the trend grid's points
    were 4030 ms apart while each read 4031 ms, rounded up, and divided by 4.031 s, so the points times the step
    missed the samples by a part in 4,000, and a sample in the millisecond two points both read counted twice."""
    _, _, literal = q.trend_grid(86400, step, 1_796_476_107.75)
    for name in ("samples_per_second", "running_jobs"):
        expr = q.trend(name, step)
        assert set(re.findall(r"\[(\d+ms)\]", expr)) == {literal}, expr
        assert set(re.findall(r"offset (\d+ms)", expr)) <= {literal}, expr
    assert f") / {int(literal.removesuffix('ms')) / 1000!r} or" in q.trend("samples_per_second", step)
    # (the peak grid's points, a step over a second apart, still read one step each)
    for window in (1007.5, 4070.0):
        assert q.peak_grid(window, 1_796_476_107.75)[2] == q.step_window(window)
