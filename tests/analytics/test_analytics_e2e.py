"""Real jobs through a real Prometheus, and through the VictoriaMetrics it remote-writes to: the analytics
agree with what each job computed itself (its summary line, its log lines, its checkpoints), on either
backend, and the job's analytics, the job list, the summary and the comparison tell each job the same way."""

import csv
import io
import time

import pytest

from trainmetrics.analytics.app import ROUTES, Settings
from trainmetrics.analytics.job import NOT_ATTRIBUTED
from trainmetrics.analytics.queries import MAX_POINTS_PER_SERIES, SCRAPE_INTERVAL_SECONDS

from .conftest import CANCELLED_JOB_NAME, checkpointed_metrics, same_answer, serve

pytestmark = pytest.mark.slow

EXIT_CODES = {"done-1": (0, "completed"), "fail-1": (1, "failed"), "cancel-1": (3, "cancelled")}
LOG_ROUNDING = 0.5e-4     # log lines print losses with 4 decimals
EXACT = 1e-9              # what VictoriaMetrics keeps of a float (12-15 significant digits), with room


@pytest.fixture(scope="module", params=["prometheus", "victoria-metrics"])
def service(request, fleet):
    """The service on one backend: the Prometheus that scraped the jobs, or the VictoriaMetrics it
    remote-wrote every sample to. Every test runs on both and must get the same answers."""
    backends, jobs, _ = fleet
    backend = backends[request.param]
    with serve(Settings(prometheus_url=backend.url)) as client:
        yield client, backend, jobs


def get(client, path: str, **params) -> dict:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("job_id", list(EXIT_CODES))
def test_job_analytics_agree_with_the_jobs_own_summary(service, job_id):
    client, _, jobs = service
    job = jobs[job_id]
    code, state = EXIT_CODES[job_id]
    assert job.returncode == code, job.stderr[-2000:]
    assert job.summary["state"] == state
    body = get(client, f"/api/training/{job_id}/analytics")
    summary = job.summary

    assert body["status"] == state
    assert body["owner"] == ("alice" if job_id == "done-1" else "bob")
    assert body["model"] == "mlp" and body["dataset"] == "blobs" and body["device"] == "cpu"
    assert body["start_time"] == pytest.approx(summary["start_time"], abs=1e-3)
    assert body["end_time"] == pytest.approx(summary["end_time"], abs=1e-3)
    duration = body["duration"]
    assert duration["total_seconds"] == pytest.approx(summary["end_time"] - summary["start_time"], abs=1e-3)
    assert duration["paused_seconds"] == 0 and duration["training_seconds"] == duration["total_seconds"]
    assert duration["total_minutes"] == pytest.approx(duration["total_seconds"] / 60, rel=1e-5)
    assert duration["total_hours"] == pytest.approx(duration["total_seconds"] / 3600, rel=1e-5)
    assert duration["upload_seconds"] > 0

    performance = body["performance"]
    assert performance["total_samples"] == summary["samples"]            # exact
    assert performance["total_steps"] == summary["steps"]
    assert performance["average_samples_per_second"] == pytest.approx(
        summary["samples"] / (summary["end_time"] - summary["start_time"]), rel=1e-3)
    assert 0 < performance["average_step_seconds"] <= performance["peak_step_seconds"] < duration["total_seconds"]
    assert 0 <= performance["data_wait_percent"] < 100
    checkpoints = body["checkpoints"]
    assert checkpoints["count"] == summary["checkpoints"]
    if checkpoints["count"]:
        assert 0 < checkpoints["mean_seconds"] <= checkpoints["total_seconds"] < duration["total_seconds"]

    # Every loss is the trainer's own: the first, lowest and mean of what it logged (4 decimals there), the
    # last exactly as its summary line says.
    losses, logged = body["losses"], [loss for _, loss in job.logged_losses]
    assert losses["final"] == pytest.approx(summary["loss"], rel=EXACT)
    assert losses["initial"] == pytest.approx(logged[0], abs=LOG_ROUNDING)
    assert losses["best"] == pytest.approx(min(logged), abs=LOG_ROUNDING)
    assert losses["mean"] == pytest.approx(sum(logged) / len(logged), abs=LOG_ROUNDING)
    assert losses["reduction_percent"] == pytest.approx(
        100 * (losses["initial"] - losses["final"]) / losses["initial"], rel=1e-5)
    # Every evaluation, in order, the last one exactly as the summary line says.
    evaluations = body["evaluations"]
    assert len(evaluations) == summary["evaluations"]
    assert [e["step"] for e in evaluations] == [step for step, _, _ in job.logged_evaluations]
    if evaluations:
        assert evaluations[-1]["loss"] == losses["final_eval_loss"] == pytest.approx(summary["eval_loss"], rel=EXACT)
        assert evaluations[-1]["accuracy"] == losses["final_eval_accuracy"] == pytest.approx(
            summary["eval_accuracy"], rel=EXACT)
    else:
        assert losses["final_eval_loss"] is losses["best_eval_loss"] is None

    # No GPU and no node exporter here: null, never a failure.
    resources = body["resource_utilization"]
    for name in ("average_gpu_utilization_percent", "peak_gpu_utilization_percent", "peak_gpu_memory_mb",
                 "average_gpu_temperature_celsius", "average_cpu_percent", "peak_memory_mb"):
        assert resources[name] is None, name
    efficiency = body["efficiency"]
    assert efficiency["gpu_utilization_score"] is None
    assert body["energy"] == {"gpu_joules": None, "cpu_joules": None, "total_joules": None,
                              "samples_per_joule": None, "unavailable_reason": NOT_ATTRIBUTED}
    if job_id == "fail-1":
        assert body["error_type"] in ("NotADirectoryError", "FileNotFoundError")
    else:
        assert body["error_type"] is None
        assert performance["peak_samples_per_second"] >= performance["average_samples_per_second"]
        assert body["start_time"] <= performance["peak_samples_per_second_at"] <= body["end_time"] + 1
        assert performance["peak_window_seconds"] >= 1.0
        expected = min(100, 100 * performance["average_samples_per_second"] / performance["peak_samples_per_second"])
        assert efficiency["throughput_score"] == pytest.approx(expected, rel=1e-4)
        assert efficiency["overall_score"] == efficiency["throughput_score"]     # a CPU job: throughput only


def assert_exact(body: dict, job, checkpoint_dir) -> None:
    """Losses and evaluations equal the trainer's own: its newest checkpoint (full precision), its log lines,
    its summary line."""
    own = checkpointed_metrics(checkpoint_dir)
    losses, logged = body["losses"], [loss for _, loss in job.logged_losses]
    assert own["loss_intervals"] == len(logged)          # every step logged, and checkpointed
    assert losses["initial"] == pytest.approx(own["loss_first"], rel=EXACT)
    assert losses["initial"] == pytest.approx(logged[0], abs=LOG_ROUNDING)
    assert losses["best"] == pytest.approx(own["loss_min"], rel=EXACT)
    assert losses["mean"] == pytest.approx(own["loss_sum"] / own["loss_intervals"], rel=EXACT)
    assert losses["mean"] == pytest.approx(sum(logged) / len(logged), abs=LOG_ROUNDING)
    assert losses["final"] == pytest.approx(job.summary["loss"], rel=EXACT)
    assert losses["best_eval_loss"] == pytest.approx(own["eval_loss_min"], rel=EXACT)
    assert losses["best_eval_accuracy"] == pytest.approx(own["eval_accuracy_max"], rel=EXACT)
    assert losses["final_eval_loss"] == pytest.approx(job.summary["eval_loss"], rel=EXACT)
    # The longest step of every rank (the checkpoint holds rank 0's).
    if len(job.runs[-1].summaries) == 1:
        assert body["performance"]["peak_step_seconds"] == pytest.approx(own["step_duration_max"], rel=1e-5)
    assert body["performance"]["peak_step_seconds"] >= own["step_duration_max"] * (1 - 1e-5)
    assert body["checkpoints"]["count"] == own["checkpoints"] == job.summary["checkpoints"]
    evaluations, expected = body["evaluations"], job.logged_evaluations
    assert len(evaluations) == own["evaluations"] == job.summary["evaluations"] == len(expected) > 8
    for evaluation, (step, loss, accuracy) in zip(evaluations, expected):
        assert evaluation["step"] == step
        assert evaluation["loss"] == pytest.approx(loss, abs=LOG_ROUNDING)
        assert evaluation["accuracy"] == pytest.approx(accuracy, abs=LOG_ROUNDING)
        assert body["start_time"] <= evaluation["time"] <= body["end_time"]
    assert [e["time"] for e in evaluations] == sorted(e["time"] for e in evaluations)


def test_a_job_logging_every_step_is_reported_exactly(service, fleet):
    """One loss a millisecond, scraped every 250 ms, and evaluations faster than scrapes: every figure is
    the trainer's own all the same."""
    client, _, jobs = service
    body = get(client, "/api/training/done-1/analytics")
    assert_exact(body, jobs["done-1"], fleet[2] / "done")


def test_a_paused_and_resumed_two_rank_job_is_one_job(service, fleet):
    """Two ranks, paused and resumed: one job from its first start to its last end, its pause apart, its ranks'
    samples added once, its first loss the first run's."""
    client, _, jobs = service
    job = jobs["ddp-1"]
    first, last = job.runs
    assert [s["state"] for s in first.summaries] == ["paused", "paused"]
    assert [s["state"] for s in last.summaries] == ["completed", "completed"], last.stderr[-2000:]
    body = get(client, "/api/training/ddp-1/analytics")
    assert body["status"] == "completed" and body["error_type"] is None
    assert body["start_time"] == pytest.approx(first.summary["start_time"], abs=1e-3)
    assert body["end_time"] == pytest.approx(last.summary["end_time"], abs=1e-3)
    ran = [(run.summary["start_time"], run.summary["end_time"]) for run in job.runs]
    duration = body["duration"]
    assert duration["total_seconds"] == pytest.approx(ran[1][1] - ran[0][0], abs=2e-3)
    assert duration["paused_seconds"] == pytest.approx(ran[1][0] - ran[0][1], abs=2e-3)
    assert duration["training_seconds"] == pytest.approx(sum(end - start for start, end in ran), abs=2e-3)
    performance = body["performance"]
    assert performance["total_samples"] == sum(s["samples"] for s in last.summaries) == 12 * 3200
    assert performance["total_steps"] == last.summary["steps"]
    assert performance["average_samples_per_second"] == pytest.approx(
        performance["total_samples"] / duration["training_seconds"], rel=1e-5)
    assert_exact(body, job, fleet[2] / "ddp" / "checkpoints")

    # The job list, the summary and the comparison tell it the same way.
    told = {key: body["duration"][key] for key in ("total_seconds", "paused_seconds", "training_seconds")}
    told["throughput"] = performance["average_samples_per_second"]
    row = next(r for r in get(client, "/api/training/analytics/jobs")["jobs"] if r["job_id"] == "ddp-1")
    top = next(r for r in get(client, "/api/training/analytics/summary", range="1h")["top_performing_jobs"]
               if r["job_id"] == "ddp-1")
    (compared,) = get(client, "/api/training/analytics/compare", job_ids="ddp-1")["jobs"]
    for other in (row, top, compared):
        same_answer({"total_seconds": other["duration_seconds"], "paused_seconds": other["paused_seconds"],
                     "training_seconds": other["training_seconds"],
                     "throughput": other.get("average_samples_per_second", other.get("throughput"))}, told)
    assert row["status"] == top["status"] == compared["status"] == "completed"
    assert row["total_samples"] == top["total_samples"] == compared["total_samples"] == performance["total_samples"]
    same_answer({"start_time": row["start_time"], "end_time": row["end_time"]},
                {"start_time": body["start_time"], "end_time": body["end_time"]})


def test_summary_counts_the_fleet(service):
    client, _, jobs = service
    body = get(client, "/api/training/analytics/summary", range="1h")
    assert body["total_jobs"] == 4
    assert body["jobs_by_status"] == {"queued": 0, "running": 0, "paused": 0, "completed": 2, "failed": 1,
                                      "cancelled": 1, "vanished": 0}
    runs = {job_id: [(run.summary["start_time"], run.summary["end_time"]) for run in job.runs]
            for job_id, job in jobs.items()}
    training = [end - start for ran in runs.values() for start, end in ran]
    assert body["total_training_seconds"] == pytest.approx(sum(training), abs=1e-2)
    durations = [ran[-1][1] - ran[0][0] for ran in runs.values()]
    assert body["average_duration_seconds"] == pytest.approx(sum(durations) / 4, abs=1e-3)
    top = body["top_performing_jobs"]
    assert {row["job_id"] for row in top} == set(jobs)
    throughputs = [row["average_samples_per_second"] for row in top]
    assert throughputs == sorted(throughputs, reverse=True)
    assert body["average_throughput_samples_per_sec"] == pytest.approx(sum(throughputs) / 4, rel=1e-5)
    for row in top:
        assert row["total_samples"] == sum(s["samples"] for s in jobs[row["job_id"]].runs[-1].summaries)
    trends = body["resource_trends"]
    assert trends["step_seconds"] >= max(SCRAPE_INTERVAL_SECONDS, 3600 / MAX_POINTS_PER_SERIES)
    assert trends["series"]["running_jobs"]["peak"] >= 1
    assert trends["series"]["samples_per_second"]["peak"] > 0
    assert trends["series"]["host_cpu_utilization_ratio"]["peak"] is None     # no node exporter here

    as_csv = client.get("/api/training/analytics/summary", params={"range": "1h", "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert [row["job_id"] for row in csv.DictReader(io.StringIO(as_csv.text))] == [row["job_id"] for row in top]


def test_a_range_that_begins_inside_a_run_counts_the_trainers_own_seconds_from_its_start(service):
    """The summary's total_training_seconds is within its range: a run that began before the range counts from
    the range's start. Tested only on backfilled series before, never against what real trainers timed."""
    client, _, jobs = service
    runs = [(run.summary["start_time"], run.summary["end_time"]) for job in jobs.values() for run in job.runs]
    start, end = max(runs, key=lambda run: run[1] - run[0])       # the longest run: the range begins inside it
    range_seconds = round(time.time() - (start + end) / 2, 3)
    body = get(client, "/api/training/analytics/summary", range=str(range_seconds))
    begin = body["evaluated_at"] - range_seconds
    assert start < begin < end          # (the run took more than this request's few milliseconds)
    cut = [max(0.0, min(stop, body["evaluated_at"]) - max(began, begin)) for began, stop in runs]
    assert 0 < sum(cut) < sum(stop - began for began, stop in runs)
    assert body["total_training_seconds"] == pytest.approx(sum(cut), abs=1e-2)


def test_jobs_list_filters_by_status_owner_and_time(service):
    client, _, jobs = service

    def ids(**params):
        return sorted(row["job_id"] for row in get(client, "/api/training/analytics/jobs", **params)["jobs"])

    assert ids() == sorted(jobs)
    assert ids(status="failed") == ["fail-1"]
    assert ids(status="running") == ids(status="vanished") == []
    assert ids(owner="bob") == ["cancel-1", "fail-1"]
    assert ids(owner="bob", status="cancelled") == ["cancel-1"]
    first_start = min(job.runs[0].summary["start_time"] for job in jobs.values())
    assert ids(since=str(first_start - 60)) == sorted(jobs)
    assert ids(since=str(time.time() + 60)) == []
    assert ids(until="2001-01-01T00:00:00Z") == []
    rows = list(csv.DictReader(io.StringIO(client.get("/api/training/analytics/jobs", params={"format": "csv"}).text)))
    assert sorted(row["job_id"] for row in rows) == sorted(jobs)
    done = next(row for row in rows if row["job_id"] == "done-1")
    assert int(done["total_samples"]) == jobs["done-1"].summary["samples"] and done["status"] == "completed"
    assert float(done["paused_seconds"]) == 0
    # A name that starts like a formula: as it is in JSON, shown as text in the CSV.
    cancelled = next(row for row in rows if row["job_id"] == "cancel-1")
    assert cancelled["job_name"] == "'" + CANCELLED_JOB_NAME
    listed = get(client, "/api/training/analytics/jobs")["jobs"]
    assert next(row for row in listed if row["job_id"] == "cancel-1")["job_name"] == CANCELLED_JOB_NAME


def test_compare_names_a_winner_per_category(service):
    client, _, jobs = service
    body = get(client, "/api/training/analytics/compare", job_ids="cancel-1,done-1,fail-1")
    rows = {row["job_id"]: row for row in body["jobs"]}
    assert [row["job_id"] for row in body["jobs"]] == ["cancel-1", "done-1", "fail-1"]   # request order
    assert rows["done-1"]["total_samples"] == jobs["done-1"].summary["samples"]
    winner = body["winner"]
    assert winner["fastest"] == "done-1"          # the only completed job
    assert winner["best_throughput"] == max(rows, key=lambda j: rows[j]["throughput"])
    assert winner["best_loss"] == min(rows, key=lambda j: rows[j]["final_loss"])
    scored = {j: row["overall_score"] for j, row in rows.items() if row["overall_score"] is not None}
    assert winner["most_efficient"] == max(scored, key=scored.get)
    assert body["ties"] == {}
    as_csv = client.get("/api/training/analytics/compare", params={"job_ids": "done-1,fail-1", "format": "csv"})
    assert [row["job_id"] for row in csv.DictReader(io.StringIO(as_csv.text))] == ["done-1", "fail-1"]


def prometheus_requests(client) -> float:
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("analytics_prometheus_requests_total{"))


def test_a_settled_job_is_served_from_the_cache(service):
    client, prometheus, _ = service
    # Settled = stopped and no longer scraped (its target file is gone, its series stale).
    prometheus.wait_for('count(trainer_heartbeat_timestamp_seconds{job_id="done-1"})', timeout=20,
                        predicate=lambda r: r == [])
    first = get(client, "/api/training/done-1/analytics")
    before = prometheus_requests(client)
    second = get(client, "/api/training/done-1/analytics")
    assert prometheus_requests(client) == before + 1      # the check that no new process of it ran
    assert second == first


def test_unknown_job_is_404(service):
    client, _, _ = service
    response = client.get("/api/training/never-ran/analytics")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found" and "never-ran" in response.json()["error"]["message"]
    response = client.get("/api/training/analytics/compare", params={"job_ids": "done-1,never-ran"})
    assert response.status_code == 404 and "never-ran" in response.json()["error"]["message"]


def test_openapi_describes_every_route_and_resolves_every_schema(service):
    client, _, _ = service
    document = client.get("/openapi.json").json()
    assert set(document["paths"]) == {path for path, _ in ROUTES} | {"/healthz", "/metrics"}
    schemas = document["components"]["schemas"]

    def refs(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref

    def properties(schema: dict) -> set[str]:
        return set(schemas[schema["$ref"].removeprefix("#/components/schemas/")]["properties"])

    # The job-analytics schema lists exactly the fields the service answers with.
    body = client.get("/api/training/done-1/analytics").json()
    assert set(schemas["JobAnalytics"]["properties"]) == set(body)
    for block in ("duration", "performance", "resource_utilization", "losses", "efficiency", "checkpoints"):
        assert properties(schemas["JobAnalytics"]["properties"][block]) == set(body[block]), block
    assert properties(schemas["JobAnalytics"]["properties"]["evaluations"]["items"]) == set(body["evaluations"][0])


def test_metrics_counts_requests_by_route_and_code(service):
    client, _, _ = service
    client.get("/api/training/never-ran/analytics")
    text = client.get("/metrics").text
    assert 'analytics_http_requests_total{code="404",route="/api/training/{job_id}/analytics"}' in text
    assert "analytics_prometheus_request_duration_seconds_bucket" in text


@pytest.mark.parametrize("job_id", ["done-1", "cancel-1"])
def test_peaks_from_one_range_query_equal_the_subquery_grid(service, fleet, job_id):
    """The peak and its time come from a range query on the subquery grid's own points: the same answers as
    Prometheus' max_over_time over the subquery and the first subquery point that reached it (on either
    backend: VictoriaMetrics' own subqueries place points differently, so Prometheus is the reference). A
    counter's grid goes on past the end to the final scrape (up to 15 s after the end)."""
    from trainmetrics.analytics import queries as q

    client, _, _ = service
    prometheus = fleet[0]["prometheus"]
    body = client.get(f"/api/training/{job_id}/analytics").json()
    end = body["end_time"]
    window = end - body["start_time"]
    expr = q.job_peaks(job_id, window)["samples_per_second"]
    grid_end = q.peak_grid_end_past(window, end, end + q.FINAL_SCRAPE_GRACE_SECONDS)
    assert grid_end >= end + q.FINAL_SCRAPE_GRACE_SECONDS
    grid = q.grid(window + grid_end - end, grid_end, step=q.peak_step(window))
    peak = float(prometheus.query(f"max_over_time(({expr}){grid})")[0]["value"][1])
    when = float(prometheus.query(
        f"min_over_time((timestamp({expr}) and ({expr}) >= {peak!r}){grid})")[0]["value"][1])
    performance = body["performance"]
    assert performance["peak_samples_per_second_at"] == when
    assert performance["peak_samples_per_second"] == pytest.approx(
        max(peak, performance["average_samples_per_second"]), rel=1e-5)   # 6 digits


def test_both_backends_give_identical_answers(fleet):
    """The same paths on the Prometheus that scraped the jobs and on the VictoriaMetrics it remote-wrote
    to: the same answers, peaks and their times included."""
    backends, jobs, _ = fleet
    answers = {}
    for name, backend in backends.items():
        with serve(Settings(prometheus_url=backend.url)) as client:
            paths = [f"/api/training/{job_id}/analytics" for job_id in sorted(jobs)]
            paths += ["/api/training/analytics/jobs", "/api/training/analytics/compare?job_ids=" + ",".join(sorted(jobs)),
                      "/api/training/analytics/summary?range=1h"]
            responses = [client.get(path) for path in paths]
            assert [r.status_code for r in responses] == [200] * len(paths), [r.text for r in responses]
            answers[name] = {path: r.json() for path, r in zip(paths, responses)}
            trends = answers[name]["/api/training/analytics/summary?range=1h"]["resource_trends"]["series"]
            assert trends["samples_per_second"]["peak"] > 0 and trends["running_jobs"]["peak"] >= 1
            # A trend's last point is at the call's own time: compare the points on the step grid.
            for trend in trends.values():
                del trend["points"][-1:], trend["average"], trend["peak"]
    # The grid moves on by a step when one falls between the two calls: compare the times both have.
    summary = "/api/training/analytics/summary?range=1h"
    for series, trend in answers["prometheus"][summary]["resource_trends"]["series"].items():
        other = answers["victoria-metrics"][summary]["resource_trends"]["series"][series]
        common = {t for t, _ in trend["points"]} & {t for t, _ in other["points"]}
        assert len(common) >= len(trend["points"]) - 1, series
        for points in (trend["points"], other["points"]):
            points[:] = [point for point in points if point[0] in common]
    for path, from_prometheus in answers["prometheus"].items():
        same_answer(from_prometheus, answers["victoria-metrics"][path], path)
