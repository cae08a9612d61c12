"""The job list's samples (queries.fleet_samples) evaluated by Prometheus' own engine (promtool test rules): each
rank's newest process's count, as the job's analytics read it, whatever the processes published."""

import subprocess
import textwrap

from trainmetrics.analytics import queries as q
from trainmetrics.prometheus_process import find_binary


def evaluates_to(tmp_path, expr: str, series: tuple[str, ...], at: str, value: float) -> None:
    """promtool's engine evaluates `expr` at `at` over the input `series` (YAML list items) to {job_id="r"} value."""
    listed = "".join(textwrap.dedent(block) for block in series)
    (tmp_path / "test.yml").write_text(textwrap.dedent("""
        evaluation_interval: 1m
        tests:
          - interval: 15s
            input_series:
        """) + textwrap.indent(listed, "      ") + textwrap.indent(textwrap.dedent(f"""
        promql_expr_test:
          - expr: '{expr}'
            eval_time: {at}
            exp_samples:
              - labels: '{{job_id="r"}}'
                value: {value}
        """), "    "))
    result = subprocess.run([find_binary("promtool"), "test", "rules", str(tmp_path / "test.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


KILLED = """
    # ranks 0 and 1 killed at 5 minutes with 2,000 samples each (a checkpoint at 1,000)
    - series: 'trainer_samples_total{job_id="r",instance="h:1",rank="0"}'
      values: '0+100x20 stale'
    - series: 'trainer_heartbeat_timestamp_seconds{job_id="r",instance="h:1",rank="0"}'
      values: '0+15x20 stale'
    - series: 'trainer_samples_total{job_id="r",instance="h:2",rank="1"}'
      values: '0+100x20 stale'
    - series: 'trainer_heartbeat_timestamp_seconds{job_id="r",instance="h:2",rank="1"}'
      values: '0+15x20 stale'
"""


def test_a_resumed_rank_counts_from_its_checkpoint(tmp_path):
    """Rank 1 resumed from the checkpoint at 1,000 and is at 1,500: the killed run's 2,000 were thrown away."""
    evaluates_to(tmp_path, q.fleet_samples(600.0), (KILLED, """
        - series: 'trainer_samples_total{job_id="r",instance="h:3",rank="1"}'
          values: '_x24 1000+50x10'
        - series: 'trainer_heartbeat_timestamp_seconds{job_id="r",instance="h:3",rank="1"}'
          values: '_x24 360+15x10'
        """), "9m", 3500)


def test_a_resumed_process_still_loading_its_checkpoint_leaves_its_ranks_count(tmp_path):
    """Its heartbeat beats from its first scrape, its count only once the checkpoint loaded (or never: it died in
    its restore): ordered by heartbeat alone, the rank had no count and left the job's sum."""
    evaluates_to(tmp_path, q.fleet_samples(600.0), (KILLED, """
        - series: 'trainer_heartbeat_timestamp_seconds{job_id="r",instance="h:3",rank="1"}'
          values: '_x24 360+15x12'
        """), "9m", 4000)


def test_a_count_recorded_before_the_heartbeats_rule_keeps_the_highest(tmp_path):
    """Recorded from minute 20 on, before the heartbeat's recording rule was deployed: the resumed process has
    recorded counts and no heartbeat there, the killed one raw ones with it. The killed run's 15,000 were taken
    for the newest; the highest (the resumed run's 20,000) stands when a count has no heartbeat."""
    expr = q.fleet_samples(10800.0, now=10800.0, split=1200.0)
    evaluates_to(tmp_path, expr, ("""
        - series: 'trainer_samples_total{job_id="r",instance="h:1",rank="0"}'
          values: '1000+500x28 stale'
        - series: 'trainer_heartbeat_timestamp_seconds{job_id="r",instance="h:1",rank="0"}'
          values: '0+15x28 stale'
        - series: 'job_process:trainer_samples:max5m{job_id="r",instance="h:2",rank="0"}'
          values: '_x104 10400+100x96 20000x20'
        """,), "180m", 20000)
