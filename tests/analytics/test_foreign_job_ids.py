"""Job ids read back from Prometheus and fed into later queries: a series whose job_id label is no trainer's id (a
foreign exporter's, or the reserved word `jobs`) stays out of every query, and two jobs whose ids differ only where
a regex would be loose (`a.1`, `ab1`) keep their own figures."""

import time

import pytest

from trainmetrics.analytics.app import Settings

from .conftest import as_openmetrics, backfilled_prometheus, running, serve
from .test_fleet_agrees import process

pytestmark = pytest.mark.slow

INFO = dict(job_name="x", model="mlp", dataset="blobs", device="cpu", owner="carol")


def history(written: float) -> str:
    lines = []
    # 50 samples/s each, a.1 for 10 minutes and ab1 for 5; two foreign jobs beside them in the top 5.
    lines += process("a.1", "h:1", written - 1200, written - 600, "completed", INFO)
    lines += process("ab1", "h:2", written - 1200, written - 900, "completed", INFO)
    lines += process("not a trainer id", "h:3", written - 1200, written - 600, "completed", INFO)
    lines += [line.replace('job_id="not a trainer id"', 'job_id="jobs"') for line in
              process("not a trainer id", "h:4", written - 1200, written - 600, "completed", INFO)]
    return as_openmetrics(lines)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    with running(backfilled_prometheus(tmp_path_factory.mktemp("foreign-ids"), history(time.time()))) as prometheus:
        yield prometheus


def get(backend, path: str, **params) -> dict:
    settings = Settings(prometheus_url=backend.url, recorded_series=False, owner_scope=lambda request: None)
    with serve(settings) as client:
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


def test_a_foreign_job_id_among_the_top_jobs_leaves_the_summary_answering(backfilled):
    """The summary's top 5 rows had their metadata and final loss read by job id: a row whose id is no trainer's
    (`jobs`, one with spaces) failed quote_job_id's check, and the whole summary answered 500."""
    body = get(backfilled, "/api/training/analytics/summary", range="1h")
    top = {job["job_id"]: job for job in body["top_performing_jobs"]}
    assert set(top) == {"a.1", "ab1", "jobs", "not a trainer id"}
    # Each trainer job's own figures: a.1 trained 10 minutes, ab1 5 (a regex `a.1` would have taken ab1's too).
    assert (top["a.1"]["total_samples"], top["ab1"]["total_samples"]) == (30000, 15000)
    assert top["a.1"]["owner"] == top["ab1"]["owner"] == "carol"
    assert top["a.1"]["final_loss"] == pytest.approx(2 / 11) and top["ab1"]["final_loss"] == pytest.approx(2 / 6)
    # The foreign rows are listed, their metadata and final loss left unread.
    assert top["jobs"]["owner"] is None and top["not a trainer id"]["final_loss"] is None
