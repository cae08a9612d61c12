"""A training job killed with SIGKILL while running → the deployable TargetDown alert fires in the real
Prometheus (deploy/prometheus/rules/alerts.yml, `for: 30s`, evaluated every 1 s).

The session stack kills the job at its start; this file is collected last, so the 30 s mostly overlap the
rest of the suite (run alone, it waits out the remainder)."""

import time

import pytest

from .conftest import KILLED_JOB


@pytest.fixture(scope="module", autouse=True)
def forget_the_killed_target(stack):
    """After this module, the killed job's stale target file is removed: the session's Prometheus scraped its
    address for the rest of the run, and a later test's job that got the same ephemeral port was scraped by it
    (its first-scrape and final waits satisfied by the wrong Prometheus, it never reached its own: seen in a
    clean-clone run, test_goodput_e2e's fixture)."""
    yield
    for target in stack.prometheus.targets_dir.glob(f"{KILLED_JOB}.rank*.json"):
        target.unlink(missing_ok=True)
    if stack.killed_port_holder is not None:
        stack.killed_port_holder.close()
        stack.killed_port_holder = None


def test_killed_job_fires_target_down(stack):
    prometheus = stack.prometheus
    # Pending first: the target is announced (its targets file outlives the process) but does not answer.
    firing = prometheus.wait_for('ALERTS{alertname="TargetDown",alertstate="firing",job="trainer"}',
                                 timeout=max(10.0, stack.killed_at + 60 - time.time()))
    assert any(alert["metric"].get("instance") == stack.killed_instance for alert in firing), firing
    fired_after = time.time() - stack.killed_at
    assert fired_after >= 30                         # not before its `for:` elapsed
    rules = prometheus.api("alerts")["alerts"]
    ours = [a for a in rules if a["labels"]["alertname"] == "TargetDown" and a["state"] == "firing"
            and a["labels"].get("instance") == stack.killed_instance]
    assert ours and ours[0]["labels"]["severity"] == "critical", rules
    # The job's last state in Prometheus is still "running": only the alert tells it vanished. (Over the time since
    # the kill: a worker may run other files between its stack's start and this one.)
    since_kill = f"{int(time.time() - stack.killed_at) + 60}s"
    assert prometheus.query(
        f'last_over_time(trainer_job_state{{job_id="{KILLED_JOB}",state="running"}}[{since_kill}]) == 1')
