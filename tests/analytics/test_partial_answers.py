"""A backend that answers `success` with part of its data: Thanos Query (partial response on: a store that did not
answer), a Prometheus whose remote read failed, a VictoriaMetrics cluster whose vmstorage node did not answer
(`isPartial`). A finished job's analytics computed from such an answer were cached as settled, and its report
stored: the missing figures stayed missing for good. Here a real Prometheus holds two finished jobs, and a proxy in
front of it answers as such a backend does."""

import asyncio
import json
import time
import urllib.parse

import pytest

from trainmetrics.analytics.app import Settings
from trainmetrics.analytics.cache import AnalyticsCache, settled_job_analytics
from trainmetrics.analytics.prometheus import PrometheusClient, partial_warnings
from trainmetrics.reports import PartialAnswer

from tests.prometheus_proxy import Relay
from .conftest import as_openmetrics, backfilled_prometheus, running, scraped_evaluations, scraped_job, serve

pytestmark = pytest.mark.slow

BASE = 'job_id="part-1",instance="h:1",job="trainer",rank="0"'
SECOND = 'job_id="part-2",instance="h:2",job="trainer",rank="0"'     # another job, for the fleet and a comparison
INFO = 'job_name="part",model="mlp",dataset="blobs",owner="a",device="cpu"'
DURATION = 60.0
EVAL_LOSSES = (0.75, 0.3125)
# Thanos Query's warning for a store that did not answer (partial response on, its default).
STORE_DOWN = ('fetch series for {__name__="trainer_eval_history_index"} Addr: 10.0.0.7:10901 LabelSets: '
              '{store="eu"}: receive series from Addr: 10.0.0.7:10901: rpc error: code = Unavailable')
# Prometheus' annotation of a query (2.50-2.53 put its infos in `warnings` too): about the query, no data missing.
ANNOTATION = 'PromQL info: metric might not be a counter, name does not end in _total/_sum/_count/_bucket: "x" (1:6)'


def history(end: float) -> str:
    """Two one-minute jobs, scraped every 5 s, ended `end` (and scraped once more 0.25 s after): two evaluations
    each."""
    return as_openmetrics(samples(end, BASE) + samples(end, SECOND))


def samples(end: float, base: str) -> list[str]:
    """One job's samples (history)."""
    start = end - DURATION
    lines = []
    for t in [start + 5.0 * i for i in range(int(DURATION // 5) + 1)] + [end + 0.25]:
        lines += scraped_job(base, INFO, start, end, t)
        shown = [(index + 1, start + 30.0 * (index + 1) - 1.0, loss) for index, loss in enumerate(EVAL_LOSSES)
                 if t >= start + 30.0 * (index + 1) - 1.0]
        lines += scraped_evaluations(base, t, shown, 100)
        lines.append(f"trainer_evaluations_total{{{base}}} {len(shown)} {t:.3f}")
    return lines


class Proxy(Relay):
    """A proxy before a real Prometheus that answers, while `mode` says so, as a backend with part of its data
    does: its range answers without their series (a store that did not answer), saying so as Thanos (`warnings`)
    or a VictoriaMetrics cluster (`isPartial`) does; or every answer with a PromQL annotation; or ("warned") every
    answer whole but with Thanos' warning; or ("missing") every answer empty, with it. With `only`, just the
    queries that hold it so."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.mode: str | None = None
        self.only: str | None = None
        self.range_queries = 0
        self.ranged: list[str] = []      # every range query's expression

    def relay(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        status, kind, content = self.forward(method, path, headers, body)
        if path.startswith("/api/v1/"):
            query = dict(urllib.parse.parse_qsl(body.decode())).get("query", "")
            content = json.dumps(self.altered(path, json.loads(content), query)).encode()
        return status, kind, content

    def altered(self, path: str, body: dict, query: str = "") -> dict:
        ranged = path.startswith("/api/v1/query_range")
        self.range_queries += ranged
        if ranged:
            self.ranged.append(query)
        if self.only is not None and self.only not in query:
            return body
        if self.mode == "warned":
            return {**body, "warnings": [STORE_DOWN]}
        if self.mode == "missing":      # the store holding the jobs did not answer: nothing of them, said so
            return {**body, "data": {**body["data"], "result": []}, "warnings": [STORE_DOWN]}
        if self.mode == "annotated":
            return {**body, "warnings": [ANNOTATION]}
        if self.mode in ("thanos", "victoria") and ranged:
            body = {**body, "data": {**body["data"], "result": []}}
            return {**body, "warnings": [STORE_DOWN]} if self.mode == "thanos" else {**body, "isPartial": True}
        return body


@pytest.fixture(scope="module")
def proxied_prometheus(tmp_path_factory):
    """A real Prometheus holding the jobs, ended ten minutes ago, behind a Proxy."""
    end = round(time.time() - 600)
    with running(backfilled_prometheus(tmp_path_factory.mktemp("partial"), history(end))) as prometheus, \
            Proxy(prometheus.url).running() as proxy:
        yield proxy


@pytest.fixture
def backend(proxied_prometheus):
    """The proxied Prometheus, answering whole: a test that left it partial made the next one's first answer
    partial (test_a_cached_job_a_partial_check_lacks_is_answered_from_the_cache failed run after
    test_a_partial_answer_is_said_and_never_cached)."""
    proxied_prometheus.mode = proxied_prometheus.only = None
    return proxied_prometheus


def test_what_is_partial():
    assert partial_warnings({"status": "success", "data": {}}) == []
    assert partial_warnings({"status": "success", "warnings": [], "isPartial": False}) == []
    assert partial_warnings({"status": "success", "warnings": [ANNOTATION, "PromQL warning: x"]}) == []
    assert partial_warnings({"status": "success", "warnings": [ANNOTATION, STORE_DOWN]}) == [STORE_DOWN]
    assert partial_warnings({"status": "success", "isPartial": True}) != []
    assert partial_warnings({"status": "success", "warnings": "a store is down"}) == ["a store is down"]


@pytest.mark.parametrize("mode", ["thanos", "victoria"])
def test_a_partial_answer_is_said_and_never_cached(backend, mode):
    backend.mode = mode
    with serve(Settings(prometheus_url=backend.url)) as client:
        for _ in range(2):      # asked again: still partial, still not from a cache
            partial = client.get("/api/training/part-1/analytics")
            assert partial.status_code == 200, partial.text
            assert (partial.json()["status"], partial.json()["partial"], partial.json()["evaluations"]) == \
                ("completed", True, [])
        backend.mode = None
        whole = client.get("/api/training/part-1/analytics").json()
        assert whole["partial"] is False and [e["loss"] for e in whole["evaluations"]] == list(EVAL_LOSSES)
        # Settled and whole: cached now (no range query asked again), even while the backend is partial again.
        backend.mode, before = mode, backend.range_queries
        again = client.get("/api/training/part-1/analytics").json()
        assert backend.range_queries == before and again == whole
        metrics = client.get("/metrics").text
    assert 'analytics_prometheus_requests_total{outcome="partial"}' in metrics


def test_a_partial_answer_is_not_a_stored_report(backend):
    """The keeper stores a settled job's report for good: never from a partial answer (asked again later)."""
    async def compute(settled: bool) -> tuple:
        client, cache = PrometheusClient(backend.url), AnalyticsCache()
        try:
            return await settled_job_analytics(client, cache, "part-1", 3600, settled), len(cache)
        finally:
            await client.aclose()

    backend.mode = "thanos"
    for settled in (True, False):       # past the keeper's wait for a job to settle too
        with pytest.raises(PartialAnswer):
            asyncio.run(compute(settled))
    backend.mode = None
    analytics, cached = asyncio.run(compute(True))
    assert len(analytics.evaluations) == 2 and not analytics.partial and cached == 1


def test_a_promql_annotation_is_no_partial_answer(backend):
    """Prometheus' annotations of a query (`PromQL info: ...`, `PromQL warning: ...`) say nothing is missing:
    taken for a partial answer, a job would never settle on a Prometheus that annotates one of its queries."""
    backend.mode = "annotated"
    try:
        with serve(Settings(prometheus_url=backend.url)) as client:
            first = client.get("/api/training/part-1/analytics").json()
            before = backend.range_queries
            assert client.get("/api/training/part-1/analytics").json() == first
    finally:
        backend.mode = None
    assert first["partial"] is False and len(first["evaluations"]) == 2 and backend.range_queries == before


def partial_then_whole(backend, routes: tuple[str, ...]) -> tuple[list, list]:
    """The answers to `routes` while the backend answers with part of its data ("warned"), then once it does not."""
    with serve(Settings(prometheus_url=backend.url)) as client:
        try:
            backend.mode = "warned"
            partial = [client.get(route) for route in routes]
        finally:
            backend.mode = None
        return partial, [client.get(route) for route in routes]


def test_the_fleet_and_a_comparison_say_a_partial_answer(backend):
    """The summary, the job list and the comparison computed from a partial answer (a shard down: jobs missing,
    totals short) were served as whole: no `partial` field told the caller."""
    partial, whole = partial_then_whole(backend, ("/api/training/analytics/summary", "/api/training/analytics/jobs",
                                                  "/api/training/analytics/compare?job_ids=part-1,part-2"))
    for answer in partial + whole:
        assert answer.status_code == 200, answer.text
    assert [answer.json()["partial"] for answer in partial] == [True, True, True]
    assert [answer.json()["partial"] for answer in whole] == [False, False, False]
    assert [row["partial"] for row in partial[2].json()["jobs"]] == [True, True]
    assert [row["partial"] for row in whole[2].json()["jobs"]] == [False, False]
    assert whole[1].json()["count"] == 2
    # Every row partial: no winner from figures that may be short, and the comparison says why.
    assert set(partial[2].json()["winner"].values()) == {None}
    assert "part of the data" in partial[2].json()["no_winner_reasons"]["best_throughput"]
    assert whole[2].json()["winner"]["best_throughput"] == "part-1"


def test_a_csv_answer_says_a_partial_answer_in_its_header(backend):
    """A CSV of the summary's top jobs or of the job list had no `partial`: rows missing or short read as whole."""
    partial, whole = partial_then_whole(backend, ("/api/training/analytics/summary?format=csv",
                                                  "/api/training/analytics/jobs?format=csv",
                                                  "/api/training/analytics/compare?job_ids=part-1,part-2&format=csv"))
    for answer in partial + whole:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv"), answer.text
    assert [answer.headers["trainmetrics-partial"] for answer in partial] == ["true"] * 3
    assert [answer.headers["trainmetrics-partial"] for answer in whole] == ["false"] * 3


def test_a_comparison_is_partial_for_the_job_whose_own_query_was(backend):
    """One job's own range query answered partially made every job of the comparison partial, and cached none."""
    with serve(Settings(prometheus_url=backend.url)) as client:
        try:
            backend.mode, backend.only = "thanos", "part-2"
            first = client.get("/api/training/analytics/compare?job_ids=part-1,part-2").json()
            before = len(backend.ranged)
            again = client.get("/api/training/analytics/compare?job_ids=part-1,part-2").json()
        finally:
            backend.mode = backend.only = None
    assert first["partial"] is True and [row["partial"] for row in first["jobs"]] == [False, True]
    assert again == {**first, "jobs": again["jobs"]} and again["jobs"][0] == first["jobs"][0]
    # part-1 was whole and settled: cached, its range queries not asked again; part-2 asked again
    asked = backend.ranged[before:]
    assert asked and not any("part-1" in query for query in asked)


def test_a_job_a_partial_answer_lacks_is_unavailable_not_unknown(backend):
    """A job on the store that did not answer was a 404 "no training job in Prometheus" (the job server's keeper
    gave up on it as unknown): with part of the data, the backend cannot say it holds no such job. Answered 503,
    as for an id no store holds (and another owner's job: owners apart)."""
    with serve(Settings(prometheus_url=backend.url)) as client:
        try:
            backend.mode = "missing"
            answers = [client.get(f"/api/training/{job_id}/analytics") for job_id in ("part-1", "nobody-1")]
        finally:
            backend.mode = None
        unknown = client.get("/api/training/nobody-1/analytics")
    assert [answer.status_code for answer in answers] == [503, 503], [answer.text for answer in answers]
    assert "part of its data" in answers[0].json()["error"]["message"] and answers[0].headers["retry-after"]
    assert unknown.status_code == 404


def test_a_cached_job_a_partial_check_lacks_is_answered_from_the_cache(backend):
    """A settled job's cached analytics are checked by a cheap lookup first; a partial check that lacked the job's
    series (its store down) was taken for a change: the job read again from the partial backend, a 503 (or figures
    missing) where the cache held the whole answer, and nothing new said the job had changed."""
    with serve(Settings(prometheus_url=backend.url)) as client:
        whole = client.get("/api/training/part-1/analytics").json()
        assert whole["partial"] is False and whole["status"] == "completed"
        try:
            backend.mode = "missing"
            again = client.get("/api/training/part-1/analytics")
        finally:
            backend.mode = None
    assert again.status_code == 200, again.text
    assert again.json() == whole



def test_a_partial_row_wins_nothing(backend):
    """A job whose own queries were answered with part of the data (its peaks short, evaluations missing) won every
    category it tied in, listed first: its figures may be short of the job's, so a winner from them is a guess."""
    with serve(Settings(prometheus_url=backend.url)) as client:
        try:
            backend.mode, backend.only = "thanos", "part-2"
            body = client.get("/api/training/analytics/compare?job_ids=part-2,part-1").json()
        finally:
            backend.mode = backend.only = None
    assert [row["partial"] for row in body["jobs"]] == [True, False]
    assert set(body["winner"].values()) <= {"part-1", None} and body["ties"] == {}, body
    assert body["winner"]["best_throughput"] == "part-1"
