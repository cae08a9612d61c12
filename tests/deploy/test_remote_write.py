"""Past one Prometheus: two Prometheus agents (two "nodes", deploy/prometheus/agent.yml) each scrape their
node's job and remote-write into one central VictoriaMetrics; the analytics over the central store answer as
they do over a single Prometheus that scraped both nodes."""

import os
import subprocess
import sys

import pytest

from tests.analytics.conftest import serve
from trainmetrics.analytics.app import Settings
from trainmetrics.prometheus_process import PrometheusServer, VictoriaMetricsServer

JOBS = {"node-a": "rw-a-1", "node-b": "rw-b-1"}


@pytest.fixture(scope="module")
def central_and_single(tmp_path_factory):
    """(VictoriaMetrics fed by two agents, a Prometheus that scraped both nodes itself), once the jobs ended."""
    work = tmp_path_factory.mktemp("remote-write")
    victoria = VictoriaMetricsServer(work / "victoria").start()
    agents = [PrometheusServer(work / node, agent=True, remote_write=[victoria.remote_write_url]).start()
              for node in JOBS]
    single = PrometheusServer(work / "single", extra_target_dirs=[agent.targets_dir for agent in agents]).start()
    try:
        # Each job starts at its first scrape, by its agent; Prometheus hands new targets to its scrapers at
        # most every 5 s, and a job over in about 2 s was once never scraped by the single Prometheus: 30 ms
        # more a step make each train for 6 s.
        slow = {**os.environ, "TRAINMETRICS_FAULTS": '{"slow_compute": {"seconds": 0.03}}'}
        processes = [subprocess.Popen([sys.executable, "-m", "trainmetrics", "train", "--job-id", job_id, "--epochs",
                                       "2", "--batch-size", "32", "--log-every", "10", "--eval-every", "25",
                                       "--targets-dir", str(agent.targets_dir)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slow)
                     for agent, job_id in zip(agents, JOBS.values())]
        for process in processes:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-2000:]
        # Both jobs' final states arrived centrally. (The agents and the single Prometheus scrape at their own
        # moments: sample counts differ, the jobs' own figures cannot.)
        # (Each a series new at the job's end: VictoriaMetrics finds one seconds after its samples arrive, and
        # the final state was once not found yet when the end was: the status read `unknown`.)
        victoria.wait_until_agrees(single, (
            "count(last_over_time(trainer_job_end_timestamp_seconds[5m]))",
            'count(last_over_time(trainer_job_state{state="completed"}[5m]) == 1)',
            "sum(max_over_time(trainer_samples_total[5m]))",
            "sum(max_over_time(trainer_loss_intervals_total[5m]))",
            "sum(max_over_time(trainer_eval_history_index[5m]))",
            # (each series' samples arrive in order, series apart: the last evaluation's accuracy was once not in
            # yet when its loss was, and the central answer's final_eval_accuracy was null; integers: a stored float
            # keeps fewer digits there)
            "sum(round(last_over_time(trainer_eval_loss[5m]) * 1e6))",
            "sum(round(last_over_time(trainer_eval_accuracy_ratio[5m]) * 1e6))",
            # (the history's slot 0 first shows the 8th evaluation, the last: its five series are new at the job's
            # end, each found on its own: its accuracy was once not found yet when its number was, and the last
            # evaluation's accuracy, the answer's final_eval_accuracy, read null)
            'count(last_over_time({__name__=~"trainer_eval_history_.+"}[5m]))',
            "sum(round(last_over_time(trainer_eval_history_accuracy_ratio[5m]) * 1e6))"))
        yield victoria, single
    finally:
        for server in (single, *agents, victoria):
            server.stop()


def test_every_sample_of_both_nodes_arrives_in_the_central_store(central_and_single):
    victoria, single = central_and_single
    expr = "sum by (job_id) (max_over_time(trainer_samples_total[5m]))"
    central = {s["metric"]["job_id"]: s["value"][1] for s in victoria.query(expr)}
    assert central == {s["metric"]["job_id"]: s["value"][1] for s in single.query(expr)} == \
        {job_id: str(2 * 3200) for job_id in JOBS.values()}


# What a job reports about itself (counters, held values, its own timestamps): the same whoever scraped it.
# Peaks and host figures are sampled at each scraper's own moments and may differ.
EXACT = {"status": None, "start_time": None, "end_time": None, "performance": ("total_samples", "total_steps"),
         "losses": ("initial", "final", "best", "mean", "final_eval_loss", "final_eval_accuracy"),
         "checkpoints": ("count",), "evaluations": None}


def test_the_analytics_over_the_central_store_answer_as_over_one_prometheus(central_and_single):
    answers = {}
    for name, backend in zip(("central", "single"), central_and_single):
        with serve(Settings(prometheus_url=backend.url)) as client:
            paths = [f"/api/training/{job_id}/analytics" for job_id in JOBS.values()]
            paths += ["/api/training/analytics/compare?job_ids=" + ",".join(JOBS.values())]
            responses = [client.get(path) for path in paths]
            assert [r.status_code for r in responses] == [200] * len(paths), [r.text for r in responses]
            answers[name] = {path: r.json() for path, r in zip(paths, responses)}
    for job_id in JOBS.values():
        path = f"/api/training/{job_id}/analytics"
        single, central = answers["single"][path], answers["central"][path]
        for key, fields in EXACT.items():
            if fields is None:
                expected = single[key]
                if isinstance(expected, (int, float)):
                    expected = pytest.approx(expected, rel=1e-11)
                elif isinstance(expected, list):       # the evaluations: numbers to VictoriaMetrics' 12 digits
                    expected = [{k: pytest.approx(v, rel=1e-11) if isinstance(v, float) else v for k, v in e.items()}
                                for e in expected]
                assert central[key] == expected, (job_id, key)
            else:
                for field in fields:
                    assert central[key][field] == pytest.approx(single[key][field], rel=1e-11), (job_id, key, field)
    compare = "/api/training/analytics/compare?job_ids=" + ",".join(JOBS.values())
    assert answers["central"][compare]["winner"]["best_loss"] == answers["single"][compare]["winner"]["best_loss"]
    for job_id in JOBS.values():
        report = answers["central"][f"/api/training/{job_id}/analytics"]
        assert report["status"] == "completed" and report["performance"]["total_samples"] == 2 * 3200
        # Every 25 of 200 steps, the epoch ends (steps 100 and 200) among them, once each: all eight, in order.
        assert [e["step"] for e in report["evaluations"]] == [25, 50, 75, 100, 125, 150, 175, 200]
