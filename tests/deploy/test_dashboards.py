"""Dashboards are generated from code, and every panel query runs against a real Prometheus fed by a real
exporter and a real job."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainmetrics.prometheus_process import PrometheusServer, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
GENERATOR = DASHBOARDS / "src" / "generate.py"
JOB_ID = "dash-job-1"
# The recording rules the analytics and the dashboards read a job's past runs from.
ANALYTICS_RULES = ROOT / "deploy" / "prometheus" / "rules" / "analytics.rules.yml"
# No GPU on the test machines: these series exist only where NVML finds a GPU or CUDA trains.
GPU_ONLY = re.compile(r"hw_gpu_|trainer_gpu_memory_peak")


def all_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_targets():
    for name, dashboard in all_dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield name, panel["title"], target


def test_committed_json_is_exactly_what_the_code_generates():
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(all_dashboards()) == {"training-job.json", "node.json", "fleet.json", "compare.json"}


def test_dashboards_suit_250ms_data():
    for name, dashboard in all_dashboards().items():
        assert "1s" in dashboard["timepicker"]["refresh_intervals"], name
        assert dashboard["templating"]["list"][0]["type"] == "datasource"
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, panel["title"])
            for target in panel["targets"]:
                rates = re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", target["expr"])
                assert all(window == "$__rate_interval" for window in rates), (name, panel["title"], rates)


def fill_variables(expr: str, instance: str) -> str:
    # As Grafana does for a multi-value variable: regex-escaped, then escaped again inside the PromQL string.
    instance_regex = re.escape(instance).replace("\\", "\\\\")
    return (expr.replace("$job_id", JOB_ID).replace("$instance", instance_regex)
            .replace("$__rate_interval", "2s").replace("$__range", "10m").replace("$__interval", "1s"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Exporter + Prometheus (rules loaded) + one finished job that used both."""
    work = tmp_path_factory.mktemp("stack")
    exporter_address = f"127.0.0.1:{free_port()}"
    job_dir = work / "jobs"
    job_dir.mkdir()
    exporter = subprocess.Popen([sys.executable, "-m", "trainmetrics", "exporter", "--listen", exporter_address,
                                 "--job-dir", str(job_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prometheus = PrometheusServer(work / "prometheus", static_targets={"exporter": [exporter_address]}).start()
    try:
        prometheus.wait_for('up{job="exporter"} == 1', timeout=30)
        began = time.time()
        # A fast host trains these epochs in under a second, between two evaluations of the 1 s recording
        # rules, so the series recorded while a rank is inside its loop (seconds without progress) could be
        # empty: a stall inside the loop holds it there across several evaluations on any host. 12 s: the
        # goodput adds up rises 5 s apart, so a job has one from 5-10 s into its steps.
        stall = {"TRAINMETRICS_FAULTS": json.dumps({"stall": {"step": 30, "seconds": 12}})}
        job = subprocess.run([sys.executable, "-m", "trainmetrics", "train", "--job-id", JOB_ID, "--model", "cnn",
                              "--dataset", "digits", "--epochs", "3", "--batch-size", "8", "--log-every", "20",
                              "--workers", "1", "--peak-flops", "1e11", "--checkpoint-dir", str(work / "ckpt"),
                              "--targets-dir", str(prometheus.targets_dir), "--job-dir", str(job_dir)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **stall})
        assert job.returncode == 0, job.stderr
        time.sleep(3)   # let the 1 s recording rules see the end
        yield prometheus, exporter_address, began - 5, time.time()
    finally:
        prometheus.stop()
        exporter.terminate()
        exporter.communicate(timeout=20)


def test_every_panel_query_runs_and_returns_data(stack):
    prometheus, instance, start, end = stack
    empty, checked = [], 0
    for dashboard, title, target in panel_targets():
        expr = fill_variables(target["expr"], instance)
        if target.get("instant"):
            result = prometheus.query(expr, time_=end)
        else:
            result = prometheus.query_range(expr, start, end, 1)
        checked += 1
        if not result and not GPU_ONLY.search(expr):
            empty.append(f"{dashboard} / {title}: {expr}")
    assert checked >= 40
    assert empty == [], "panels without data:\n" + "\n".join(empty)


def variable_metrics(label: str) -> set[str]:
    """The metrics the dashboards' pickers of `label` list values from (label_values(METRIC, label))."""
    return {match.group(1) for dashboard in all_dashboards().values() for variable in dashboard["templating"]["list"]
            for match in [re.fullmatch(rf"label_values\((\w+), {label}\)", str(variable.get("query", "")))] if match}


def test_variable_queries_list_the_job_and_the_node(stack):
    prometheus, instance, _, _ = stack
    for metric in variable_metrics("job_id"):
        assert JOB_ID in prometheus.api("label/job_id/values", **{"match[]": metric})
    for metric in variable_metrics("instance"):
        assert instance in prometheus.api("label/instance/values", **{"match[]": metric})


def test_the_job_pickers_list_a_job_that_only_waits():
    """A queued job has the job server's series only (its state, submission and end): the pickers listed
    trainer_job_info's job ids, so a queued job, whose state the Training job dashboard shows, was not there."""
    from types import SimpleNamespace

    from trainmetrics.jobserver.app import WaitingJobsCollector
    from trainmetrics.jobserver.jobs import WaitingJob
    from trainmetrics.jobserver.store import JobRecord

    job = JobRecord(id="queued-1", owner="alice", name="queued-1", spec={}, state="queued", created=1.0)
    waiting = SimpleNamespace(waiting=[WaitingJob(job, "queued", None, False)])
    published = {family.name for family in WaitingJobsCollector(waiting).collect()}
    assert variable_metrics("job_id") and variable_metrics("job_id") <= published


def test_stats_and_tables_say_what_they_show():
    """A stat without thresholds of its own took Grafana's default (red from 80: a healthy job's steps and
    samples were red); a table's value columns were "Value #duration_seconds" with no unit; the node dashboard's
    legends did not say which node when several are picked."""
    for name, dashboard in all_dashboards().items():
        for panel in dashboard["panels"]:
            if panel["type"] == "stat":
                assert panel["fieldConfig"]["defaults"].get("thresholds"), (name, panel["title"])
            if panel["type"] == "table":
                named = {override["matcher"]["options"] for override in panel["fieldConfig"]["overrides"]
                         if any(prop["id"] == "displayName" for prop in override["properties"])}
                columns = {"Value"} if len(panel["targets"]) == 1 else \
                    {f"Value #{target['refId']}" for target in panel["targets"]}
                assert named == columns, (name, panel["title"], named)
            if name == "node.json" and panel["type"] == "timeseries":
                for target in panel["targets"]:
                    assert "{{instance}}" in target["legendFormat"], (panel["title"], target["legendFormat"])


# Compare's summary table against jobs whose figures are known: m2 runs two ranks (2,000 samples each; rank 0's
# best loss 0.7, rank 1's 0.3: rank 0 speaks for the job's losses, as in the analytics and the final loss); r1
# was paused at 5 m (its first run from 0) and resumed at 10 m, its newest loss 0.5; d1 was resumed too and its
# newest run's last interval diverged (trainer_loss holds 0.4, trainer_loss_finite says 0).
COMPARE_JOBS = """
      - series: 'trainer_samples_total{job_id="m2",rank="0",instance="h:1"}'
        values: '0+100x20'
      - series: 'trainer_samples_total{job_id="m2",rank="1",instance="h:2"}'
        values: '0+100x20'
      - series: 'trainer_loss_min{job_id="m2",rank="0",instance="h:1"}'
        values: '0.7x20'
      - series: 'trainer_loss_min{job_id="m2",rank="1",instance="h:2"}'
        values: '0.3x20'
"""
for job, newest in (("r1", "0.8 0.7 0.6 0.5"), ("d1", "0.8 0.4 0.4 0.4")):
    finite = "1 1 1 1" if job == "r1" else "1 0 0 0"
    COMPARE_JOBS += f"""
      - series: 'trainer_loss{{job_id="{job}",instance="p1"}}'
        values: '2 1.5 1.2 1.0 0.9 0.9'
      - series: 'trainer_loss_finite{{job_id="{job}",instance="p1"}}'
        values: '1x5'
      - series: 'trainer_loss{{job_id="{job}",instance="p2"}}'
        values: '_x9 {newest} 0.5x6'
      - series: 'trainer_loss_finite{{job_id="{job}",instance="p2"}}'
        values: '_x9 {finite} {finite[-1]}x6'
      - series: 'trainer_job_start_timestamp_seconds{{job_id="{job}",instance="p1"}}'
        values: '0x5'
      - series: 'trainer_job_end_timestamp_seconds{{job_id="{job}",instance="p1"}}'
        values: '_x4 300'
      - series: 'trainer_job_start_timestamp_seconds{{job_id="{job}",instance="p2"}}'
        values: '_x9 600x10'
      - series: 'trainer_heartbeat_timestamp_seconds{{job_id="{job}",instance="p1"}}'
        values: '0+60x5'
      - series: 'trainer_heartbeat_timestamp_seconds{{job_id="{job}",instance="p2"}}'
        values: '_x9 600+60x10'
      - series: 'trainer_loss_min{{job_id="{job}",instance="p1"}}'
        values: '2 1.5 1.2 1.0 0.85 0.85'
      - series: 'trainer_loss_min{{job_id="{job}",instance="p2"}}'
        values: '_x9 0.8 {"0.45" if job == "r1" else "0.4"}x10'
"""
# r1's first run evaluated to 0.9, its newest run to 0.6.
COMPARE_JOBS += """
      - series: 'trainer_eval_accuracy_ratio{job_id="r1",instance="p1"}'
        values: '0.9x5'
      - series: 'trainer_eval_accuracy_ratio{job_id="r1",instance="p2"}'
        values: '_x9 0.6x10'
"""
# best_loss: the trainer's own lowest interval (trainer_loss_min), which no trainer_loss sample need show.
COMPARE_EXPECTED = {"samples": {"m2": 4000}, "best_loss": {"m2": 0.7, "r1": 0.45, "d1": 0.4}, "final_loss": {"r1": 0.5},
                    "accuracy": {"r1": 0.6}, "duration_seconds": {"r1": 1200, "d1": 1200}}


def promtool_passes(path: Path, series: str, tests: list[str], interval: str = "1m", rules: Path | None = None) -> None:
    """promtool's unit test of the expressions (`promql_expr_test` entries) over the input series, at `interval`
    steps (the rules of the file `rules` recorded at that interval too), passes."""
    rule_files = f"rule_files: ['{rules}']\n" if rules else ""
    path.write_text(f"{rule_files}evaluation_interval: {interval}\ntests:\n  - interval: {interval}\n"
                    "    input_series:" + series + "    promql_expr_test:\n"
                    + "\n".join(test.rstrip("\n") for test in tests) + "\n")
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_annotations_mark_firing_alerts_not_pending_ones(tmp_path):
    """ALERTS holds an alert's pending stretch too (alertstate="pending": TrainerHang's 5 s `for`, a spike's
    evaluation before it fires): the Hangs, Loss spikes and Loss NaN annotations marked those as if they had fired."""
    annotations = all_dashboards()["training-job.json"]["annotations"]["list"]
    queries = {item["name"]: item["expr"] for item in annotations if "expr" in item}
    assert set(queries) == {"Hangs", "Loss spikes", "Loss NaN"}
    alerts = {"Hangs": "TrainerHang", "Loss spikes": "TrainerLossSpike", "Loss NaN": "TrainerLossNaN"}
    series, tests = "\n", []
    for name, alert in alerts.items():
        for state, values in (("pending", "1 1 _ _"), ("firing", "_ _ 1 1")):
            series += (f"      - series: 'ALERTS{{alertname=\"{alert}\",alertstate=\"{state}\",job_id=\"a1\","
                       f"severity=\"critical\"}}'\n        values: '{values}'\n")
        expr = queries[name].replace("$job_id", "a1").replace('"', '\\"')
        labels = f'ALERTS{{alertname="{alert}",alertstate="firing",job_id="a1",severity="critical"}}'
        tests += [f'      - expr: "{expr}"\n        eval_time: 1m\n        exp_samples: []\n',
                  f'      - expr: "{expr}"\n        eval_time: 3m\n        exp_samples:\n'
                  f"          - labels: '{labels}'\n            value: 1\n"]
    promtool_passes(tmp_path / "annotations_test.yml", series, tests)


def test_the_compare_summary_shows_every_rank_and_the_newest_run(tmp_path):
    """Every rank's samples (one rank's were shown), the newest run's final loss (an earlier run's could win;
    a diverged run showed its predecessor's) and accuracy (an earlier run's higher one won), and a resumed
    running job's duration (it was negative)."""
    (summary,) = [panel for panel in all_dashboards()["compare.json"]["panels"] if panel["type"] == "table"]
    tests = []
    for target in summary["targets"]:
        if target["refId"] in COMPARE_EXPECTED:
            expr = target["expr"].replace("$job_id", "m2|r1|d1").replace("$__range", "1h")
            samples = "".join(f"\n          - labels: '{{job_id=\"{job}\"}}'\n            value: {value}"
                              for job, value in COMPARE_EXPECTED[target["refId"]].items())
            tests.append(f"      - expr: '{expr}'\n        eval_time: 20m\n        exp_samples:{samples}")
    assert len(tests) == 5
    promtool_passes(tmp_path / "compare_test.yml", COMPARE_JOBS, tests)


# A two-rank job paused at 5 m (run p1, q1) and resumed at 10 m (run p2, p3) that completed at 15 m. Its
# series go stale after the end; the stats read at 20 m, the end of a 1-hour time range.
JOB_SERIES = """
      - series: 'trainer_job_state{job_id="t1",instance="p1",rank="0",state="running"}'
        values: '1x4 0'
      - series: 'trainer_job_state{job_id="t1",instance="p1",rank="0",state="paused"}'
        values: '0x4 1'
      - series: 'trainer_job_state{job_id="t1",instance="p2",rank="0",state="running"}'
        values: '_x10 1x4 0'
      - series: 'trainer_job_state{job_id="t1",instance="p2",rank="0",state="completed"}'
        values: '_x10 0x4 1'
      - series: 'trainer_job_start_timestamp_seconds{job_id="t1",instance="p1",rank="0"}'
        values: '0x5'
      - series: 'trainer_job_end_timestamp_seconds{job_id="t1",instance="p1",rank="0"}'
        values: '_x4 300'
      - series: 'trainer_job_start_timestamp_seconds{job_id="t1",instance="p2",rank="0"}'
        values: '_x10 600x5'
      - series: 'trainer_job_end_timestamp_seconds{job_id="t1",instance="p2",rank="0"}'
        values: '_x14 900'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="t1",instance="p1",rank="0"}'
        values: '0+60x4'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="t1",instance="p2",rank="0"}'
        values: '_x10 600+60x4'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="t1",instance="p3",rank="1"}'
        values: '_x10 600+60x4'
      - series: 'trainer_steps_total{job_id="t1",instance="p1",rank="0"}'
        values: '0+10x4'
      - series: 'trainer_steps_total{job_id="t1",instance="p2",rank="0"}'
        values: '_x10 40+15x4'
      - series: 'trainer_samples_total{job_id="t1",instance="p1",rank="0"}'
        values: '0+100x4'
      - series: 'trainer_samples_total{job_id="t1",instance="q1",rank="1"}'
        values: '0+100x4'
      - series: 'trainer_samples_total{job_id="t1",instance="p2",rank="0"}'
        values: '_x10 400+150x4'
      - series: 'trainer_samples_total{job_id="t1",instance="p3",rank="1"}'
        values: '_x10 400+150x4'
      - series: 'trainer_checkpoints_total{job_id="t1",instance="p1",rank="0"}'
        values: '0+1x4'
      - series: 'trainer_checkpoints_total{job_id="t1",instance="p2",rank="0"}'
        values: '_x10 4+1x4'
      - series: 'trainer_eval_accuracy_ratio{job_id="t1",instance="p1",rank="0"}'
        values: '0.5 0.9x3'
      - series: 'trainer_eval_accuracy_ratio{job_id="t1",instance="p2",rank="0"}'
        values: '_x10 0.8x3 0.85'
"""
JOB_EXPECTED = {"State": ('{state="completed"}', 1), "Steps": ("{}", 100), "Samples": ("{}", 2000),
                "Eval accuracy": ("{}", 0.85), "Duration": ("{}", 900), "Checkpoints": ("{}", 8)}


def test_the_job_stats_show_a_finished_resumed_jobs_final_figures(tmp_path):
    """The stats were range queries whose last point each showed: a finished job's final figures are in
    Prometheus for one scrape before its series go stale, which the points mostly missed (536 steps of 540,
    an earlier run's accuracy), State showed every state the job went through side by side, and Duration
    counted the newest run only."""
    stats = {panel["title"]: panel["targets"][0] for panel in all_dashboards()["training-job.json"]["panels"]
             if panel["type"] == "stat"}
    tests = []
    for title, (labels, value) in JOB_EXPECTED.items():
        target = stats[title]
        assert target.get("instant"), title
        expr = target["expr"].replace("$job_id", "t1").replace("$__range", "1h")
        tests.append(f"      - expr: '{expr}'\n        eval_time: 20m\n        exp_samples:\n"
                     f"          - labels: '{labels}'\n            value: {value}")
    promtool_passes(tmp_path / "job_test.yml", JOB_SERIES, tests)


@pytest.mark.parametrize("dashboard,title,ref_id,labels", [("training-job.json", "Duration", "A", "{}"),
                                                          ("compare.json", "Summary", "duration_seconds",
                                                           '{job_id="t1"}')])
def test_the_duration_of_a_resumed_job_counts_from_a_first_run_older_than_the_range(dashboard, title, ref_id, labels,
                                                                                      tmp_path):
    """The duration read the job's first start in the time range: over the default 15 minutes, a job whose first run
    ended before them (here paused at 5 m, resumed at 10 m, ended at 15 m, read at 21 m) was as old as its newest
    run, 300 s of its 900 (the analytics, which look 30 days back, said 900)."""
    (target,) = [target for panel in all_dashboards()[dashboard]["panels"] if panel["title"] == title
                 for target in panel.get("targets", []) if target["refId"] == ref_id]
    expr = target["expr"].replace("$job_id", "t1").replace("$__range", "15m")
    tests = [f"      - expr: '{expr}'\n        eval_time: 21m\n        exp_samples:\n"
             f"          - labels: '{labels}'\n            value: 900"]
    promtool_passes(tmp_path / "duration_test.yml", JOB_SERIES, tests, rules=ANALYTICS_RULES)


# A job killed at 4 m, 10 steps past its checkpoint at 30 (its counts 40 steps, 400 samples), and resumed at its
# address (a fixed --metrics-listen port: a `run_id` of its own) at 10 m from that checkpoint: at 14 m its newest run
# has done 8 steps again, 38 in all.
KILLED_SERIES = """
      - series: 'trainer_job_start_timestamp_seconds{job_id="k1",instance="p9",run_id="aaaa0001"}'
        values: '0x4'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="k1",instance="p9",run_id="aaaa0001"}'
        values: '0+60x4'
      - series: 'trainer_steps_total{job_id="k1",instance="p9",run_id="aaaa0001"}'
        values: '0+10x4'
      - series: 'trainer_samples_total{job_id="k1",instance="p9",run_id="aaaa0001"}'
        values: '0+100x4'
      - series: 'trainer_checkpoints_total{job_id="k1",instance="p9",run_id="aaaa0001"}'
        values: '0 0 0 1 1'
      - series: 'trainer_job_start_timestamp_seconds{job_id="k1",instance="p9",run_id="aaaa0002"}'
        values: '_x10 600x4'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="k1",instance="p9",run_id="aaaa0002"}'
        values: '_x10 600+60x4'
      - series: 'trainer_steps_total{job_id="k1",instance="p9",run_id="aaaa0002"}'
        values: '_x10 30+2x4'
      - series: 'trainer_samples_total{job_id="k1",instance="p9",run_id="aaaa0002"}'
        values: '_x10 300+20x4'
      - series: 'trainer_checkpoints_total{job_id="k1",instance="p9",run_id="aaaa0002"}'
        values: '_x10 1x4'
      - series: 'trainer_loss_min{job_id="k1",instance="p9",run_id="aaaa0001"}'
        values: '0.9 0.8 0.8 0.7 0.5'
      - series: 'trainer_loss_min{job_id="k1",instance="p9",run_id="aaaa0002"}'
        values: '_x10 0.7 0.7 0.6 0.6 0.6'
"""


def test_the_counts_of_a_job_resumed_after_a_kill_are_its_newest_runs(tmp_path):
    """Every run's highest count was shown: the killed run's 40 steps and 400 samples, with the work its resumed run
    threw away, until that run caught up (the analytics say 38 and 380, the newest run's); and its lowest loss, 0.5
    from steps thrown away, as the job's best (the newest run's: 0.6)."""
    stats = {panel["title"]: panel["targets"][0] for panel in all_dashboards()["training-job.json"]["panels"]
             if panel["type"] == "stat"}
    (summary,) = [panel for panel in all_dashboards()["compare.json"]["panels"] if panel["type"] == "table"]
    exprs = {"Steps": (stats["Steps"], "{}", 38), "Samples": (stats["Samples"], "{}", 380),
             "Checkpoints": (stats["Checkpoints"], "{}", 1),
             "compare": ([t for t in summary["targets"] if t["refId"] == "samples"][0], '{job_id="k1"}', 380),
             "best loss": ([t for t in summary["targets"] if t["refId"] == "best_loss"][0], '{job_id="k1"}', 0.6)}
    tests = []
    for target, labels, value in exprs.values():
        expr = target["expr"].replace("$job_id", "k1").replace("$__range", "1h")
        tests.append(f"      - expr: '{expr}'\n        eval_time: 14m\n        exp_samples:\n"
                     f"          - labels: '{labels}'\n            value: {value}")
    promtool_passes(tmp_path / "killed_test.yml", KILLED_SERIES, tests)


def test_the_data_wait_share_is_of_the_loop_and_has_no_point_where_no_step_completed(tmp_path):
    """The share was the data-wait histogram over the step-time one: a job of one step a pass, whose wait for the end
    of each pass (the loader joining its workers) is in no step, read 150 %. A window with data waits and no completed
    step (an evaluation, the start) was +Inf, one with neither NaN."""
    (target,) = [panel["targets"][0] for panel in all_dashboards()["training-job.json"]["panels"]
                 if panel["title"] == "Data wait"]
    expr = target["expr"].replace("$job_id", "w1").replace("$__rate_interval", "1m")
    rules = ROOT / "deploy" / "prometheus" / "rules" / "trainmetrics.rules.yml"
    config = tmp_path / "data_wait_test.yml"
    # Each second a pass: 0.25 s for the workers' start, 0.25 s of compute, 0.5 s for their join; then no step.
    config.write_text(f"""rule_files: ['{rules}']
evaluation_interval: 1s
tests:
  - interval: 1s
    input_series:
      - series: 'trainer_steps_total{{job_id="w1",rank="0"}}'
        values: '0+1x120 120x120'
      - series: 'trainer_data_wait_seconds_sum{{job_id="w1",rank="0"}}'
        values: '0+0.75x120 90+0.5x120'
      - series: 'trainer_step_duration_seconds_sum{{job_id="w1",rank="0"}}'
        values: '0+0.5x120 60x120'
      - series: 'trainer_phase_seconds_total{{job_id="w1",rank="0",phase="data_wait"}}'
        values: '0+0.75x120 90+0.5x120'
      - series: 'trainer_phase_seconds_total{{job_id="w1",rank="0",phase="compute"}}'
        values: '0+0.25x120 30+0.5x120'
    promql_expr_test:
      - expr: '{expr}'
        eval_time: 90s
        exp_samples:
          - labels: 'job_id:trainer_data_wait:ratio_rate1m{{job_id="w1"}}'
            value: 0.75
      - expr: '{expr}'
        eval_time: 200s
        exp_samples: []
""")
    result = subprocess.run(["promtool", "test", "rules", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dashboard,labels", [
    ("training-job.json", 'trainer_loss{job_id=\"n1\",instance=\"p1\",rank=\"0\"}'),
    ("compare.json", '{job_id=\"n1\"}')])
def test_the_loss_curve_has_no_point_while_the_loss_is_not_finite(dashboard, labels, tmp_path):
    """While a job's loss was NaN, trainer_loss held its last finite value: the Loss panel drew a flat line that
    looked like a plateau. Its training loss has no point then (the Loss NaN annotation marks the stretch). The
    Compare dashboard's overlay had no such filter."""
    (loss,) = [panel for panel in all_dashboards()[dashboard]["panels"] if panel["title"] == "Loss"]
    expr = loss["targets"][0]["expr"].replace("$job_id", "n1").replace("$__rate_interval", "1m")
    series = ("      - series: 'trainer_loss{job_id=\"n1\",instance=\"p1\",rank=\"0\"}'\n        values: '0.5x5'\n"
              "      - series: 'trainer_loss_finite{job_id=\"n1\",instance=\"p1\",rank=\"0\"}'\n"
              "        values: '1 1 0 0 0 0'\n")
    finite = f"        exp_samples:\n          - labels: '{labels}'\n            value: 0.5\n"
    tests = [f"      - expr: '{expr}'\n        eval_time: 1m\n{finite}",
             f"      - expr: '{expr}'\n        eval_time: 3m\n        exp_samples: []\n"]
    promtool_passes(tmp_path / "loss_test.yml", "\n" + series, tests)


def test_the_compare_loss_overlay_is_rank_0s_as_its_final_loss_column(tmp_path):
    """The overlay drew the mean of a job's ranks' losses, the table's Final loss rank 0's: the curve ended on a
    value the table did not show (0.6 against 0.4 here)."""
    (loss,) = [panel for panel in all_dashboards()["compare.json"]["panels"] if panel["title"] == "Loss"]
    expr = loss["targets"][0]["expr"].replace("$job_id", "n1").replace("$__rate_interval", "1m")
    series = "".join(f"      - series: 'trainer_loss{{job_id=\"n1\",instance=\"p{rank}\",rank=\"{rank}\"}}'\n"
                     f"        values: '{value}x5'\n" for rank, value in ((0, 0.4), (1, 0.8)))
    tests = [f"      - expr: '{expr}'\n        eval_time: 3m\n        exp_samples:\n"
             f"          - labels: '{{job_id=\"n1\"}}'\n            value: 0.4\n"]
    promtool_passes(tmp_path / "overlay_test.yml", "\n" + series, tests)


# A job paused at 5 m (its process p1 publishes paused and exits); the job server then publishes its state:
# paused, and from 10 m queued again to resume (w1) or cancelled (w2, its end for 5 minutes).
WAITING_SERIES = ""
for job, later in (("w1", "queued"), ("w2", "cancelled")):
    WAITING_SERIES += f"""
      - series: 'trainer_job_state{{job_id="{job}",instance="p1",state="running"}}'
        values: '1x4 0'
      - series: 'trainer_job_state{{job_id="{job}",instance="p1",state="paused"}}'
        values: '0x4 1'
      - series: 'trainer_job_start_timestamp_seconds{{job_id="{job}",instance="p1"}}'
        values: '0x5'
      - series: 'trainer_heartbeat_timestamp_seconds{{job_id="{job}",instance="p1"}}'
        values: '0+60x5'
      - series: 'trainer_job_state{{job_id="{job}",instance="server",state="paused"}}'
        values: '_x5 1x4 0x5'
      - series: 'trainer_job_state{{job_id="{job}",instance="server",state="{later}"}}'
        values: '_x5 0x4 1x5'
"""


def test_the_state_stat_shows_the_job_servers_state_of_a_job_without_a_process(tmp_path):
    """A paused job's process has gone; the job server publishes its state from then on. The State stat
    preferred the newest run's last state whenever there was one: a paused job resumed (queued again) or
    cancelled read `paused` for good, though the server, the job API and the Fleet dashboard said otherwise."""
    promtool_passes(tmp_path / "waiting_test.yml", WAITING_SERIES,
                    state_stat_tests((("w1", "paused", "7m"), ("w1", "queued", "12m"), ("w2", "cancelled", "12m"))))


def state_stat_tests(cases) -> list[str]:
    """promtool tests of the State stat over a 1-hour range: for each (job, state, time), that state alone."""
    (state,) = [panel["targets"][0] for panel in all_dashboards()["training-job.json"]["panels"]
                if panel["title"] == "State"]
    return [f"      - expr: '{state['expr'].replace('$job_id', job).replace('$__range', '1h')}'\n"
            f"        eval_time: {at}\n        exp_samples:\n"
            f"          - labels: '{{state=\"{expected}\"}}'\n            value: 1" for job, expected, at in cases]


# w3: paused at 5 m by its process p1; the job server publishes it paused, then cancelled at 11 m (with its end)
# for its hold of 5 minutes, then nothing. w4: its process p1 killed at 5 m (its last state running); the server
# ends it failed (its end at 6 m), it is resumed at 11 m (queued), and its new process p2 runs from 15 m.
ENDED_BY_SERVER_SERIES = """
      - series: 'trainer_job_state{job_id="w3",instance="p1",state="running"}'
        values: '1x4 0'
      - series: 'trainer_job_state{job_id="w3",instance="p1",state="paused"}'
        values: '0x4 1'
      - series: 'trainer_job_start_timestamp_seconds{job_id="w3",instance="p1"}'
        values: '0x5'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="w3",instance="p1"}'
        values: '0+60x5'
      - series: 'trainer_job_state{job_id="w3",instance="server",state="paused"}'
        values: '_x5 1x4 0x4'
      - series: 'trainer_job_state{job_id="w3",instance="server",state="cancelled"}'
        values: '_x5 0x4 1x4'
      - series: 'trainer_job_end_timestamp_seconds{job_id="w3",instance="server"}'
        values: '_x10 660x4'
      - series: 'trainer_job_state{job_id="w4",instance="p1",state="running"}'
        values: '1x5'
      - series: 'trainer_job_start_timestamp_seconds{job_id="w4",instance="p1"}'
        values: '0x5'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="w4",instance="p1"}'
        values: '0+60x5'
      - series: 'trainer_job_state{job_id="w4",instance="server",state="failed"}'
        values: '_x5 1x4 0x3'
      - series: 'trainer_job_end_timestamp_seconds{job_id="w4",instance="server"}'
        values: '_x5 360x4'
      - series: 'trainer_job_state{job_id="w4",instance="server",state="queued"}'
        values: '_x5 0x4 1x3'
      - series: 'trainer_job_state{job_id="w4",instance="p2",state="running"}'
        values: '_x14 1x15'
      - series: 'trainer_job_start_timestamp_seconds{job_id="w4",instance="p2"}'
        values: '_x14 900x15'
      - series: 'trainer_heartbeat_timestamp_seconds{job_id="w4",instance="p2"}'
        values: '_x14 900+60x15'
"""


def test_the_state_stat_keeps_the_job_servers_end_of_a_job_after_its_hold(tmp_path):
    """The job server publishes the end of a job it ended (cancelled while paused, or failed: killed without a
    result) for FINAL_STATE_HOLD_SECONDS only. Past that the State stat went back to the last run's last state:
    a cancelled job read `paused` (a killed one `running`) for good. A job resumed after the server's end reads
    its new run's state."""
    promtool_passes(tmp_path / "ended_test.yml", ENDED_BY_SERVER_SERIES, state_stat_tests((
        ("w3", "cancelled", "12m"), ("w3", "cancelled", "25m"), ("w4", "failed", "7m"), ("w4", "queued", "12m"),
        ("w4", "running", "25m"))))


# The exporter's peak series hold the max of its 100 ms samples over a 1 s window; one point of a panel covers
# $__interval (range / the panel's width, 4 s over an hour, 1 m over a day). A spike of the CPU, the memory or a
# GPU at 3 m, inside the 2-minute point that ends at 4 m and gone by then.
GPU_A = ',gpu="0",uuid="GPU-a"'
PEAK_SERIES = "".join(f"""
      - series: '{name}{{instance="n1"{gpu}}}'
        values: '0.1 0.1 0.1 0.9 0.1 0.1 0.1 0.1 0.1'""" for name, gpu in (
    ("system_cpu_utilization_peak_ratio", ""), ("system_memory_used_peak_bytes", ""),
    ("hw_gpu_utilization_peak_ratio", GPU_A), ("hw_gpu_memory_usage_peak_bytes", GPU_A)))
PEAK_SERIES += """
      - series: 'hw_gpu_job_info{instance="n1",gpu="0",uuid="GPU-a",job_id="j1"}'
        values: '1x8'
"""
# The Fleet dashboard's node peaks read the recording rules' 1-minute max of the same series: the spike in its
# minute alone.
PEAK_SERIES += "".join(f"""
      - series: '{name}{{instance="n1"}}'
        values: '0.1 0.1 0.1 0.9 0.1 0.1 0.1 0.1 0.1'""" for name in (
    "instance:system_cpu_utilization_peak:max1m", "instance:hw_gpu_utilization_peak:max1m"))


def panel_tests_at_4m(pattern: str, rate_interval: str, value: float) -> list[str]:
    """A promtool test for each panel query that matches `pattern` (on instance n1, job j1, `$__rate_interval`
    as given): its max reads `value` at 4 m."""
    tests = []
    for dashboard, title, target in panel_targets():
        if re.search(pattern, target["expr"]):
            expr = (target["expr"].replace("$instance", "n1").replace("$job_id", "j1")
                    .replace("$__rate_interval", rate_interval))
            tests.append(f"      - expr: 'max({expr})'\n        eval_time: 4m\n        exp_samples:\n"
                         f"          - labels: '{{}}'\n            value: {value}")
    return tests


def test_the_peak_lines_show_a_spike_between_two_points(tmp_path):
    """The peak lines read the exporter's 1 s peak series as they stood at each point's time: over an hour or
    more, a point every few seconds to minutes, a spike between two points (most of them) was not drawn,
    though the panels promise the spikes the scrapes catch. The Fleet dashboard's node peaks read the minute
    before each point: over a day, a point every minute and a half or more, most spikes fell between them."""
    tests = panel_tests_at_4m(r"\b(?:system|hw)_\w*_peak[_:]", "2m", 0.9)
    assert len(tests) == 7
    promtool_passes(tmp_path / "peak_test.yml", PEAK_SERIES + "\n", tests)


# The exporter's mean-utilisation series hold the mean of its samples over a 1 s window: a CPU and a GPU busy every
# other minute, so half busy over any 2-minute point.
MEAN_SERIES = "".join(f"""
      - series: '{name}{{instance="n1"{gpu}}}'
        values: '0.9 0.1 0.9 0.1 0.9 0.1 0.9 0.1 0.9'""" for name, gpu in (
    ("system_cpu_utilization_ratio", ""), ("hw_gpu_utilization_ratio", GPU_A)))
MEAN_SERIES += """
      - series: 'hw_gpu_job_info{instance="n1",gpu="0",uuid="GPU-a",job_id="j1"}'
        values: '1x8'
"""


def test_the_mean_lines_are_the_mean_over_each_point(tmp_path):
    """The mean lines beside the peaks read the exporter's 1 s mean as it stood at each point's time: over an
    hour or more, one second's mean a point, so a CPU or GPU busy every other stretch read busy or idle by
    chance (here 0.9 at 4 m), never the half it was over the point, while the peak line beside it is the max
    over the whole point."""
    tests = panel_tests_at_4m(r"\b(?:system_cpu|hw_gpu)_utilization_ratio\b", "90s", 0.5)
    assert len(tests) == 3
    promtool_passes(tmp_path / "mean_test.yml", MEAN_SERIES + "\n", tests)


# A job's process restarted at the same address (a container restarted in its pod, a fixed --metrics-port) takes
# its phase seconds over from its checkpoint, below where the killed one left them: 1/2 s of compute a second,
# 35,980 s in at 6 m, then 35,900 from the checkpoint at 7 m.
PHASE_RESET_SERIES = """
      - series: 'trainer_phase_seconds_total{job_id="x1",instance="h:1",rank="0",phase="compute"}'
        values: '35800+30x6 35900+30x6'
"""


@pytest.mark.parametrize("dashboard,title", [("training-job.json", "Where the time goes"),
                                             ("fleet.json", "Where the fleet's time goes")])
def test_the_time_per_phase_has_no_point_across_a_counter_fall(dashboard, title, tmp_path):
    """rate() takes the fall for a reset and the whole carried count for the window's increase: the panel drew
    about 200 seconds of compute per second, flattening every other point (as the recording rules, it leaves
    such a window out)."""
    (panel,) = [panel for panel in all_dashboards()[dashboard]["panels"] if panel["title"] == title]
    expr = panel["targets"][0]["expr"].replace("$job_id", "x1").replace("$__rate_interval", "3m")
    tests = [f"      - expr: '{expr}'\n        eval_time: 8m\n        exp_samples: []",
             f"      - expr: '{expr}'\n        eval_time: 12m\n        exp_samples:\n"
             f"          - labels: '{{phase=\"compute\"}}'\n            value: 0.5"]
    promtool_passes(tmp_path / "phase_reset_test.yml", PHASE_RESET_SERIES, tests)


def test_the_compare_accuracy_shows_a_finished_jobs_last_evaluation(tmp_path):
    """A finished run's final evaluation is in Prometheus for one scrape before its series go stale: the
    overlay read each point's instant, mostly missed it and ended at the evaluation before (the Training job
    dashboard's curve, and Compare's own summary, show it)."""
    (panel,) = [panel for panel in all_dashboards()["compare.json"]["panels"] if panel["title"] == "Eval accuracy"]
    expr = panel["targets"][0]["expr"].replace("$job_id", "c1").replace("$__rate_interval", "2m")
    series = "\n      - series: 'trainer_eval_accuracy_ratio{job_id=\"c1\",instance=\"p1\"}'\n" \
             "        values: '0.5x4 0.9 stale'\n"
    tests = [f"      - expr: '{expr}'\n        eval_time: 6m\n        exp_samples:\n"
             f"          - labels: '{{job_id=\"c1\"}}'\n            value: 0.9"]
    promtool_passes(tmp_path / "accuracy_test.yml", series, tests)


# One job on two nodes, a rank on each, each rank on its node's GPU 0: what a two-node job's panels show.
LEGEND_JOB = "legend-job"
NODE_SERIES = """hw_gpu_utilization_ratio{{gpu="0",uuid="{uuid}"}} 0.5
hw_gpu_utilization_peak_ratio{{gpu="0",uuid="{uuid}"}} 0.7
hw_gpu_memory_usage_bytes{{gpu="0",uuid="{uuid}"}} 1e9
hw_gpu_memory_usage_peak_bytes{{gpu="0",uuid="{uuid}"}} 2e9
hw_gpu_job_info{{gpu="0",uuid="{uuid}",job_id="{job}"}} 1
hw_gpu_process_memory_bytes{{gpu="0",job_id="{job}"}} 1e9
trainer_gpu_memory_peak_bytes{{job_id="{job}",rank="{rank}",run_id="run{rank}"}} 2e9
trainer_model_flops_utilization_ratio{{job_id="{job}",rank="{rank}",run_id="run{rank}"}} 0.3
trainer_loss{{job_id="{job}",rank="{rank}",run_id="run{rank}"}} 0.5
trainer_loss_finite{{job_id="{job}",rank="{rank}",run_id="run{rank}"}} 1
"""


def serve_page(text: str, content_type: str = "text/plain; version=0.0.4"):
    """A page that always answers `text` (a /metrics page: a node of a multi-node job), on a free loopback port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    Thread(target=server.serve_forever, daemon=True).start()
    return server


def render_legend(legend: str, labels: dict) -> str:
    """The series name Grafana shows: {{label}} replaced by its value (empty when the series has none); the
    automatic legend names every label."""
    if legend in ("", "__auto"):
        return str(sorted(labels.items()))
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match.group(1), ""), legend)


def test_no_legend_merges_the_nodes_or_ranks_of_a_job(tmp_path):
    """A job on two nodes has a GPU 0 on each, and every rank its own allocator: the Training job dashboard's GPU
    panels named them "mean gpu 0" and "allocator peak" alike, two lines under one name that a reader took for
    one GPU (or rank) and could not tell apart in the tooltip."""
    pages = [serve_page(NODE_SERIES.format(uuid=f"GPU-{rank}", job=LEGEND_JOB, rank=rank)) for rank in (0, 1)]
    nodes = [f"127.0.0.1:{page.server_address[1]}" for page in pages]
    prometheus = PrometheusServer(tmp_path / "prometheus", static_targets={"exporter": nodes}).start()
    try:
        prometheus.wait_for(f'count(hw_gpu_job_info{{job_id="{LEGEND_JOB}"}}) == 2', timeout=30)
        time.sleep(1)
        node_regex = "|".join(re.escape(node).replace("\\", "\\\\") for node in nodes)
        merged, checked = [], 0
        for name, dashboard in all_dashboards().items():
            for panel in dashboard["panels"]:
                if panel["type"] != "timeseries":
                    continue
                shown = []
                for target in panel["targets"]:
                    expr = (target["expr"].replace("$job_id", LEGEND_JOB).replace("$instance", node_regex)
                            .replace("$__rate_interval", "2s").replace("$__range", "10m"))
                    shown += [render_legend(target["legendFormat"], series["metric"])
                              for series in prometheus.query(expr)]
                checked += len(shown)
                merged += [f"{name} / {panel['title']}: {legend!r}" for legend in set(shown)
                           if shown.count(legend) > 1]
        assert checked >= 10
        assert merged == [], "series under one name:\n" + "\n".join(sorted(merged))
    finally:
        prometheus.stop()
        for page in pages:
            page.shutdown()
            page.server_close()


def test_the_loss_counts_are_the_jobs_not_every_ranks(tmp_path):
    """Every rank counts the spikes and NaN intervals of its own loss, and the ranks of one model diverge together:
    the panel summed them, and a two-rank job's 3 NaN intervals read 6 (the analytics' nonfinite_intervals, rank
    0's, say 3). A spike of one rank's batch alone is the job's all the same (here rank 1's fourth). Each rank's
    watchdog writes its own stack dumps: those add up."""
    (panel,) = [panel for panel in all_dashboards()["training-job.json"]["panels"]
                if panel["title"] == "Loss spikes and stack dumps"]
    series = "".join(f"""
      - series: '{metric}{{job_id="s1",instance="h:{rank}",rank="{rank}"}}'
        values: '{value}x5'""" for rank in (0, 1) for metric, value in (
        ("trainer_loss_spikes_total", 3 + rank), ("trainer_loss_nonfinite_total", 3), ("trainer_stack_dumps_total", 1)))
    expected = {"loss spikes": 4, "NaN/inf intervals": 3, "stack dumps": 2}
    tests = [f"      - expr: '{target['expr'].replace('$job_id', 's1')}'\n        eval_time: 3m\n"
             f"        exp_samples:\n          - labels: '{{}}'\n            value: {expected[target['legendFormat']]}"
             for target in panel["targets"]]
    assert len(tests) == 3
    promtool_passes(tmp_path / "loss_counts_test.yml", series + "\n", tests)


# The recorded 10 s throughput (job_id:trainer_samples:rate10s; a value a minute here, the rule records one a second)
# of a job that trains a minute at 100 samples a second, then evaluates for a minute, and again: 50 a second over a
# point of a minute and a half (a range of a few hours), as over any longer stretch.
BURSTS_SERIES = """
      - series: 'job_id:trainer_samples:rate10s{job_id="j1"}'
        values: '100 0 100 0 100 0'
      - series: 'job_id:trainer_job_running:max{job_id="j1"}'
        values: '1x5'
"""


@pytest.mark.parametrize("dashboard,title", [("training-job.json", "Samples per second"),
                                             ("compare.json", "Samples per second"),
                                             ("fleet.json", "Throughput of running jobs")])
def test_the_throughput_lines_are_the_mean_over_each_point(dashboard, title, tmp_path):
    """The throughput lines read the recorded 10 s rate at each point's instant: over a range of hours, a point
    every half minute or more, most of each point's samples were not read, and a job that evaluates every other
    minute read 100 or 0 samples a second by chance (here 100 at 4 m, 0 at 3 m), never the 50 it averaged."""
    (panel,) = [panel for panel in all_dashboards()[dashboard]["panels"] if panel["title"] == title]
    expr = panel["targets"][0]["expr"].replace("$job_id", "j1").replace("$__rate_interval", "90s")
    tests = [f"      - expr: '{expr}'\n        eval_time: {at}\n        exp_samples:\n"
             f"          - labels: '{{job_id=\"j1\"}}'\n            value: 50" for at in ("4m", "3m")]
    promtool_passes(tmp_path / "throughput_test.yml", BURSTS_SERIES, tests)


def test_the_seconds_without_progress_show_a_stall_between_two_points(tmp_path):
    """The line read each rank's seconds without progress at each point's instant: a rank stalled 50 s inside its
    loop (its hang bound 60 s) between two points 90 s apart, and stepping again at both, read 0.2 s at each: the
    stall that came within 10 s of TrainerHang was not drawn."""
    (panel,) = [panel for panel in all_dashboards()["training-job.json"]["panels"]
                if panel["title"] == "Seconds without progress"]
    expr = panel["targets"][0]["expr"].replace("$job_id", "j1").replace("$__rate_interval", "90s")
    series = """
      - series: 'job_id_rank:trainer_no_progress_seconds{job_id="j1",rank="0"}'
        values: '0.2x99 1+1x49 0.2x59'
"""
    tests = [f"      - expr: '{expr}'\n        eval_time: 170s\n        exp_samples:\n"
             f"          - labels: '{{job_id=\"j1\",rank=\"0\"}}'\n            value: 50"]
    promtool_passes(tmp_path / "no_progress_test.yml", series, tests, interval="1s")


# The exporter's count of a job's CPU time, one core's worth a minute, falls by 10 s at 4 m: the exporter restarted
# after one of the job's ranks ended (the ended rank's time lived in the exporter), its count now the live rank's.
JOB_CPU_SERIES = """
      - series: 'process_cpu_time_seconds_total{job_id="j1",instance="n1"}'
        values: '36000+60x3 35990+60x3'
"""


def test_the_job_cpu_has_no_point_across_a_fall_of_the_exporters_count(tmp_path):
    """rate() took the fall for a reset to 0 and the job's whole CPU time, 10 hours, for the window's increase: the
    panel drew 300 cores for a job of one, flattening every other point (a real exporter restarted so drew 6 cores
    for a busy loop 13 s old)."""
    (panel,) = [panel for panel in all_dashboards()["training-job.json"]["panels"] if panel["title"] == "Job CPU"]
    expr = panel["targets"][0]["expr"].replace("$job_id", "j1").replace("$__rate_interval", "2m")
    tests = [f"      - expr: '{expr}'\n        eval_time: 4m\n        exp_samples: []",
             f"      - expr: '{expr}'\n        eval_time: 7m\n        exp_samples:\n"
             f"          - labels: '{{}}'\n            value: 1"]
    promtool_passes(tmp_path / "job_cpu_test.yml", JOB_CPU_SERIES, tests)


def test_the_step_time_quantiles_show_a_slow_stretch_between_two_points(tmp_path):
    """The quantile lines read the recorded 30 s quantiles at each point's instant: over a day, a point every minute
    and a half, most 30 s windows were read by no point, and 30 s of 2 s steps (a job 20 times slower) between two
    points 90 s apart read 0.1 s at both: the tail the p99 line is there for was not drawn."""
    (panel,) = [panel for panel in all_dashboards()["training-job.json"]["panels"] if panel["title"] == "Step time"]
    series, tests = "\n", []
    for target in panel["targets"]:
        quantile = re.search(r'quantile="([0-9.]+)"', target["expr"]).group(1)
        labels = f'job_id="j1",quantile="{quantile}"'
        series += (f"      - series: 'job_id:trainer_step_duration_seconds:histogram_quantile{{{labels}}}'\n"
                   "        values: '0.1x99 2x29 0.1x59'\n")
        expr = target["expr"].replace("$job_id", "j1").replace("$__rate_interval", "90s")
        tests.append(f"      - expr: '{expr}'\n        eval_time: 170s\n        exp_samples:\n"
                     f"          - labels: '{{{labels}}}'\n            value: 2")
    assert len(tests) == 3
    promtool_passes(tmp_path / "step_time_test.yml", series, tests, interval="1s")
