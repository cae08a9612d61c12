"""Real jobs through a real Prometheus, and through the VictoriaMetrics it remote-writes to: the analytics
agree with what each job logged itself, on either backend."""

import csv
import io
import time

import pytest

from analytics.app import ROUTES, Settings
from analytics.queries import MAX_POINTS_PER_SERIES, SCRAPE_INTERVAL_SECONDS

from .conftest import serve

pytestmark = pytest.mark.slow

EXIT_CODES = {"done-1": (0, "completed"), "fail-1": (1, "failed"), "cancel-1": (3, "cancelled")}
LOG_ROUNDING = 0.5e-4     # log lines print losses with 4 decimals


@pytest.fixture(scope="module", params=["prometheus", "victoria-metrics"])
def service(request, fleet):
    """The service on one backend: the Prometheus that scraped the jobs, or the VictoriaMetrics it
    remote-wrote every sample to. Every test runs on both and must get the same answers."""
    backends, jobs = fleet
    backend = backends[request.param]
    with serve(Settings(prometheus_url=backend.url)) as client:
        yield client, backend, jobs


def near_one_of(value: float, candidates: list[float]) -> bool:
    return any(abs(value - candidate) <= LOG_ROUNDING for candidate in candidates)


@pytest.mark.parametrize("job_id", list(EXIT_CODES))
def test_job_analytics_agree_with_the_jobs_own_summary(service, job_id):
    client, prometheus, jobs = service
    job = jobs[job_id]
    code, state = EXIT_CODES[job_id]
    assert job.returncode == code, job.stderr[-2000:]
    assert job.summary["state"] == state
    response = client.get(f"/api/training/{job_id}/analytics")
    assert response.status_code == 200, response.text
    body = response.json()
    summary = job.summary

    assert body["status"] == state
    assert body["owner"] == ("alice" if job_id == "done-1" else "bob")
    assert body["model"] == "mlp" and body["dataset"] == "blobs" and body["device"] == "cpu"
    assert body["start_time"] == pytest.approx(summary["start_time"], abs=1e-3)
    assert body["end_time"] == pytest.approx(summary["end_time"], abs=1e-3)
    duration = body["duration"]
    assert duration["total_seconds"] == pytest.approx(summary["end_time"] - summary["start_time"],
                                                      abs=SCRAPE_INTERVAL_SECONDS)
    assert duration["total_minutes"] == pytest.approx(duration["total_seconds"] / 60, rel=1e-5)
    assert duration["total_hours"] == pytest.approx(duration["total_seconds"] / 3600, rel=1e-5)
    assert duration["upload_seconds"] > 0

    performance = body["performance"]
    assert performance["total_samples"] == summary["samples"]            # exact
    assert performance["total_steps"] == summary["steps"]
    assert performance["average_samples_per_second"] == pytest.approx(
        summary["samples"] / (summary["end_time"] - summary["start_time"]), rel=1e-3)
    assert 0 < performance["average_step_seconds"] < duration["total_seconds"]
    assert body["checkpoints"]["count"] == summary["checkpoints"]

    losses = body["losses"]
    logged = [loss for _, loss in job.logged_losses]
    assert losses["final"] == pytest.approx(summary["loss"], rel=1e-12)
    assert losses["best"] <= losses["final"]
    assert near_one_of(losses["best"], logged) and near_one_of(losses["initial"], logged)
    # A loss published for a whole second once Prometheus scraped the job was seen: the best is not above it.
    first_scrape = float(prometheus.query(
        f'min_over_time(timestamp(trainer_steps_total{{job_id="{job_id}"}})[10m:250ms])')[0]["value"][1])
    held = job.held_losses(at_least=1.0, after=first_scrape)
    # (Whether some interval was held that long depends on the machine's load: with none, this is vacuous.)
    assert losses["best"] <= min(held, default=float("inf")) + LOG_ROUNDING
    assert losses["reduction_percent"] == pytest.approx(
        100 * (losses["initial"] - losses["final"]) / losses["initial"], rel=1e-5)

    # No GPU and no node exporter here: null, never a failure.
    resources = body["resource_utilization"]
    for name in ("average_gpu_utilization_percent", "peak_gpu_utilization_percent", "peak_gpu_memory_mb",
                 "average_gpu_temperature_celsius", "average_cpu_percent", "peak_memory_mb"):
        assert resources[name] is None, name
    efficiency = body["efficiency"]
    assert efficiency["gpu_utilization_score"] is None
    if job_id == "fail-1":
        assert body["error_type"] in ("NotADirectoryError", "FileNotFoundError")
    else:
        assert body["error_type"] is None
        assert performance["peak_samples_per_second"] >= performance["average_samples_per_second"]
        assert body["start_time"] <= performance["peak_samples_per_second_at"] <= body["end_time"] + 1
        expected = min(100, 100 * performance["average_samples_per_second"] / performance["peak_samples_per_second"])
        assert efficiency["throughput_score"] == pytest.approx(expected, rel=1e-4)
        assert efficiency["overall_score"] == efficiency["throughput_score"]     # a CPU job: throughput only


def test_summary_counts_the_fleet(service):
    client, _, jobs = service
    body = client.get("/api/training/analytics/summary", params={"range": "1h"}).json()
    assert body["total_jobs"] == 3
    assert body["jobs_by_status"] == {"queued": 0, "running": 0, "paused": 0, "completed": 1, "failed": 1,
                                      "cancelled": 1}
    durations = [job.summary["end_time"] - job.summary["start_time"] for job in jobs.values()]
    assert body["total_training_seconds"] == pytest.approx(sum(durations), abs=3 * SCRAPE_INTERVAL_SECONDS)
    assert body["average_duration_seconds"] == pytest.approx(sum(durations) / 3, abs=SCRAPE_INTERVAL_SECONDS)
    top = body["top_performing_jobs"]
    assert {row["job_id"] for row in top} == set(jobs)
    throughputs = [row["average_samples_per_second"] for row in top]
    assert throughputs == sorted(throughputs, reverse=True)
    assert body["average_throughput_samples_per_sec"] == pytest.approx(sum(throughputs) / 3, rel=1e-5)
    for row in top:
        assert row["total_samples"] == jobs[row["job_id"]].summary["samples"]
    trends = body["resource_trends"]
    assert trends["step_seconds"] >= max(SCRAPE_INTERVAL_SECONDS, 3600 / MAX_POINTS_PER_SERIES)
    assert trends["series"]["running_jobs"]["peak"] >= 1
    assert trends["series"]["samples_per_second"]["peak"] > 0
    assert trends["series"]["host_cpu_utilization_ratio"]["peak"] is None     # no node exporter here

    as_csv = client.get("/api/training/analytics/summary", params={"range": "1h", "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert [row["job_id"] for row in csv.DictReader(io.StringIO(as_csv.text))] == [row["job_id"] for row in top]


def test_jobs_list_filters_by_status_owner_and_time(service):
    client, _, jobs = service

    def ids(**params):
        response = client.get("/api/training/jobs", params=params)
        assert response.status_code == 200, response.text
        return sorted(row["job_id"] for row in response.json()["jobs"])

    assert ids() == sorted(jobs)
    assert ids(status="failed") == ["fail-1"]
    assert ids(status="running") == []
    assert ids(owner="bob") == ["cancel-1", "fail-1"]
    assert ids(owner="bob", status="cancelled") == ["cancel-1"]
    first_start = min(job.summary["start_time"] for job in jobs.values())
    assert ids(since=str(first_start - 60)) == sorted(jobs)
    assert ids(since=str(time.time() + 60)) == []
    assert ids(until="2001-01-01T00:00:00Z") == []
    rows = list(csv.DictReader(io.StringIO(client.get("/api/training/jobs", params={"format": "csv"}).text)))
    assert sorted(row["job_id"] for row in rows) == sorted(jobs)
    done = next(row for row in rows if row["job_id"] == "done-1")
    assert int(done["total_samples"]) == jobs["done-1"].summary["samples"] and done["status"] == "completed"


def test_compare_names_a_winner_per_category(service):
    client, _, jobs = service
    response = client.get("/api/training/analytics/compare", params={"job_ids": "cancel-1,done-1,fail-1"})
    assert response.status_code == 200, response.text
    body = response.json()
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
    # Settled = final state and no longer scraped (its target file is gone, its series stale).
    prometheus.wait_for('count(trainer_job_state{job_id="done-1"})', timeout=20, predicate=lambda r: r == [])
    first = client.get("/api/training/done-1/analytics").json()
    before = prometheus_requests(client)
    second = client.get("/api/training/done-1/analytics").json()
    assert prometheus_requests(client) == before
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
    assert set(document["paths"]) == {path for path, _ in ROUTES}
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
    # The job-analytics schema lists exactly the fields the service answers with.
    body = client.get("/api/training/done-1/analytics").json()
    schema = schemas["JobAnalytics"]
    assert set(schema["properties"]) == set(body)
    for block in ("duration", "performance", "resource_utilization", "losses", "efficiency", "checkpoints"):
        assert set(schema["properties"][block]["properties"]) == set(body[block]), block


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
    backend: VictoriaMetrics' own subqueries place points differently, so Prometheus is the reference)."""
    from analytics import queries as q

    client, _, _ = service
    prometheus = fleet[0]["prometheus"]
    body = client.get(f"/api/training/{job_id}/analytics").json()
    end = body["end_time"]
    window = end - body["start_time"]
    expr = q.job_peaks(job_id, window)["samples_per_second"]
    grid = q.grid(window, end)
    peak = float(prometheus.query(f"max_over_time(({expr}){grid})")[0]["value"][1])
    when = float(prometheus.query(
        f"min_over_time((timestamp({expr}) and ({expr}) >= {peak!r}){grid})")[0]["value"][1])
    performance = body["performance"]
    assert performance["peak_samples_per_second_at"] == when
    assert performance["peak_samples_per_second"] == pytest.approx(
        max(peak, performance["average_samples_per_second"]), rel=1e-5)   # 6 digits


def same_answer(ours, theirs, where: str = "") -> None:
    """Equal, but for float digits the backends cannot share. VictoriaMetrics stores a value to 12-15
    significant digits: a unix time stored as a value (a job's start and end) to 10 microseconds, a loss to
    1e-12 relative. So times agree to 20 us; figures derived from them differ by those microseconds over the
    job's duration (fail-1 runs for ~65 ms: 3e-5 relative) and may round the other way at 6 digits."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for key in ours:
            if key != "evaluated_at":
                same_answer(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            same_answer(a, b, f"{where}[{index}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        if where.endswith(("_time", "_at")):
            assert ours == pytest.approx(theirs, abs=2e-5), where
        else:
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-12), where
    else:
        assert ours == theirs, where


def test_both_backends_give_identical_answers(fleet):
    """The same paths on the Prometheus that scraped the jobs and on the VictoriaMetrics it remote-wrote
    to: the same answers, peaks and their times included."""
    backends, jobs = fleet
    answers = {}
    for name, backend in backends.items():
        with serve(Settings(prometheus_url=backend.url)) as client:
            paths = [f"/api/training/{job_id}/analytics" for job_id in sorted(jobs)]
            paths += ["/api/training/jobs", "/api/training/analytics/compare?job_ids=" + ",".join(sorted(jobs)),
                      "/api/training/analytics/summary?range=1h"]
            responses = [client.get(path) for path in paths]
            assert [r.status_code for r in responses] == [200] * len(paths), [r.text for r in responses]
            answers[name] = {path: r.json() for path, r in zip(paths, responses)}
            trends = answers[name]["/api/training/analytics/summary?range=1h"]["resource_trends"]["series"]
            assert trends["samples_per_second"]["peak"] > 0 and trends["running_jobs"]["peak"] >= 1
            # A trend's last point is at the call's own time: compare the points on the step grid.
            for trend in trends.values():
                del trend["points"][-1:], trend["average"], trend["peak"]
    for path, from_prometheus in answers["prometheus"].items():
        same_answer(from_prometheus, answers["victoria-metrics"][path], path)
